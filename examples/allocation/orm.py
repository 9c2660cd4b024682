"""The imperative mapping of the allocation domain.

The domain classes stay plain; :func:`start_mappers` maps them onto the
tables below. ``products.version_number`` is the version counter of the
aggregate: the domain increments it, and every UPDATE of a product matches
the version that was loaded, so the loser of two concurrent changes to one
product matches no row and gets ``sqlalchemy.orm.exc.StaleDataError``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Date, ForeignKey, Integer, MetaData, String, Table, event, inspect
from sqlalchemy.orm import registry, relationship

import uow

from .domain import Allocated, Batch, OrderLine, Product
from .read_model import AllocationView

__all__ = [
    "INBOX",
    "OUTBOX",
    "allocations",
    "allocations_view",
    "batches",
    "metadata",
    "order_lines",
    "products",
    "start_mappers",
]

metadata = MetaData()
mapper_registry = registry(metadata=metadata)

products = Table(
    "products",
    metadata,
    Column("sku", String(255), primary_key=True),
    Column("version_number", Integer, nullable=False),
)

batches = Table(
    "batches",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("reference", String(255), nullable=False, unique=True),
    Column("sku", ForeignKey("products.sku"), nullable=False),
    Column("purchased_quantity", Integer, nullable=False),
    Column("eta", Date, nullable=True),
)

order_lines = Table(
    "order_lines",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sku", String(255), nullable=False),
    Column("qty", Integer, nullable=False),
    Column("orderid", String(255), nullable=False),
)

allocations = Table(
    "allocations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("orderline_id", ForeignKey("order_lines.id"), nullable=False),
    Column("batch_id", ForeignKey("batches.id"), nullable=False),
)


#: The read model that the consumer of ``allocation.allocated`` keeps: which batch took each order line.
allocations_view = Table(
    "allocations_view",
    metadata,
    Column("orderid", String(255), primary_key=True),
    Column("sku", String(255), primary_key=True),
    Column("batchref", String(255), nullable=False),
)


def _route(event: object) -> uow.Message | None:
    """The domain events other services hear of: each allocation, keyed by its order."""
    if isinstance(event, Allocated):
        return uow.Message("allocation.allocated", event, key=event.orderid)
    return None


#: The outbox that the allocation service's commits write ``Allocated`` to, and the inbox of its consumer.
OUTBOX = uow.Outbox(metadata, events=_route)
INBOX = uow.Inbox(metadata)


def _is_mapped(cls: type[Any]) -> bool:
    return inspect(cls, raiseerr=False) is not None


def start_mappers() -> None:
    """Map the domain classes onto the tables; calling it again does nothing."""
    if _is_mapped(Product):
        return
    mapper_registry.map_imperatively(OrderLine, order_lines)
    mapper_registry.map_imperatively(
        Batch,
        batches,
        properties={
            # An order line belongs to the batch it is allocated to: taking it off the batch deletes it
            # (its ``allocations`` row and its ``order_lines`` row), and a reallocation writes it anew.
            "allocations": relationship(
                OrderLine,
                secondary=allocations,
                order_by=order_lines.c.id,
                cascade="all, delete-orphan",
                single_parent=True,
            ),
        },
    )
    mapper_registry.map_imperatively(
        Product,
        products,
        properties={"batches": relationship(Batch, order_by=batches.c.id)},
        version_id_col=products.c.version_number,
        # The domain increments the counter itself.
        version_id_generator=False,
    )
    event.listen(Product, "load", _receive_load)
    mapper_registry.map_imperatively(AllocationView, allocations_view)


def _receive_load(product: Product, _context: object) -> None:
    """Give a product loaded from the database the ``events`` list that ``__init__`` would have."""
    product.events = []
