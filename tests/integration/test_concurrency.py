"""Units of work under concurrency and failure on real databases: locks, retries, isolation, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from tests.integration.conftest import rows
from tests.support.databases import Database, Provisioner
from tests.support.models import Item, Sku, skus
from tests.support.threads import TaskBarrier, checked_out, counting, database_errors, run_threads
from tests.support.uows import (
    AsyncShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    ShopUnitOfWork,
    SqlAlchemyShopUnitOfWork,
)
from uow import NEW_UOW, Retry, current, transactional

#: How long a thread, a barrier or a task may wait before the test gives up on it: a hang guard, never asserted.
TIMEOUT = 60.0

#: The error a second connection gets when it cannot lock a row that another transaction holds.
LOCK_NOT_AVAILABLE = {"postgresql": "55P03", "mysql": 1205}

#: The error of the victim of a deadlock.
DEADLOCK = {"postgresql": "40P01", "mysql": 1213}


#: How a retry warning numbers the retry: "retry 3 of 50".
RETRY_NUMBER = re.compile(r" retry (\d+) of \d+ ")


class Boom(Exception):
    """Raised inside a block to make it fail."""


class Injected(Exception):
    """Raised by an event listener, standing for a failure of the database or the network."""


# -- helpers ------------------------------------------------------------------


def seed(eng: Engine, *codes: str) -> None:
    """Commit a sku with stock 0 for each of *codes*."""
    with eng.begin() as conn:
        conn.execute(skus.insert(), [{"code": code, "description": "", "stock": 0} for code in codes])


def item_names(eng: Engine) -> list[str]:
    """The names of the committed items, sorted, read through a separate connection."""
    return [str(name) for (name,) in rows(eng, "SELECT name FROM uow_items ORDER BY name")]


def error_code(eng: Engine, error: BaseException) -> object:
    """The database's code for *error*: the SQLSTATE on PostgreSQL, the error number on MariaDB."""
    assert isinstance(error, DBAPIError), error
    if eng.dialect.name == "postgresql":
        return getattr(error.orig, "sqlstate", None)
    return error.orig.args[0]


def lock_from_outside(eng: Engine, code: str) -> None:
    """Lock sku *code* from a second connection and let it go; raise if another transaction holds it.

    PostgreSQL fails at once (NOWAIT); MariaDB waits one second for the lock
    (error 1205); SQLite locks the whole file with a write.
    """
    with eng.connect() as conn:
        if eng.dialect.name == "postgresql":
            conn.execute(text("SELECT code FROM uow_skus WHERE code = :code FOR UPDATE NOWAIT"), {"code": code})
        elif eng.dialect.name == "mysql":
            conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
            try:
                conn.execute(text("SELECT code FROM uow_skus WHERE code = :code FOR UPDATE"), {"code": code})
            finally:
                conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = DEFAULT")
        else:
            conn.execute(text("UPDATE uow_skus SET stock = stock WHERE code = :code"), {"code": code})


def assert_locked(eng: Engine, code: str) -> None:
    """A second connection cannot lock sku *code*: another transaction holds it."""
    with pytest.raises(OperationalError) as caught:
        lock_from_outside(eng, code)
    assert LOCK_NOT_AVAILABLE[eng.dialect.name] == error_code(eng, caught.value)


def for_update(code: str) -> Any:
    """SELECT the sku *code* FOR UPDATE (on SQLite, which has no row locks, a plain SELECT)."""
    return select(Sku).where(Sku.code == code).with_for_update()


def lock(session: Session, code: str) -> Sku:
    """Lock sku *code* in *session*'s transaction and return it."""
    return session.scalars(for_update(code)).one()


async def alock(session: AsyncSession, code: str) -> Sku:
    """Lock sku *code* in *session*'s transaction and return it."""
    return (await session.scalars(for_update(code))).one()


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The WARNING records of logger "uow" that announce a retry."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "uow" and record.levelno == logging.WARNING and " retry " in record.getMessage()
    ]


def deepest_retry(caplog: pytest.LogCaptureFixture) -> int:
    """The highest retry number that any one call reached, from the retry warnings."""
    return max((int(found[1]) for found in map(RETRY_NUMBER.search, retry_warnings(caplog)) if found), default=0)


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(name="async_engine")
async def _async_engine(database: Database, engine: Engine, provisioner: Provisioner) -> AsyncIterator[AsyncEngine]:
    """An async engine (asyncpg, aiomysql, aiosqlite) on the run's database, with the tables emptied."""
    eng = create_async_engine(database.async_url)
    provisioner.track(eng.sync_engine)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture(name="own_engine")
def _own_engine(database: Database, engine: Engine, provisioner: Provisioner) -> Iterator[Engine]:
    """A sync engine of the test's own, so that the listeners it gets die with it."""
    eng = provisioner.track(database.engine())
    try:
        yield eng
    finally:
        eng.dispose()


# -- 1. a decorated call inside an owner's block keeps its transaction and locks --


@pytest.mark.parametrize("database", ["postgresql", "mariadb"], indirect=True)
@pytest.mark.parametrize("pass_uow", [False, True], ids=["joined", "passed"])
def test_decorated_call_in_a_block_keeps_the_transaction_and_its_lock(engine: Engine, pass_uow: bool) -> None:
    """A @transactional function called inside `with uow:` neither commits nor releases the owner's row lock."""
    seed(engine, "locked")
    unit = SqlAlchemyShopUnitOfWork(engine)

    @transactional
    def touch(name: str, uow: ShopUnitOfWork = NEW_UOW) -> tuple[object, object, int]:
        uow.items.add(Item(name))
        sku = uow.skus.get("locked")
        assert sku is not None
        return uow, current(), sku.stock

    with unit:
        unit.items.add(Item("outer"))
        unit.session.flush()
        lock(unit.session, "locked")
        joined, active, stock = touch("inner", uow=unit) if pass_uow else touch("inner")

        assert (unit, unit, 0) == (joined, active, stock)
        assert (True, 0, False) == (unit.active, unit.commits, unit.committed)
        assert [] == item_names(engine)
        assert_locked(engine, "locked")

        unit.commit()
        lock_from_outside(engine, "locked")
    assert ["inner", "outer"] == item_names(engine)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("pass_uow", [False, True], ids=["joined", "passed"])
def test_decorated_call_in_a_block_keeps_the_sqlite_write_lock(engine: Engine, pass_uow: bool) -> None:
    """On SQLite, a @transactional call inside `with uow:` neither commits nor releases the write lock."""
    unit = SqlAlchemyShopUnitOfWork(engine)

    @transactional
    def touch(name: str, uow: ShopUnitOfWork = NEW_UOW) -> object:
        uow.items.add(Item(name))
        uow.session.flush()
        return uow

    with unit:
        unit.items.add(Item("outer"))
        unit.session.flush()  # the block now holds SQLite's write lock
        assert unit is (touch("inner", uow=unit) if pass_uow else touch("inner"))
        assert (True, 0) == (unit.active, unit.commits)
        assert [] == item_names(engine)
        with (
            contextlib.closing(sqlite3.connect(str(engine.url.database), timeout=0)) as outside,
            pytest.raises(sqlite3.OperationalError, match="database is locked"),
        ):
            outside.execute("INSERT INTO uow_items (name, qty) VALUES ('outside', 0)")
        unit.commit()
    assert ["inner", "outer"] == item_names(engine)


@pytest.mark.parametrize("database", ["postgresql", "mariadb"], indirect=True)
@pytest.mark.parametrize("pass_uow", [False, True], ids=["joined", "passed"])
async def test_async_decorated_call_in_a_block_keeps_the_transaction_and_its_lock(
    engine: Engine, async_engine: AsyncEngine, pass_uow: bool
) -> None:
    """An async @transactional function called inside `async with uow:` neither commits nor releases the lock."""
    seed(engine, "locked")
    unit = AsyncSqlAlchemyShopUnitOfWork(async_engine)

    @transactional
    async def touch(name: str, uow: AsyncShopUnitOfWork = NEW_UOW) -> tuple[object, object, int]:
        await uow.items.add(Item(name))
        sku = await uow.skus.get("locked")
        assert sku is not None
        return uow, current(), sku.stock

    async with unit:
        await unit.items.add(Item("outer"))
        await unit.session.flush()
        await alock(unit.session, "locked")
        joined, active, stock = await (touch("inner", uow=unit) if pass_uow else touch("inner"))

        assert (unit, unit, 0) == (joined, active, stock)
        assert (True, 0, False) == (unit.active, unit.commits, unit.committed)
        assert [] == item_names(engine)
        assert_locked(engine, "locked")

        await unit.commit()
        lock_from_outside(engine, "locked")
    assert ["inner", "outer"] == item_names(engine)


# -- 2. serialization failures are retried until the total is exact ------------


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_serializable_increments_from_threads_retry_to_the_exact_total(
    own_engine: Engine, caplog: pytest.LogCaptureFixture, record_property: Callable[[str, object], None]
) -> None:
    """8 threads x 25 SERIALIZABLE increments of one row reach 200; every serialization failure was retried once."""
    caplog.set_level(logging.WARNING, logger="uow")
    seed(own_engine, "counter")
    seen = database_errors(own_engine)
    retried: list[BaseException] = []
    barrier = threading.Barrier(8, timeout=TIMEOUT)

    @transactional(
        factory=lambda: SqlAlchemyShopUnitOfWork(own_engine),
        isolation_level="SERIALIZABLE",
        retries=Retry(retries=50, backoff=0.001, max_backoff=0.05, retry_if=counting(retried)),
    )
    def increment(uow: ShopUnitOfWork = NEW_UOW) -> None:
        sku = uow.skus.get("counter")
        assert sku is not None
        sku.stock += 1

    def worker(_: int) -> None:
        barrier.wait()
        for _ in range(25):
            increment()

    run_threads(8, worker)

    record_property("retries", len(retried))
    record_property("deepest_retry", deepest_retry(caplog))
    failures = [error for error in seen if getattr(error, "sqlstate", None) == "40001"]
    assert [(200,)] == rows(own_engine, "SELECT stock FROM uow_skus WHERE code = 'counter'")
    assert len(seen) == len(failures), seen
    assert (len(failures), len(failures)) == (len(retried), len(retry_warnings(caplog)))
    assert {"40001"} == {error_code(own_engine, error) for error in retried}  # and there were some


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_serializable_increments_from_tasks_retry_to_the_exact_total(
    async_engine: AsyncEngine,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
    record_property: Callable[[str, object], None],
) -> None:
    """8 tasks x 8 SERIALIZABLE increments of one row on asyncpg reach 64; every serialization failure was retried."""
    caplog.set_level(logging.WARNING, logger="uow")
    seed(engine, "counter")
    seen = database_errors(async_engine.sync_engine)
    retried: list[BaseException] = []
    barrier = TaskBarrier(8)

    @transactional(
        factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine),
        isolation_level="SERIALIZABLE",
        retries=Retry(retries=50, backoff=0.001, max_backoff=0.05, retry_if=counting(retried)),
    )
    async def increment(uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        sku = await uow.skus.get("counter")
        assert sku is not None
        sku.stock += 1

    async def worker() -> None:
        await barrier.wait()
        for _ in range(8):
            await increment()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(8))), TIMEOUT)

    record_property("retries", len(retried))
    record_property("deepest_retry", deepest_retry(caplog))
    failures = [error for error in seen if getattr(error, "sqlstate", None) == "40001"]
    assert [(64,)] == rows(engine, "SELECT stock FROM uow_skus WHERE code = 'counter'")
    assert len(seen) == len(failures), seen
    assert (len(failures), len(failures)) == (len(retried), len(retry_warnings(caplog)))
    assert {"40001"} == {error_code(engine, error) for error in retried}  # and there were some


# -- 3. a forced deadlock is retried --------------------------------------------


@pytest.mark.parametrize("database", ["mariadb", "postgresql"], indirect=True)
def test_deadlock_victim_is_retried_and_both_updates_land(
    own_engine: Engine, caplog: pytest.LogCaptureFixture, record_property: Callable[[str, object], None]
) -> None:
    """Two threads locking A then B and B then A deadlock; the victim is retried and both increments commit."""
    caplog.set_level(logging.WARNING, logger="uow")
    seed(own_engine, "A", "B")
    retried: list[BaseException] = []
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    attempts = {"A": 0, "B": 0}

    @transactional(
        factory=lambda: SqlAlchemyShopUnitOfWork(own_engine),
        retries=Retry(retries=3, backoff=0.001, max_backoff=0.01, retry_if=counting(retried)),
    )
    def increment_both(first: str, second: str, uow: ShopUnitOfWork = NEW_UOW) -> None:
        attempts[first] += 1
        lock(uow.session, first).stock += 1
        if attempts[first] == 1:
            barrier.wait()  # each holds its first row: the second locks cross
        lock(uow.session, second).stock += 1

    run_threads(2, lambda n: increment_both(*("AB" if n == 0 else "BA")))

    record_property("retries", len(retried))
    assert [("A", 2), ("B", 2)] == rows(own_engine, "SELECT code, stock FROM uow_skus ORDER BY code")
    assert [DEADLOCK[own_engine.dialect.name]] == [error_code(own_engine, error) for error in retried]
    assert [1, 2] == sorted(attempts.values())
    assert 1 == len(retry_warnings(caplog))


# -- 4. every thread and task gets its own unit of work -------------------------


def test_threads_calling_a_decorated_function_get_their_own_unit_of_work(engine: Engine) -> None:
    """16 threads in a factory-made unit of work at once: 16 units, 16 sessions, each current, all rows committed."""
    barrier = threading.Barrier(16, timeout=TIMEOUT)
    seen: dict[int, tuple[object, object, object]] = {}

    @transactional(factory=lambda: SqlAlchemyShopUnitOfWork(engine))
    def insert(n: int, uow: ShopUnitOfWork = NEW_UOW) -> None:
        barrier.wait()  # every thread's unit of work is active now
        uow.items.add(Item(f"item{n:02}"))
        seen[n] = (uow, uow.session, current())

    run_threads(16, insert)

    units = [unit for unit, _, _ in seen.values()]
    assert 16 == len({id(unit) for unit in units})
    assert 16 == len({id(session) for _, session, _ in seen.values()})
    assert all(unit is active for unit, _, active in seen.values())
    assert [1] * 16 == [unit.commits for unit in units]  # type: ignore[attr-defined]
    assert [f"item{n:02}" for n in range(16)] == item_names(engine)


async def test_tasks_calling_a_decorated_function_get_their_own_unit_of_work(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    """64 gathered tasks in a factory-made unit of work at once: 64 units and sessions, each current, all committed."""
    barrier = TaskBarrier(64)
    seen: dict[int, tuple[object, object, object]] = {}

    @transactional(factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine))
    async def insert(n: int, uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        await barrier.wait()  # every task's unit of work is active now
        await uow.items.add(Item(f"item{n:02}"))
        seen[n] = (uow, uow.session, current())

    await asyncio.wait_for(asyncio.gather(*(insert(n) for n in range(64))), TIMEOUT)

    units = [unit for unit, _, _ in seen.values()]
    assert 64 == len({id(unit) for unit in units})
    assert 64 == len({id(session) for _, session, _ in seen.values()})
    assert all(unit is active for unit, _, active in seen.values())
    assert [1] * 64 == [unit.commits for unit in units]  # type: ignore[attr-defined]
    assert [f"item{n:02}" for n in range(64)] == item_names(engine)


async def test_child_task_of_a_block_commits_in_its_own_unit_of_work(engine: Engine, async_engine: AsyncEngine) -> None:
    """A task created inside `async with uow:` gets a unit of work of its own; the parent's rollback spares its row."""
    parent = AsyncSqlAlchemyShopUnitOfWork(async_engine)

    @transactional(factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine))
    async def insert(name: str, uow: AsyncShopUnitOfWork = NEW_UOW) -> tuple[object, object]:
        await uow.items.add(Item(name))
        return uow, current()

    with pytest.raises(Boom):
        async with parent:
            await parent.items.add(Item("parent"))
            child, child_current = await asyncio.create_task(insert("child"))
            assert child is child_current
            assert parent is not child
            assert (1, True) == (child.commits, child.committed)  # type: ignore[attr-defined]
            assert ["child"] == item_names(engine)
            assert parent is current()
            await parent.session.flush()  # the parent's row reaches the database, uncommitted
            raise Boom
    assert (0, 1) == (parent.commits, parent.rollbacks)
    assert ["child"] == item_names(engine)


# -- 5. cancellation ------------------------------------------------------------


ASYNC_BACKENDS = ["postgresql", "sqlite", "mariadb"]


@pytest.mark.parametrize("database", ASYNC_BACKENDS, indirect=True)
@pytest.mark.parametrize("decorated", [False, True], ids=["block", "decorator"])
async def test_task_cancelled_in_a_block_rolls_back_and_frees_its_connection_and_lock(
    engine: Engine, async_engine: AsyncEngine, recwarn: pytest.WarningsRecorder, decorated: bool
) -> None:
    """Cancelling a task that waits inside its block: CancelledError, no warning, nothing committed, lock free."""
    seed(engine, "locked")
    unit = AsyncSqlAlchemyShopUnitOfWork(async_engine)
    locked, never = asyncio.Event(), asyncio.Event()

    async def work(uow: AsyncShopUnitOfWork) -> None:
        await uow.items.add(Item("cancelled"))
        await uow.session.flush()
        await alock(uow.session, "locked")
        locked.set()
        await never.wait()

    async def in_block() -> None:
        async with unit:
            await work(unit)
            await unit.commit()

    in_decorated = transactional(retries=Retry(retries=3, backoff=0))(work)
    task = asyncio.create_task(in_decorated(uow=unit) if decorated else in_block())
    await asyncio.wait_for(locked.wait(), TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert_left_nothing(engine, async_engine, unit, recwarn)


def assert_left_nothing(
    engine: Engine, async_engine: AsyncEngine, unit: AsyncSqlAlchemyShopUnitOfWork, recwarn: pytest.WarningsRecorder
) -> None:
    """After a cancelled block: idle, rolled back, no connection out, no warning, nothing committed, lock free."""
    gc.collect()
    assert 0 == checked_out(async_engine)
    assert [] == [str(warning.message) for warning in recwarn]
    assert (False, 0, 1) == (unit.active, unit.commits, unit.rollbacks)
    assert [] == item_names(engine)
    lock_from_outside(engine, "locked")


#: A query that runs for a while, and how to see from another connection that the server is running it.
#: PostgreSQL only: MariaDB goes on running a statement whose client went away, and holds its locks meanwhile.
SLOW_QUERY = "SELECT pg_sleep(10)"
SLOW_QUERY_RUNNING = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
    "AND query LIKE 'SELECT pg_sleep(10)%'"
)


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_task_cancelled_during_a_long_query_rolls_back_and_frees_its_connection_and_lock(
    engine: Engine, async_engine: AsyncEngine, recwarn: pytest.WarningsRecorder
) -> None:
    """Cancelling a task while its block waits on a slow query: no warning, nothing committed, lock free."""
    seed(engine, "locked")
    unit = AsyncSqlAlchemyShopUnitOfWork(async_engine)

    async def work() -> None:
        async with unit:
            await unit.items.add(Item("cancelled"))
            await unit.session.flush()
            await alock(unit.session, "locked")
            await unit.session.execute(text(SLOW_QUERY))
            await unit.commit()

    task = asyncio.create_task(work())
    for _ in range(int(TIMEOUT * 100)):  # until the server runs the query
        if [(0,)] != rows(engine, SLOW_QUERY_RUNNING):
            break
        assert not task.done()
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the server never ran the slow query")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert_left_nothing(engine, async_engine, unit, recwarn)


@pytest.mark.parametrize("database", ASYNC_BACKENDS, indirect=True)
async def test_task_cancelled_while_its_block_closes_still_returns_the_connection(
    engine: Engine, async_engine: AsyncEngine, recwarn: pytest.WarningsRecorder
) -> None:
    """A cancellation that arrives while the block's session rolls back on close lets the close finish first."""
    seed(engine, "locked")
    unit = AsyncSqlAlchemyShopUnitOfWork(async_engine)
    tasks: list[asyncio.Task[None]] = []
    cancelled_in_close: list[bool] = []

    @event.listens_for(async_engine.sync_engine, "rollback")
    def cancel_the_task(conn: object) -> None:
        cancelled_in_close.append(tasks[0].cancel())

    async def work() -> None:
        async with unit:
            await unit.items.add(Item("cancelled"))
            await unit.session.flush()
            await alock(unit.session, "locked")
        # leaving without commit() rolls back, and the rollback cancels this task

    tasks.append(asyncio.create_task(work()))
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]

    assert [True] == cancelled_in_close
    assert_left_nothing(engine, async_engine, unit, recwarn)


# -- 6. failures injected on begin, commit and rollback ---------------------------


def raiser(*args: object) -> None:
    """An event listener that fails."""
    raise Injected("injected")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_failed_commit_raises_and_leaves_nothing_behind(own_engine: Engine, engine: Engine) -> None:
    """A COMMIT that fails raises, commits nothing, runs no hook and returns the connection."""
    event.listen(own_engine, "commit", raiser)
    unit = SqlAlchemyShopUnitOfWork(own_engine)
    ran: list[str] = []

    with pytest.raises(Injected), unit:
        unit.items.add(Item("never"))
        unit.on_commit(lambda: ran.append("hook"))
        unit.commit()

    assert [] == ran
    assert (False, 0, 1) == (unit.active, unit.commits, unit.rollbacks)
    assert 0 == checked_out(own_engine)
    assert [] == item_names(engine)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_failed_commit_of_a_decorated_function_is_not_retried(own_engine: Engine, engine: Engine) -> None:
    """A COMMIT failing with a non-retryable error is never retried: it may have reached the database."""
    event.listen(own_engine, "commit", raiser)
    calls: list[int] = []

    @transactional(factory=lambda: SqlAlchemyShopUnitOfWork(own_engine), retries=Retry(retry_if=lambda _: True))
    def insert(uow: ShopUnitOfWork = NEW_UOW) -> None:
        calls.append(1)
        uow.items.add(Item("never"))

    with pytest.raises(Injected):
        insert()

    assert [1] == calls
    assert 0 == checked_out(own_engine)
    assert [] == item_names(engine)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_failed_rollback_after_an_error_keeps_the_error_and_invalidates_the_connection(
    own_engine: Engine, engine: Engine
) -> None:
    """When the rollback after an error fails, the error propagates and the connection is invalidated."""
    invalidated: list[object] = []
    event.listen(own_engine, "invalidate", lambda dbapi_conn, record, error: invalidated.append(error))
    event.listen(own_engine, "rollback", raiser)
    unit = SqlAlchemyShopUnitOfWork(own_engine)

    with pytest.raises(Boom), unit:
        unit.items.add(Item("never"))
        unit.session.flush()
        raise Boom

    event.remove(own_engine, "rollback", raiser)
    assert 1 == len(invalidated)
    assert 0 == checked_out(own_engine)
    assert [] == item_names(engine)
    with unit:  # on the same pool: a connection returned dirty would commit "never" here
        unit.items.add(Item("after"))
        unit.commit()
    assert ["after"] == item_names(engine)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
async def test_async_failed_rollback_after_an_error_keeps_the_error_and_invalidates_the_connection(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """Async: when the rollback after an error fails, the error propagates and the connection is invalidated."""
    invalidated: list[object] = []
    event.listen(async_engine.sync_engine, "invalidate", lambda dbapi_conn, record, error: invalidated.append(error))
    event.listen(async_engine.sync_engine, "rollback", raiser)
    unit = AsyncSqlAlchemyShopUnitOfWork(async_engine)

    with pytest.raises(Boom):
        async with unit:
            await unit.items.add(Item("never"))
            await unit.session.flush()
            raise Boom

    event.remove(async_engine.sync_engine, "rollback", raiser)
    assert 1 == len(invalidated)
    assert 0 == checked_out(async_engine)
    assert [] == item_names(engine)
    async with unit:
        await unit.items.add(Item("after"))
        await unit.commit()
    assert ["after"] == item_names(engine)


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_failed_driver_rollback_invalidates_the_connection(own_engine: Engine, engine: Engine) -> None:
    """When the driver cannot roll back after an error, the error propagates and the connection is invalidated."""
    invalidated: list[object] = []
    event.listen(own_engine, "invalidate", lambda dbapi_conn, record, error: invalidated.append(error))
    unit = SqlAlchemyShopUnitOfWork(own_engine)

    def lost() -> None:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    with pytest.raises(Boom), unit:
        unit.items.add(Item("never"))
        unit.session.flush()
        unit.session.connection().connection.dbapi_connection.rollback = lost  # type: ignore[union-attr]
        raise Boom

    assert 1 == len(invalidated)
    assert 0 == checked_out(own_engine)
    assert [] == item_names(engine)
    with unit:
        unit.items.add(Item("after"))
        unit.commit()
    assert ["after"] == item_names(engine)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("isolation_level", [None, "SERIALIZABLE"])
def test_failed_begin_raises_and_leaves_the_unit_of_work_idle(
    own_engine: Engine, engine: Engine, isolation_level: str | None
) -> None:
    """A BEGIN that fails at the first statement raises; the unit of work is idle, nothing checked out."""
    event.listen(own_engine, "begin", raiser)
    unit = SqlAlchemyShopUnitOfWork(own_engine)
    entered: list[bool] = []

    with pytest.raises(Injected), unit.transaction(isolation_level=isolation_level):
        entered.append(unit.active)
        unit.items.add(Item("never"))
        unit.session.flush()

    assert [True] == entered  # the connection, and its BEGIN, come with the first statement
    assert (False, 0) == (unit.active, unit.commits)
    assert 0 == checked_out(own_engine)

    event.remove(own_engine, "begin", raiser)
    with unit.transaction(isolation_level=isolation_level):
        unit.items.add(Item("after"))
        unit.commit()
    assert ["after"] == item_names(engine)
