"""The allocations read model, kept by a consumer of ``allocation.allocated``: chapter 11 of the book, without its hole.

In the book, the service publishes ``Allocated`` to Redis right after its
commit, and a process dies in between now and then: the message is lost.
Here the allocation's commit writes the message to the outbox, a relay
sends it to Redis Streams, and this consumer records which batch took each
order line. The inbox makes a message delivered twice count once.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from .unit_of_work import AllocationUnitOfWork

__all__ = ["STREAM", "AllocationView", "add_allocation", "allocations_of", "consume"]

#: The topic of the allocations: the Redis stream, after the relay's prefix.
STREAM = "allocation.allocated"


@attrs.define(eq=False, slots=False)
class AllocationView:
    """One row of the read model: order line *orderid* of *sku* went to batch *batchref*."""

    orderid: str
    sku: str
    batchref: str


def add_allocation(message_id: str, payload: bytes, uow: AllocationUnitOfWork) -> bool:
    """Record one ``allocation.allocated`` message; False if it was recorded before (a copy)."""
    allocated = json.loads(payload)
    with uow:
        if not uow.receive(message_id, consumer="allocations-view"):
            return False
        row = {"orderid": allocated["orderid"], "sku": allocated["sku"], "batchref": allocated["batchref"]}
        uow.allocations_view.upsert(row, on=("orderid", "sku"))  # a reallocation moves the line
        uow.commit()
    return True


def allocations_of(orderid: str, uow: AllocationUnitOfWork) -> dict[str, str]:
    """The batch of each SKU of order *orderid*, as the read model has it."""
    with uow:
        return {view.sku: view.batchref for view in uow.allocations_view.list(orderid=orderid)}


def consume(client: Any, uow: AllocationUnitOfWork, *, prefix: str = "", block_ms: int = 1000) -> int:
    """Handle what the consumer group ``allocations-view`` has not yet read of the stream, then acknowledge it.

    *client* is a ``redis.Redis``. Returns how many entries were handled,
    copies included; call it in a loop to keep the read model up to date.
    """
    stream = prefix + STREAM
    try:
        client.xgroup_create(stream, "allocations-view", id="0", mkstream=True)
    except Exception as error:  # the group exists already
        if "BUSYGROUP" not in str(error):
            raise
    handled = 0
    for _, entries in client.xreadgroup("allocations-view", "worker", {stream: ">"}, block=block_ms) or []:
        for entry_id, fields in entries:
            add_allocation(fields[b"id"].decode(), fields[b"payload"], uow)
            client.xack(stream, "allocations-view", entry_id)
            handled += 1
    return handled
