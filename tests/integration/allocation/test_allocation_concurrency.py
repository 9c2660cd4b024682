"""Two allocations to one product at the same moment: the version counter lets exactly one through."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm.exc import StaleDataError

from allocation import services
from allocation.unit_of_work import SqlAlchemyAllocationUnitOfWork

if TYPE_CHECKING:
    from .conftest import Rows

pytestmark = pytest.mark.parametrize(
    "database_url",
    [
        pytest.param("postgresql", marks=pytest.mark.integration),
        pytest.param("mariadb", marks=pytest.mark.integration),
    ],
    indirect=True,
)

TIMEOUT = 30.0


class CommitAtBarrierUnitOfWork(SqlAlchemyAllocationUnitOfWork):
    """Waits at *barrier* before committing, so that every party has loaded before any commits."""

    def __init__(self, engine: Engine, barrier: threading.Barrier) -> None:
        super().__init__(engine)
        self.barrier = barrier

    def commit(self) -> None:
        self.barrier.wait()
        super().commit()


def test_concurrent_allocations_to_one_product_let_exactly_one_through(engine: Engine, rows: Rows) -> None:
    """Of two simultaneous allocations against one product version, one commits and one gets StaleDataError."""
    sku = "CONTENDED-SOFA"
    services.add_batch("batch1", sku, 100, None, SqlAlchemyAllocationUnitOfWork(engine))
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    outcomes: dict[str, object] = {}

    def allocate(orderid: str) -> None:
        uow = CommitAtBarrierUnitOfWork(engine, barrier)
        try:
            outcomes[orderid] = services.allocate(orderid, sku, 10, uow)
        except BaseException as error:  # the test thread inspects every outcome
            outcomes[orderid] = error
            barrier.abort()

    threads = [threading.Thread(target=allocate, args=(orderid,)) for orderid in ("order1", "order2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert [False, False] == [thread.is_alive() for thread in threads]

    winners = sorted(orderid for orderid, outcome in outcomes.items() if outcome == "batch1")
    losers = sorted(orderid for orderid, outcome in outcomes.items() if isinstance(outcome, StaleDataError))
    assert (1, 1) == (len(winners), len(losers)), outcomes
    [winner], [loser] = winners, losers

    assert [(1,)] == rows("SELECT version_number FROM products WHERE sku = :sku", sku=sku)
    assert [("batch1", winner, 10)] == rows(
        "SELECT b.reference, o.orderid, o.qty FROM allocations a "
        "JOIN batches b ON b.id = a.batch_id JOIN order_lines o ON o.id = a.orderline_id"
    )
    assert [(winner,)] == rows("SELECT orderid FROM order_lines")

    # The loser only has to try again.
    assert "batch1" == services.allocate(loser, sku, 10, SqlAlchemyAllocationUnitOfWork(engine))
    assert [(2,)] == rows("SELECT version_number FROM products WHERE sku = :sku", sku=sku)
    assert sorted([(winner,), (loser,)]) == rows(
        "SELECT o.orderid FROM allocations a JOIN order_lines o ON o.id = a.orderline_id ORDER BY o.orderid"
    )
