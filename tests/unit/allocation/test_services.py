"""The service layer and the message bus through the fake unit of work."""

from __future__ import annotations

from datetime import date

import pytest
from pytest_mock import MockerFixture
from sqlalchemy.orm.exc import StaleDataError

from allocation import messagebus, services
from allocation.domain import (
    Allocated,
    AllocationRequired,
    BatchQuantityChanged,
    InvalidQuantity,
    OrderLine,
    OutOfStock,
    Product,
)
from allocation.unit_of_work import FakeAllocationUnitOfWork
from uow import errors as uow_errors


@pytest.fixture
def uow() -> FakeAllocationUnitOfWork:
    return FakeAllocationUnitOfWork()


def product(uow: FakeAllocationUnitOfWork, sku: str) -> Product:
    """The committed state of product *sku*, read in a block of its own."""
    with uow:
        found = uow.products.get(sku)
    assert found is not None
    return found


def allocations(uow: FakeAllocationUnitOfWork, sku: str) -> dict[str, list[str]]:
    """The order ids allocated to each batch of *sku*, as committed, read inside a block as a database needs."""
    with uow:
        found = uow.products.get(sku)
        assert found is not None
        return {batch.reference: [line.orderid for line in batch.allocations] for batch in found.batches}


def references(uow: FakeAllocationUnitOfWork, sku: str) -> list[str]:
    """The references of the batches of *sku*, as committed."""
    return list(allocations(uow, sku))


def test_add_batch_for_new_product(uow: FakeAllocationUnitOfWork) -> None:
    """add_batch() creates the product of a new SKU and commits."""
    services.add_batch("b1", "CRUNCHY-ARMCHAIR", 100, None, uow)

    assert ["b1"] == references(uow, "CRUNCHY-ARMCHAIR")
    assert 1 == uow.commits


def test_add_batch_for_existing_product(uow: FakeAllocationUnitOfWork) -> None:
    """add_batch() adds a second batch to the product that exists."""
    services.add_batch("b1", "GARISH-RUG", 100, None, uow)
    services.add_batch("b2", "GARISH-RUG", 99, None, uow)

    assert ["b1", "b2"] == references(uow, "GARISH-RUG")
    with uow:
        assert 1 == uow.products.count()


def test_allocate_returns_allocation(uow: FakeAllocationUnitOfWork) -> None:
    """allocate() returns the reference of the batch it allocated to."""
    services.add_batch("batch1", "COMPLICATED-LAMP", 100, None, uow)

    assert "batch1" == services.allocate("o1", "COMPLICATED-LAMP", 10, uow)


def test_allocate_errors_for_invalid_sku(uow: FakeAllocationUnitOfWork) -> None:
    """allocate() raises InvalidSku for a SKU with no product and commits nothing."""
    services.add_batch("b1", "AREALSKU", 100, None, uow)

    with pytest.raises(services.InvalidSku, match="Invalid sku NONEXISTENTSKU"):
        services.allocate("o1", "NONEXISTENTSKU", 10, uow)
    assert not uow.committed
    assert 1 == uow.commits


def test_allocate_commits(uow: FakeAllocationUnitOfWork) -> None:
    """allocate() commits the allocation and the new version of the product."""
    services.add_batch("b1", "OMINOUS-MIRROR", 100, None, uow)

    services.allocate("o1", "OMINOUS-MIRROR", 10, uow)

    assert uow.committed
    assert {"b1": ["o1"]} == allocations(uow, "OMINOUS-MIRROR")
    assert 1 == product(uow, "OMINOUS-MIRROR").version_number


def test_allocate_commits_once(uow: FakeAllocationUnitOfWork, mocker: MockerFixture) -> None:
    """allocate() commits exactly once."""
    services.add_batch("b1", "OMINOUS-MIRROR", 100, None, uow)
    commit = mocker.spy(uow, "commit")

    services.allocate("o1", "OMINOUS-MIRROR", 10, uow)

    commit.assert_called_once_with()


def test_prefers_warehouse_batches_to_shipments(uow: FakeAllocationUnitOfWork) -> None:
    """allocate() takes warehouse stock before a shipment."""
    services.add_batch("in-stock-batch", "RETRO-CLOCK", 100, None, uow)
    services.add_batch("shipment-batch", "RETRO-CLOCK", 100, date(2030, 1, 1), uow)

    services.allocate("oref", "RETRO-CLOCK", 10, uow)

    assert {"in-stock-batch": ["oref"], "shipment-batch": []} == allocations(uow, "RETRO-CLOCK")


def test_allocate_out_of_stock_returns_none_and_publishes_event(uow: FakeAllocationUnitOfWork) -> None:
    """allocate() returns None when nothing fits, and the commit publishes OutOfStock."""
    services.add_batch("b1", "POP-ART-VASE", 5, None, uow)

    assert services.allocate("o1", "POP-ART-VASE", 10, uow) is None
    assert [OutOfStock("POP-ART-VASE")] == list(uow.collect_new_events())
    assert 0 == product(uow, "POP-ART-VASE").version_number


def test_change_batch_quantity_changes_available_quantity(uow: FakeAllocationUnitOfWork) -> None:
    """A BatchQuantityChanged through the bus sets the batch's purchased quantity."""
    services.add_batch("batch1", "ADORABLE-SETTEE", 100, None, uow)

    messagebus.handle(BatchQuantityChanged("batch1", 50), uow)

    with uow:
        [batch] = uow.products.get("ADORABLE-SETTEE").batches
        assert 50 == batch.available_quantity


def test_change_batch_quantity_reallocates_via_events(uow: FakeAllocationUnitOfWork) -> None:
    """Shrinking a batch through the bus moves its deallocated lines to another batch."""
    services.add_batch("batch1", "INDIFFERENT-TABLE", 50, None, uow)
    services.add_batch("batch2", "INDIFFERENT-TABLE", 50, date.today(), uow)
    services.allocate("order1", "INDIFFERENT-TABLE", 20, uow)
    services.allocate("order2", "INDIFFERENT-TABLE", 20, uow)
    assert {"batch1": ["order1", "order2"], "batch2": []} == allocations(uow, "INDIFFERENT-TABLE")

    results = messagebus.handle(BatchQuantityChanged("batch1", 25), uow)

    assert [None, "batch2"] == results
    assert {"batch1": ["order1"], "batch2": ["order2"]} == allocations(uow, "INDIFFERENT-TABLE")
    assert [] == list(uow.collect_new_events())


def test_change_batch_quantity_alone_leaves_the_events_to_the_bus(uow: FakeAllocationUnitOfWork) -> None:
    """The change_batch_quantity() service commits the deallocation and publishes AllocationRequired."""
    services.add_batch("batch1", "INDIFFERENT-TABLE", 50, None, uow)
    services.allocate("order1", "INDIFFERENT-TABLE", 20, uow)
    assert [Allocated("order1", "INDIFFERENT-TABLE", 20, "batch1")] == list(uow.collect_new_events())

    services.change_batch_quantity("batch1", 10, uow)

    assert [AllocationRequired("order1", "INDIFFERENT-TABLE", 20)] == list(uow.collect_new_events())
    assert {"batch1": []} == allocations(uow, "INDIFFERENT-TABLE")


def test_change_batch_quantity_errors_for_unknown_batch(uow: FakeAllocationUnitOfWork) -> None:
    """change_batch_quantity() raises UnknownBatch for a reference that no batch has."""
    services.add_batch("batch1", "INDIFFERENT-TABLE", 50, None, uow)

    with pytest.raises(services.UnknownBatch, match="Unknown batch nope"):
        services.change_batch_quantity("nope", 10, uow)
    assert not uow.committed


def test_reallocation_that_finds_no_stock_publishes_out_of_stock(uow: FakeAllocationUnitOfWork) -> None:
    """A deallocated line that fits nowhere else ends as an OutOfStock event, handled by the bus."""
    services.add_batch("batch1", "LONELY-STOOL", 10, None, uow)
    services.allocate("order1", "LONELY-STOOL", 10, uow)

    results = messagebus.handle(BatchQuantityChanged("batch1", 5), uow)

    assert [None, None, None] == results
    assert {"batch1": []} == allocations(uow, "LONELY-STOOL")
    assert [] == list(uow.collect_new_events())


def test_events_of_rolled_back_work_are_dropped(uow: FakeAllocationUnitOfWork) -> None:
    """Events raised in a block that does not commit never reach the bus."""
    services.add_batch("batch1", "LONELY-STOOL", 10, None, uow)

    with uow:
        found = uow.products.get("LONELY-STOOL")
        assert found is not None
        found.change_batch_quantity("batch1", 0)
        found.allocate(OrderLine("o1", "LONELY-STOOL", 1))

    assert uow.rolled_back
    assert [] == list(uow.collect_new_events())


def test_the_fake_refuses_the_loser_of_two_concurrent_allocations(uow: FakeAllocationUnitOfWork) -> None:
    """Two transactions allocate from one product: the second commit raises StaleDataError, as on the database."""
    services.add_batch("b1", "TWIN-LAMP", 10, None, uow)
    with uow:
        loser = uow.products.get("TWIN-LAMP")
        assert loser is not None
        with uow.transaction(propagation="requires_new"):
            winner = uow.products.get("TWIN-LAMP")
            assert winner is not None
            winner.allocate(OrderLine("o1", "TWIN-LAMP", 3))
            uow.commit()
        loser.allocate(OrderLine("o2", "TWIN-LAMP", 4))
        with pytest.raises(StaleDataError):
            uow.commit()
    assert {"b1": ["o1"]} == allocations(uow, "TWIN-LAMP")


def test_add_batch_of_an_existing_reference_raises_and_commits_nothing(uow: FakeAllocationUnitOfWork) -> None:
    """add_batch() of a reference that another batch has raises DuplicateBatch, and the first batch stays alone."""
    services.add_batch("b1", "GARISH-RUG", 100, None, uow)

    with pytest.raises(services.DuplicateBatch, match="^Batch b1 already exists$"):
        services.add_batch("b1", "OTHER-RUG", 5, None, uow)
    assert (False, 1) == (uow.committed, uow.commits)
    assert {"b1": []} == allocations(uow, "GARISH-RUG")
    with uow:
        assert uow.products.get("OTHER-RUG") is None


def test_add_batch_of_no_units_raises_and_commits_nothing(uow: FakeAllocationUnitOfWork) -> None:
    """add_batch() of zero units raises InvalidQuantity and creates no product."""
    with pytest.raises(InvalidQuantity, match="batch b1 must be at least 1, not 0"):
        services.add_batch("b1", "GARISH-RUG", 0, None, uow)
    assert 0 == uow.commits
    with uow:
        assert 0 == uow.products.count()


def test_allocate_of_a_negative_quantity_raises_and_commits_nothing(uow: FakeAllocationUnitOfWork) -> None:
    """allocate() of a negative quantity raises InvalidQuantity; the batch keeps all its stock."""
    services.add_batch("b1", "OMINOUS-MIRROR", 100, None, uow)

    with pytest.raises(InvalidQuantity, match="order line o1 must be at least 1, not -3"):
        services.allocate("o1", "OMINOUS-MIRROR", -3, uow)
    assert 1 == uow.commits
    assert {"b1": []} == allocations(uow, "OMINOUS-MIRROR")
    assert 0 == product(uow, "OMINOUS-MIRROR").version_number


def test_change_batch_quantity_to_a_negative_quantity_raises_and_commits_nothing(
    uow: FakeAllocationUnitOfWork,
) -> None:
    """change_batch_quantity() to a negative quantity raises InvalidQuantity; the batch and its lines stay."""
    services.add_batch("batch1", "INDIFFERENT-TABLE", 50, None, uow)
    services.allocate("order1", "INDIFFERENT-TABLE", 20, uow)

    with pytest.raises(InvalidQuantity, match="batch batch1 must be at least 0, not -1"):
        messagebus.handle(BatchQuantityChanged("batch1", -1), uow)
    assert 2 == uow.commits
    assert {"batch1": ["order1"]} == allocations(uow, "INDIFFERENT-TABLE")
    with uow:
        [batch] = uow.products.get("INDIFFERENT-TABLE").batches
        assert 50 == batch.purchased_quantity


def test_batches_of_pages_the_batches_of_a_sku_in_allocation_order() -> None:
    """batches_of() lists a SKU's batches, warehouse stock first and then by ETA, a page at a time, with the total."""
    uow = FakeAllocationUnitOfWork()
    services.add_batch("ship-late", "LAMP", 10, date(2027, 3, 1), uow)
    services.add_batch("ship-soon", "LAMP", 10, date(2027, 1, 1), uow)
    services.add_batch("shelf", "LAMP", 10, None, uow)
    services.add_batch("other", "DESK", 10, None, uow)
    first = services.batches_of("LAMP", uow, limit=2)
    assert (["shelf", "ship-soon"], 3) == ([b.reference for b in first.items], first.total)
    rest = services.batches_of("LAMP", uow, limit=2, after=first.next)
    assert (["ship-late"], None) == ([b.reference for b in rest.items], rest.next)
    with pytest.raises(uow_errors.QueryError):
        services.batches_of("LAMP", uow, limit=0)
