"""Jobs outside requests: a worker loop, a thread pool and asyncio.gather, each job in a unit of work of its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import uow
from tests.integration.conftest import rows
from tests.support.databases import Database
from tests.support.models import Item
from tests.support.uows import (
    AsyncShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    ShopUnitOfWork,
    SqlAlchemyShopUnitOfWork,
)


class JobFailed(Exception):
    """A job that cannot be processed."""


@pytest.fixture(name="async_engine")
async def _async_engine(database: Database, engine: Engine) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(database.async_url)
    yield eng
    assert 0 == eng.pool.checkedout()
    await eng.dispose()


def items(engine: Engine) -> list[tuple[str, int]]:
    return [(str(name), int(qty)) for name, qty in rows(engine, "SELECT name, qty FROM uow_items ORDER BY name")]


def test_worker_loop_commits_each_job_and_survives_failures(engine: Engine) -> None:
    """A worker loop runs every job in its own unit of work: failures roll back alone, and the loop goes on."""
    transactional = uow.transactional(factory=lambda: SqlAlchemyShopUnitOfWork(engine))

    @transactional
    def enqueue(name: str, uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        uow.items.add(Item(name))

    @transactional
    def next_job(uow: ShopUnitOfWork = uow.NEW_UOW) -> int | None:
        queued = uow.items.list(qty=0)
        return queued[0].id if queued else None

    @transactional
    def run(job_id: int, uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        job = uow.items.get(job_id)
        assert job is not None
        job.qty = 1  # done, unless the job fails below and this is rolled back
        if job.name.startswith("bad"):
            raise JobFailed(job.name)

    @transactional
    def give_up(job_id: int, uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        job = uow.items.get(job_id)
        assert job is not None
        job.qty = -1

    for name in ["a", "bad b", "c", "bad d", "e"]:
        enqueue(name)
    handled = 0
    while (job_id := next_job()) is not None:
        try:
            run(job_id)
        except JobFailed:
            give_up(job_id)
        handled += 1

    assert 5 == handled
    assert [("a", 1), ("bad b", -1), ("bad d", -1), ("c", 1), ("e", 1)] == items(engine)
    assert 0 == engine.pool.checkedout()


def test_thread_pool_gives_each_job_its_own_unit_of_work(engine: Engine) -> None:
    """Jobs on a ThreadPoolExecutor each build a unit of work and session of their own; failures roll back alone."""
    seen: list[tuple[int, object, object]] = []  # units and sessions kept alive, so their ids stay unique
    lock = threading.Lock()

    @uow.transactional(factory=lambda: SqlAlchemyShopUnitOfWork(engine))
    def job(n: int, uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        uow.items.add(Item(f"job {n:02d}", n))
        uow.session.flush()
        with lock:
            seen.append((threading.get_ident(), uow, uow.session))
        if n % 4 == 3:
            raise JobFailed(n)

    def run(n: int) -> bool:
        try:
            job(n)
        except JobFailed:
            return False
        return True

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(run, range(32)))

    assert 24 == outcomes.count(True)
    assert [(f"job {n:02d}", n) for n in range(32) if n % 4 != 3] == items(engine)
    assert 32 == len({id(unit) for _, unit, _ in seen})  # a unit of work per job, never shared
    assert 32 == len({id(session) for _, _, session in seen})
    assert 1 < len({thread for thread, _, _ in seen})
    assert 0 == engine.pool.checkedout()


async def test_gathered_coroutines_each_own_a_unit_of_work(engine: Engine, async_engine: AsyncEngine) -> None:
    """asyncio.gather of decorated coroutines: each task owns an async unit of work; a failure rolls back alone."""
    units: list[object] = []

    @uow.transactional(factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine))
    async def job(n: int, uow: AsyncShopUnitOfWork = uow.NEW_UOW) -> int:
        units.append(uow)
        await uow.items.add(Item(f"task {n:02d}", n))
        await asyncio.sleep(0)  # let the other tasks run inside their blocks
        if n % 10 == 9:
            raise JobFailed(n)
        return n

    results = await asyncio.gather(*(job(n) for n in range(40)), return_exceptions=True)

    assert 36 == len([result for result in results if isinstance(result, int)])
    assert 4 == len([result for result in results if isinstance(result, JobFailed)])
    assert [(f"task {n:02d}", n) for n in range(40) if n % 10 != 9] == items(engine)
    assert 40 == len({id(unit) for unit in units})
    with pytest.raises(uow.errors.InactiveUnitOfWorkError):
        uow.current()
