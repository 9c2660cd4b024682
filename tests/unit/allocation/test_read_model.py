"""The allocation service publishes Allocated through the outbox, and the read model's consumer records it once."""

from __future__ import annotations

import json

from allocation import read_model, services
from allocation.domain import Allocated
from allocation.unit_of_work import FakeAllocationUnitOfWork


def test_an_allocation_publishes_allocated_keyed_by_its_order() -> None:
    """A committed allocation puts Allocated in the outbox, keyed by the order; an out-of-stock one puts nothing."""
    uow = FakeAllocationUnitOfWork()
    services.add_batch("b1", "LAMP", 10, None, uow)
    assert "b1" == services.allocate("o1", "LAMP", 4, uow)
    assert services.allocate("o2", "LAMP", 40, uow) is None
    assert [("allocation.allocated", "o1", Allocated("o1", "LAMP", 4, "b1"))] == [
        (message.topic, message.key, message.payload) for message in uow.published
    ]


def test_the_read_model_records_each_allocation_once_and_follows_a_reallocation() -> None:
    """A copy of a message changes nothing; a later allocation of the same line moves it to its new batch."""
    uow = FakeAllocationUnitOfWork()
    first = json.dumps({"orderid": "o1", "sku": "LAMP", "qty": 4, "batchref": "b1"}).encode()
    assert read_model.add_allocation("m1", first, uow)
    assert not read_model.add_allocation("m1", first, uow)
    moved = json.dumps({"orderid": "o1", "sku": "LAMP", "qty": 4, "batchref": "b2"}).encode()
    assert read_model.add_allocation("m2", moved, uow)
    assert {"LAMP": "b2"} == read_model.allocations_of("o1", uow)
