"""The service layer: each service is one unit of work block and one commit.

A service leaves the domain events of its committed work in the unit of work;
:func:`allocation.messagebus.handle` is what hands them on. Changing the
quantity of a batch, for instance, can deallocate order lines, and their
``AllocationRequired`` events reallocate them only when the change runs
through the message bus.

A quantity that the domain refuses raises
:class:`allocation.domain.InvalidQuantity` from the service, before
anything is committed.
"""

from __future__ import annotations

from datetime import date

from uow import Page

from . import orm
from .domain import Batch, OrderLine, Product
from .unit_of_work import AllocationUnitOfWork

__all__ = [
    "DuplicateBatch",
    "InvalidSku",
    "UnknownBatch",
    "add_batch",
    "allocate",
    "batches_of",
    "change_batch_quantity",
]


class DuplicateBatch(Exception):
    """A batch with the given reference exists already."""


class InvalidSku(Exception):
    """An order line named a SKU that has no product."""


class UnknownBatch(Exception):
    """No batch has the given reference."""


def add_batch(ref: str, sku: str, qty: int, eta: date | None, uow: AllocationUnitOfWork) -> None:
    """Add batch *ref* of *qty* units of *sku*, creating the product on its first batch.

    Raise :class:`DuplicateBatch` if a batch *ref* exists already. (Two
    requests adding the same new batch at the same moment both pass this
    check; the database's unique constraint refuses the second commit.)
    """
    batch = Batch(ref, sku, qty, eta)
    with uow:
        if uow.products.get_by_batchref(ref) is not None:
            msg = f"Batch {ref} already exists"
            raise DuplicateBatch(msg)
        product = uow.products.get(sku)
        if product is None:
            product = Product(sku)
            uow.products.add(product)
        product.batches.append(batch)
        uow.commit()


def allocate(orderid: str, sku: str, qty: int, uow: AllocationUnitOfWork) -> str | None:
    """Allocate an order line and return the reference of its batch.

    Return ``None`` if no batch can take it; the product then raises an
    ``OutOfStock`` event. Raise :class:`InvalidSku` for an unknown SKU.
    """
    line = OrderLine(orderid, sku, qty)
    with uow:
        product = uow.products.get(sku)
        if product is None:
            msg = f"Invalid sku {sku}"
            raise InvalidSku(msg)
        batchref = product.allocate(line)
        uow.commit()
    return batchref


def change_batch_quantity(ref: str, qty: int, uow: AllocationUnitOfWork) -> None:
    """Set the purchased quantity of batch *ref*, deallocating lines that no longer fit.

    Raise :class:`UnknownBatch` if there is no batch *ref*.
    """
    with uow:
        product = uow.products.get_by_batchref(ref)
        if product is None:
            msg = f"Unknown batch {ref}"
            raise UnknownBatch(msg)
        product.change_batch_quantity(ref, qty)
        uow.commit()


def batches_of(sku: str, uow: AllocationUnitOfWork, *, limit: int = 20, after: str | None = None) -> Page[Batch]:
    """A page of the batches of *sku*, in the order allocation takes them: in the warehouse first, then by ETA.

    *after* is the ``next`` cursor of the page before; the page says how many
    batches the SKU has in all. A wrong limit or cursor raises
    :class:`uow.errors.QueryError`.
    """
    with uow:
        return uow.batches.page(
            sku=sku, order_by=[orm.batches.c.eta.nulls_first(), orm.batches.c.reference], limit=limit, after=after
        )
