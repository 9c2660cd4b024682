"""The allocation domain: order lines, batches and the ``Product`` aggregate.

Plain attrs classes with no knowledge of SQLAlchemy; :mod:`allocation.orm`
maps them imperatively. ``slots=False`` leaves room for the attributes that
the mapping adds, and ``eq=False`` keeps identity equality, which the session
relies on to tell objects apart.

Quantities are checked where they enter the domain: an order line and a new
batch hold at least one unit, and a batch's quantity can change to zero (the
stock was lost: its lines are reallocated) but never below. Anything else
raises :class:`InvalidQuantity`, which the HTTP apps answer with a 400.
"""

from __future__ import annotations

from datetime import date

import attrs

__all__ = [
    "Allocated",
    "AllocationRequired",
    "Batch",
    "BatchQuantityChanged",
    "Event",
    "InvalidQuantity",
    "OrderLine",
    "OutOfStock",
    "Product",
]


class Event:
    """Base class of the domain events."""


class InvalidQuantity(ValueError):
    """A quantity that the domain refuses: fewer than one unit for an order line or a new batch, or fewer than none."""


def _check_quantity(what: str, qty: int, least: int) -> None:
    if qty < least:
        msg = f"the quantity of {what} must be at least {least}, not {qty}"
        raise InvalidQuantity(msg)


@attrs.frozen
class OutOfStock(Event):
    """No batch of *sku* could take an order line."""

    sku: str


@attrs.frozen
class Allocated(Event):
    """Order line *orderid* of *sku* was allocated to batch *batchref*: other services hear of it."""

    orderid: str
    sku: str
    qty: int
    batchref: str


@attrs.frozen
class AllocationRequired(Event):
    """An order line needs a batch: it is new, or its batch shrank under it."""

    orderid: str
    sku: str
    qty: int


@attrs.frozen
class BatchQuantityChanged(Event):
    """The purchased quantity of batch *ref* is now *qty*."""

    ref: str
    qty: int


@attrs.define(eq=False, slots=False)
class OrderLine:
    """A quantity of one SKU that a customer ordered."""

    orderid: str
    sku: str
    qty: int

    def __attrs_post_init__(self) -> None:
        _check_quantity(f"order line {self.orderid}", self.qty, 1)


@attrs.define(eq=False, slots=False)
class Batch:
    """Stock of one SKU bought in one go: in the warehouse (``eta`` None) or on its way."""

    reference: str
    sku: str
    purchased_quantity: int
    eta: date | None
    allocations: list[OrderLine] = attrs.field(factory=list, repr=False)

    def __attrs_post_init__(self) -> None:
        _check_quantity(f"batch {self.reference}", self.purchased_quantity, 1)

    @property
    def allocated_quantity(self) -> int:
        return sum(line.qty for line in self.allocations)

    @property
    def available_quantity(self) -> int:
        return self.purchased_quantity - self.allocated_quantity

    def can_allocate(self, line: OrderLine) -> bool:
        return self.sku == line.sku and self.available_quantity >= line.qty

    def allocate(self, line: OrderLine) -> None:
        """Allocate *line* to this batch if it fits; allocating the same line again does nothing."""
        if line not in self.allocations and self.can_allocate(line):
            self.allocations.append(line)

    def deallocate_one(self) -> OrderLine:
        """Take back the most recently allocated line and return it."""
        return self.allocations.pop()


def _allocation_order(batch: Batch) -> tuple[bool, date]:
    """Warehouse stock first, then shipments by arrival."""
    return (batch.eta is not None, batch.eta or date.min)


@attrs.define(eq=False, slots=False)
class Product:
    """The aggregate: every batch of one SKU, changed only through here.

    ``version_number`` goes up with every change, so that the database can
    refuse a change made from a stale copy. ``events`` collects what
    happened; the unit of work takes the events after a successful commit.
    """

    sku: str
    batches: list[Batch] = attrs.field(factory=list)
    version_number: int = 0
    events: list[Event] = attrs.field(factory=list, repr=False)

    def allocate(self, line: OrderLine) -> str | None:
        """Allocate *line* to the preferred batch that can take it and return its reference.

        If none can, record :class:`OutOfStock` and return ``None``.
        """
        for batch in sorted(self.batches, key=_allocation_order):
            if batch.can_allocate(line):
                batch.allocate(line)
                self.version_number += 1
                self.events.append(Allocated(line.orderid, line.sku, line.qty, batch.reference))
                return batch.reference
        self.events.append(OutOfStock(line.sku))
        return None

    def change_batch_quantity(self, ref: str, qty: int) -> None:
        """Set the purchased quantity of batch *ref*.

        If the batch no longer holds its allocations, lines come off it until
        it does, each with an :class:`AllocationRequired` event so that it is
        allocated again elsewhere. A line that comes off is deleted from the
        database (see :mod:`allocation.orm`); its reallocation writes it anew.
        Raise :class:`InvalidQuantity` if *qty* is negative.
        """
        batch = next((b for b in self.batches if b.reference == ref), None)
        if batch is None:
            msg = f"product {self.sku} has no batch {ref}"
            raise LookupError(msg)
        _check_quantity(f"batch {ref}", qty, 0)
        batch.purchased_quantity = qty
        self.version_number += 1
        while batch.available_quantity < 0:
            line = batch.deallocate_one()
            self.events.append(AllocationRequired(line.orderid, line.sku, line.qty))
