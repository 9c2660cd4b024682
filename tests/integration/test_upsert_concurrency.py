"""Upserts from many threads at once on PostgreSQL and MariaDB: each key is inserted once, and nothing fails."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine, text

from tests.support.models import Sku
from tests.support.uows import SqlAlchemyShopUnitOfWork

THREADS = 8
KEYS = 50
CALLS = 200


@pytest.mark.parametrize("database", ["postgresql", "mariadb"], indirect=True)
@pytest.mark.parametrize("operation", ["upsert", "get_or_create"])
def test_threads_upserting_the_same_keys_insert_each_once(engine: Engine, operation: str) -> None:
    """8 threads upserting the same 50 keys 200 times each leave exactly 50 rows, and no call fails."""
    failures: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(thread: int) -> None:
        uow = SqlAlchemyShopUnitOfWork(engine)
        start.wait()
        for call in range(CALLS):
            code = f"k{(call * 7 + thread) % KEYS}"
            try:
                with uow:
                    method = uow.skus.upsert if operation == "upsert" else uow.skus.get_or_create
                    found = method(Sku(code, f"thread {thread}", call))
                    assert code == (found[0] if isinstance(found, tuple) else found).code
                    uow.commit()
            except BaseException as error:  # every failure is collected and reported
                failures.append(error)

    workers = [threading.Thread(target=work, args=(thread,)) for thread in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [] == failures
    with engine.connect() as connection:
        counted = connection.execute(text("SELECT count(*), count(DISTINCT code) FROM uow_skus")).one()
    assert (KEYS, KEYS) == tuple(counted)
