"""The allocation services on SQLite, PostgreSQL and MariaDB, checked with plain SQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm.exc import StaleDataError

from allocation import messagebus, services
from allocation.domain import BatchQuantityChanged, InvalidQuantity, OrderLine, OutOfStock
from allocation.unit_of_work import SqlAlchemyAllocationUnitOfWork

from .conftest import ALLOCATIONS

if TYPE_CHECKING:
    from .conftest import Rows


@pytest.fixture
def uow(engine: Engine) -> SqlAlchemyAllocationUnitOfWork:
    return SqlAlchemyAllocationUnitOfWork(engine)


def test_add_batch_for_new_product(uow: SqlAlchemyAllocationUnitOfWork, rows: Rows) -> None:
    """add_batch() writes the new product at version 0 and its batch."""
    services.add_batch("b1", "CRUNCHY-ARMCHAIR", 100, date(2030, 1, 31), uow)

    assert [("CRUNCHY-ARMCHAIR", 0)] == rows("SELECT sku, version_number FROM products")
    assert [("b1", "CRUNCHY-ARMCHAIR", 100, date(2030, 1, 31))] == [
        (ref, sku, qty, date.fromisoformat(str(eta)))
        for ref, sku, qty, eta in rows("SELECT reference, sku, purchased_quantity, eta FROM batches")
    ]


def test_add_batch_for_existing_product(uow: SqlAlchemyAllocationUnitOfWork, rows: Rows) -> None:
    """A second add_batch() for a SKU adds a batch to the existing product."""
    services.add_batch("b1", "GARISH-RUG", 100, None, uow)
    services.add_batch("b2", "GARISH-RUG", 99, None, uow)

    assert [("GARISH-RUG",)] == rows("SELECT sku FROM products")
    assert [("b1", 100, None), ("b2", 99, None)] == rows(
        "SELECT reference, purchased_quantity, eta FROM batches ORDER BY reference"
    )


def test_allocate_persists_the_allocation_and_the_version(uow: SqlAlchemyAllocationUnitOfWork, rows: Rows) -> None:
    """allocate() returns the batch and commits the line, its allocation and the new version."""
    services.add_batch("b1", "OMINOUS-MIRROR", 100, None, uow)

    assert "b1" == services.allocate("o1", "OMINOUS-MIRROR", 10, uow)

    assert [("b1", "o1", 10)] == rows(ALLOCATIONS)
    assert [(1,)] == rows("SELECT version_number FROM products WHERE sku = :sku", sku="OMINOUS-MIRROR")


def test_prefers_warehouse_batches_to_shipments(uow: SqlAlchemyAllocationUnitOfWork, rows: Rows) -> None:
    """allocate() takes the warehouse batch before the shipment, whatever the insertion order."""
    services.add_batch("shipment-batch", "RETRO-CLOCK", 100, date(2030, 1, 1), uow)
    services.add_batch("in-stock-batch", "RETRO-CLOCK", 100, None, uow)

    assert "in-stock-batch" == services.allocate("oref", "RETRO-CLOCK", 10, uow)
    assert [("in-stock-batch", "oref", 10)] == rows(ALLOCATIONS)


def test_allocate_errors_for_invalid_sku_and_writes_nothing(uow: SqlAlchemyAllocationUnitOfWork, rows: Rows) -> None:
    """allocate() of an unknown SKU raises InvalidSku and leaves no row behind."""
    services.add_batch("b1", "AREALSKU", 100, None, uow)

    with pytest.raises(services.InvalidSku, match="Invalid sku NONEXISTENTSKU"):
        services.allocate("o1", "NONEXISTENTSKU", 10, uow)

    assert [(0,)] == rows("SELECT COUNT(*) FROM order_lines")
    assert [("AREALSKU", 0)] == rows("SELECT sku, version_number FROM products")


def test_allocate_out_of_stock_writes_nothing_and_publishes_event(
    uow: SqlAlchemyAllocationUnitOfWork, rows: Rows
) -> None:
    """An allocation that fits no batch returns None, keeps the version and publishes OutOfStock."""
    services.add_batch("b1", "POP-ART-VASE", 5, None, uow)

    assert services.allocate("o1", "POP-ART-VASE", 10, uow) is None

    assert [OutOfStock("POP-ART-VASE")] == list(uow.collect_new_events())
    assert [] == rows(ALLOCATIONS)
    assert [(0,)] == rows("SELECT version_number FROM products")


def test_change_batch_quantity_reallocates_via_events(uow: SqlAlchemyAllocationUnitOfWork, rows: Rows) -> None:
    """Shrinking a batch through the bus moves its deallocated line to the next batch, in the database."""
    services.add_batch("batch1", "INDIFFERENT-TABLE", 50, None, uow)
    services.add_batch("batch2", "INDIFFERENT-TABLE", 50, date(2030, 1, 1), uow)
    services.allocate("order1", "INDIFFERENT-TABLE", 20, uow)
    services.allocate("order2", "INDIFFERENT-TABLE", 20, uow)

    results = messagebus.handle(BatchQuantityChanged("batch1", 25), uow)

    assert [None, "batch2"] == results
    assert [("batch1", "order1", 20), ("batch2", "order2", 20)] == rows(ALLOCATIONS)
    assert [("batch1", 25), ("batch2", 50)] == rows(
        "SELECT reference, purchased_quantity FROM batches ORDER BY reference"
    )
    # two allocations, the change, the reallocation
    assert [(4,)] == rows("SELECT version_number FROM products")


def test_work_without_commit_is_rolled_back(uow: SqlAlchemyAllocationUnitOfWork, rows: Rows) -> None:
    """Changes made in a block that does not commit never reach the database."""
    services.add_batch("b1", "LONELY-STOOL", 10, None, uow)

    with uow:
        product = uow.products.get("LONELY-STOOL")
        assert product is not None
        product.allocate(OrderLine("o1", "LONELY-STOOL", 1))

    assert uow.rolled_back
    assert [] == rows(ALLOCATIONS)
    assert [(0,)] == rows("SELECT version_number FROM products")


def test_get_by_batchref_finds_the_product(uow: SqlAlchemyAllocationUnitOfWork) -> None:
    """get_by_batchref() returns the product of a batch, with an empty events list, or None."""
    services.add_batch("b1", "SCANDI-PEN", 10, None, uow)
    services.add_batch("b2", "SCANDI-PEN", 10, None, uow)
    services.add_batch("b3", "OTHER-PEN", 10, None, uow)

    with uow:
        product = uow.products.get_by_batchref("b2")
        assert product is not None
        assert "SCANDI-PEN" == product.sku
        assert [] == product.events
        assert uow.products.get_by_batchref("nope") is None


def test_a_stale_product_cannot_be_committed(engine: Engine, rows: Rows) -> None:
    """A change made from a copy that another unit of work has since changed fails with StaleDataError."""
    services.add_batch("b1", "RACY-LAMP", 100, None, SqlAlchemyAllocationUnitOfWork(engine))
    slow, fast = SqlAlchemyAllocationUnitOfWork(engine), SqlAlchemyAllocationUnitOfWork(engine)

    with slow:
        stale = slow.products.get("RACY-LAMP")
        assert stale is not None
        stale.allocate(OrderLine("slow-order", "RACY-LAMP", 10))

        assert "b1" == services.allocate("fast-order", "RACY-LAMP", 10, fast)

        with pytest.raises(StaleDataError, match="products"):
            slow.commit()

    assert slow.rolled_back
    assert [("b1", "fast-order", 10)] == rows(ALLOCATIONS)
    assert [(1,)] == rows("SELECT version_number FROM products")


#: Order lines that no batch holds, read with plain SQL.
ORPHANED_LINES = (
    "SELECT o.orderid FROM order_lines o LEFT JOIN allocations a ON a.orderline_id = o.id "
    "WHERE a.id IS NULL ORDER BY o.orderid"
)


def test_reallocation_leaves_no_orphaned_order_line(uow: SqlAlchemyAllocationUnitOfWork, rows: Rows) -> None:
    """A line that comes off a shrunk batch is deleted, and its reallocation writes one row: one row per order."""
    services.add_batch("batch1", "INDIFFERENT-TABLE", 50, None, uow)
    services.add_batch("batch2", "INDIFFERENT-TABLE", 50, date(2030, 1, 1), uow)
    services.allocate("order1", "INDIFFERENT-TABLE", 20, uow)
    services.allocate("order2", "INDIFFERENT-TABLE", 20, uow)

    messagebus.handle(BatchQuantityChanged("batch1", 25), uow)

    assert [("batch1", "order1", 20), ("batch2", "order2", 20)] == rows(ALLOCATIONS)
    assert [("order1",), ("order2",)] == rows("SELECT orderid FROM order_lines ORDER BY orderid")
    assert [] == rows(ORPHANED_LINES)


def test_a_line_that_fits_nowhere_after_a_shrink_leaves_no_row(uow: SqlAlchemyAllocationUnitOfWork, rows: Rows) -> None:
    """A deallocated line that no batch can take is deleted with its allocation; only the kept line remains."""
    services.add_batch("batch1", "LONELY-STOOL", 10, None, uow)
    services.allocate("order1", "LONELY-STOOL", 4, uow)
    services.allocate("order2", "LONELY-STOOL", 6, uow)

    messagebus.handle(BatchQuantityChanged("batch1", 5), uow)

    assert [("batch1", "order1", 4)] == rows(ALLOCATIONS)
    assert [("order1",)] == rows("SELECT orderid FROM order_lines")


def test_add_batch_of_an_existing_reference_raises_and_writes_nothing(
    uow: SqlAlchemyAllocationUnitOfWork, rows: Rows
) -> None:
    """add_batch() of a taken reference raises DuplicateBatch, and neither the batch nor its product is written."""
    services.add_batch("b1", "GARISH-RUG", 100, None, uow)

    with pytest.raises(services.DuplicateBatch, match="^Batch b1 already exists$"):
        services.add_batch("b1", "OTHER-RUG", 5, None, uow)

    assert [("b1", "GARISH-RUG", 100)] == rows("SELECT reference, sku, purchased_quantity FROM batches")
    assert [("GARISH-RUG",)] == rows("SELECT sku FROM products")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda uow: services.add_batch("b2", "SCANDI-PEN", -1, None, uow), "batch b2 must be at least 1, not -1"),
        (lambda uow: services.allocate("o1", "SCANDI-PEN", 0, uow), "order line o1 must be at least 1, not 0"),
        (lambda uow: services.change_batch_quantity("b1", -2, uow), "batch b1 must be at least 0, not -2"),
    ],
    ids=["add_batch", "allocate", "change_batch_quantity"],
)
def test_a_refused_quantity_writes_nothing(
    uow: SqlAlchemyAllocationUnitOfWork,
    rows: Rows,
    call: Callable[[SqlAlchemyAllocationUnitOfWork], object],
    message: str,
) -> None:
    """A quantity the domain refuses raises InvalidQuantity from the service, and the database is unchanged."""
    services.add_batch("b1", "SCANDI-PEN", 10, None, uow)
    services.allocate("o0", "SCANDI-PEN", 3, uow)

    with pytest.raises(InvalidQuantity, match=message):
        call(uow)

    assert [("b1", 10, 1)] == rows(
        "SELECT b.reference, b.purchased_quantity, p.version_number FROM batches b JOIN products p ON p.sku = b.sku"
    )
    assert [("b1", "o0", 3)] == rows(ALLOCATIONS)
