"""A small message bus: run a message's handlers, then the events their commits raised.

Each handler runs a service in its own unit of work block; after each one,
the bus takes the events that the committed work raised
(``uow.collect_new_events()``) and handles them in turn, until none is left.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from . import services
from .domain import Allocated, AllocationRequired, BatchQuantityChanged, Event, OutOfStock
from .unit_of_work import AllocationUnitOfWork

__all__ = ["HANDLERS", "handle"]

log = logging.getLogger("allocation")

Handler = Callable[[Any, AllocationUnitOfWork], object]


def change_batch_quantity(event: BatchQuantityChanged, uow: AllocationUnitOfWork) -> None:
    services.change_batch_quantity(event.ref, event.qty, uow)


def reallocate(event: AllocationRequired, uow: AllocationUnitOfWork) -> str | None:
    return services.allocate(event.orderid, event.sku, event.qty, uow)


def report_out_of_stock(event: OutOfStock, uow: AllocationUnitOfWork) -> None:
    log.info("out of stock: %s", event.sku)


HANDLERS: dict[type[Any], list[Handler]] = {
    BatchQuantityChanged: [change_batch_quantity],
    AllocationRequired: [reallocate],
    OutOfStock: [report_out_of_stock],
    Allocated: [],  # other services hear of it through the outbox (see allocation.read_model)
}


def handle(message: Event, uow: AllocationUnitOfWork) -> list[object]:
    """Handle *message* and every event that follows from it; return what the handlers returned, in order."""
    results: list[object] = []
    queue: deque[object] = deque([message])
    while queue:
        current = queue.popleft()
        for handler in HANDLERS[type(current)]:
            results.append(handler(current, uow))
            queue.extend(uow.collect_new_events())
    return results
