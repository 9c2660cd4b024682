"""The allocation domain on its own: batches, order lines and the Product aggregate."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from allocation.domain import Allocated, AllocationRequired, Batch, InvalidQuantity, OrderLine, OutOfStock, Product

today = date.today()
tomorrow = today + timedelta(days=1)
later = today + timedelta(days=10)


def make_batch_and_line(sku: str, batch_qty: int, line_qty: int) -> tuple[Batch, OrderLine]:
    return Batch("batch-001", sku, batch_qty, eta=today), OrderLine("order-123", sku, line_qty)


def test_allocating_to_a_batch_reduces_the_available_quantity() -> None:
    """Allocating a line takes its quantity off the batch."""
    batch = Batch("batch-001", "SMALL-TABLE", 20, eta=today)

    batch.allocate(OrderLine("order-ref", "SMALL-TABLE", 2))

    assert 18 == batch.available_quantity


def test_can_allocate_if_available_greater_than_required() -> None:
    """A batch with more stock than the line needs can take it."""
    batch, line = make_batch_and_line("ELEGANT-LAMP", 20, 2)
    assert batch.can_allocate(line)


def test_can_allocate_if_available_equal_to_required() -> None:
    """A batch with exactly the stock the line needs can take it."""
    batch, line = make_batch_and_line("ELEGANT-LAMP", 2, 2)
    assert batch.can_allocate(line)


def test_cannot_allocate_if_available_smaller_than_required() -> None:
    """A batch with less stock than the line needs cannot take it."""
    batch, line = make_batch_and_line("ELEGANT-LAMP", 2, 20)
    assert not batch.can_allocate(line)


def test_cannot_allocate_if_skus_do_not_match() -> None:
    """A batch only takes lines of its own SKU."""
    batch = Batch("batch-001", "UNCOMFORTABLE-CHAIR", 100, eta=None)
    assert not batch.can_allocate(OrderLine("order-123", "EXPENSIVE-TOASTER", 10))


def test_allocation_is_idempotent() -> None:
    """Allocating the same line twice counts it once."""
    batch, line = make_batch_and_line("ANGULAR-DESK", 20, 2)

    batch.allocate(line)
    batch.allocate(line)

    assert 18 == batch.available_quantity


def test_deallocate_one_takes_back_the_latest_line() -> None:
    """deallocate_one() returns the most recently allocated line and frees its quantity."""
    batch = Batch("batch-001", "ANGULAR-DESK", 20, eta=None)
    first, second = OrderLine("o1", "ANGULAR-DESK", 2), OrderLine("o2", "ANGULAR-DESK", 5)
    batch.allocate(first)
    batch.allocate(second)

    assert second is batch.deallocate_one()
    assert [first] == batch.allocations
    assert 18 == batch.available_quantity


def test_prefers_current_stock_batches_to_shipments() -> None:
    """A product allocates from warehouse stock before a shipment."""
    in_stock = Batch("in-stock-batch", "RETRO-CLOCK", 100, eta=None)
    shipment = Batch("shipment-batch", "RETRO-CLOCK", 100, eta=tomorrow)
    product = Product("RETRO-CLOCK", [shipment, in_stock])

    product.allocate(OrderLine("oref", "RETRO-CLOCK", 10))

    assert 90 == in_stock.available_quantity
    assert 100 == shipment.available_quantity


def test_prefers_earlier_batches() -> None:
    """Among shipments, a product allocates from the one that arrives first."""
    earliest = Batch("speedy-batch", "MINIMALIST-SPOON", 100, eta=today)
    medium = Batch("normal-batch", "MINIMALIST-SPOON", 100, eta=tomorrow)
    latest = Batch("slow-batch", "MINIMALIST-SPOON", 100, eta=later)
    product = Product("MINIMALIST-SPOON", [medium, earliest, latest])

    product.allocate(OrderLine("order1", "MINIMALIST-SPOON", 10))

    assert 90 == earliest.available_quantity
    assert 100 == medium.available_quantity
    assert 100 == latest.available_quantity


def test_allocate_returns_the_batch_reference() -> None:
    """Product.allocate() returns the reference of the batch it chose."""
    in_stock = Batch("in-stock-batch-ref", "HIGHBROW-POSTER", 100, eta=None)
    shipment = Batch("shipment-batch-ref", "HIGHBROW-POSTER", 100, eta=tomorrow)
    product = Product("HIGHBROW-POSTER", [in_stock, shipment])

    assert in_stock.reference == product.allocate(OrderLine("oref", "HIGHBROW-POSTER", 10))


def test_records_out_of_stock_event_if_cannot_allocate() -> None:
    """A product with no batch that fits returns None and records OutOfStock."""
    product = Product("SMALL-FORK", [Batch("batch1", "SMALL-FORK", 10, eta=today)])
    product.allocate(OrderLine("order1", "SMALL-FORK", 10))
    product.events.clear()  # the allocation's own event

    assert product.allocate(OrderLine("order2", "SMALL-FORK", 1)) is None
    assert [OutOfStock("SMALL-FORK")] == product.events


def test_an_allocation_records_allocated_with_its_batch() -> None:
    """A successful allocation records Allocated, naming the order line and the batch that took it."""
    product = Product("SCANDI-PEN", [Batch("b1", "SCANDI-PEN", 10, eta=None)])

    product.allocate(OrderLine("o1", "SCANDI-PEN", 4))

    assert [Allocated("o1", "SCANDI-PEN", 4, "b1")] == product.events


def test_allocate_increments_the_version_number() -> None:
    """Each allocation bumps the product's version by one; a failed one does not."""
    product = Product("SCANDI-PEN", [Batch("b1", "SCANDI-PEN", 10, eta=None)], version_number=7)

    product.allocate(OrderLine("oref", "SCANDI-PEN", 10))
    product.allocate(OrderLine("oref2", "SCANDI-PEN", 10))

    assert 8 == product.version_number


def test_change_batch_quantity_deallocates_and_requires_reallocation() -> None:
    """Shrinking a batch deallocates lines until it fits and records AllocationRequired for each."""
    batch = Batch("batch1", "INDIFFERENT-TABLE", 50, eta=None)
    product = Product("INDIFFERENT-TABLE", [batch])
    for orderid in ("order1", "order2", "order3"):
        product.allocate(OrderLine(orderid, "INDIFFERENT-TABLE", 10))
    product.events.clear()  # the allocations' own events

    product.change_batch_quantity("batch1", 15)

    assert 5 == batch.available_quantity
    assert ["order1"] == [line.orderid for line in batch.allocations]
    assert [
        AllocationRequired("order3", "INDIFFERENT-TABLE", 10),
        AllocationRequired("order2", "INDIFFERENT-TABLE", 10),
    ] == product.events
    assert 4 == product.version_number


def test_change_batch_quantity_keeps_lines_that_still_fit() -> None:
    """Growing a batch deallocates nothing and records no event."""
    batch = Batch("batch1", "INDIFFERENT-TABLE", 50, eta=None)
    product = Product("INDIFFERENT-TABLE", [batch])
    product.allocate(OrderLine("order1", "INDIFFERENT-TABLE", 20))
    product.events.clear()  # the allocation's own event

    product.change_batch_quantity("batch1", 60)

    assert 40 == batch.available_quantity
    assert [] == product.events


def test_change_batch_quantity_of_an_unknown_batch_raises() -> None:
    """A product refuses to change a batch it does not have, and records nothing."""
    product = Product("INDIFFERENT-TABLE", [Batch("batch1", "INDIFFERENT-TABLE", 50, eta=None)])

    with pytest.raises(LookupError, match="product INDIFFERENT-TABLE has no batch batch2"):
        product.change_batch_quantity("batch2", 10)
    assert (0, []) == (product.version_number, product.events)


@pytest.mark.parametrize("qty", [0, -1])
def test_an_order_line_of_less_than_one_unit_is_refused(qty: int) -> None:
    """An order line of zero or fewer units raises InvalidQuantity, naming the line."""
    with pytest.raises(InvalidQuantity, match=f"^the quantity of order line o1 must be at least 1, not {qty}$"):
        OrderLine("o1", "SCANDI-PEN", qty)


@pytest.mark.parametrize("qty", [0, -5])
def test_a_new_batch_of_less_than_one_unit_is_refused(qty: int) -> None:
    """A batch created with zero or fewer units raises InvalidQuantity, naming the batch."""
    with pytest.raises(InvalidQuantity, match=f"^the quantity of batch b1 must be at least 1, not {qty}$"):
        Batch("b1", "SCANDI-PEN", qty, eta=None)


def test_change_batch_quantity_to_a_negative_quantity_is_refused_and_changes_nothing() -> None:
    """A product refuses a negative batch quantity: the batch, its lines, the version and the events stay."""
    batch = Batch("batch1", "INDIFFERENT-TABLE", 50, eta=None)
    product = Product("INDIFFERENT-TABLE", [batch])
    product.allocate(OrderLine("order1", "INDIFFERENT-TABLE", 20))
    product.events.clear()  # the allocation's own event

    with pytest.raises(InvalidQuantity, match="^the quantity of batch batch1 must be at least 0, not -1$"):
        product.change_batch_quantity("batch1", -1)
    assert (50, ["order1"], 1, []) == (
        batch.purchased_quantity,
        [line.orderid for line in batch.allocations],
        product.version_number,
        product.events,
    )


def test_change_batch_quantity_to_zero_deallocates_every_line() -> None:
    """A batch whose stock is lost (quantity 0) gives back every line for reallocation."""
    batch = Batch("batch1", "INDIFFERENT-TABLE", 50, eta=None)
    product = Product("INDIFFERENT-TABLE", [batch])
    product.allocate(OrderLine("order1", "INDIFFERENT-TABLE", 20))
    product.events.clear()  # the allocation's own event

    product.change_batch_quantity("batch1", 0)

    assert ([], [AllocationRequired("order1", "INDIFFERENT-TABLE", 20)]) == (batch.allocations, product.events)
