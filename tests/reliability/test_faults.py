"""Faults of the database under a unit of work, on PostgreSQL with psycopg and asyncpg.

A backend killed from another connection (in the middle of the transaction,
inside a savepoint, or just before its COMMIT is sent) and a statement that
runs past ``statement_timeout``: the unit of work raises the driver's error,
commits nothing, returns its connection, is not retried by
``@transactional``, and the next unit of work on the same engine commits. A
statement timeout inside a savepoint rolls back the savepoint only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from tests.support.databases import Database, Provisioner
from tests.support.models import Item
from tests.support.threads import checked_out
from tests.support.uows import (
    AsyncShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    ShopUnitOfWork,
    SqlAlchemyShopUnitOfWork,
)
from uow import NEW_UOW, Retry, errors, transactional

#: How long to wait for a killed backend to go away: a hang guard, never asserted.
TIMEOUT = 30.0

#: The statement timeout of the timeout tests, in milliseconds, and a query that runs past it.
STATEMENT_TIMEOUT_MS = 200
SLOW_QUERY = "SELECT pg_sleep(1)"

#: What PostgreSQL says to a client whose backend pg_terminate_backend() killed, and to a query cancelled by timeout.
TERMINATED = "terminating connection due to administrator command"
TIMED_OUT = "canceling statement due to statement timeout"

#: SQLSTATE of a query cancelled by statement_timeout.
QUERY_CANCELED = "57014"

#: Where the backend is killed: after a flush, with more work to come; inside a savepoint, whose release then
#: fails; or from the engine's commit event, when everything is flushed and the COMMIT is about to be sent.
MOMENTS = ["mid_transaction", "in_savepoint", "before_commit"]

#: How the unit of work is entered: a block with commit(), or a @transactional function that may retry 3 times.
ENTRIES = ["block", "decorated"]


# -- helpers ------------------------------------------------------------------


def item_names(reader: Engine) -> list[str]:
    """The names of the committed items, sorted, read through a separate connection."""
    with reader.connect() as conn:
        return [str(name) for (name,) in conn.execute(text("SELECT name FROM uow_items ORDER BY name"))]


class Killer:
    """Kills backends from a connection of its own, and waits until they are gone."""

    def __init__(self, eng: Engine) -> None:
        self.engine = eng
        self.killed: list[int] = []

    def terminate(self, pid: int) -> None:
        with self.engine.connect() as conn:
            assert True is conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar_one()
            deadline = time.monotonic() + TIMEOUT
            while conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).scalar():
                conn.rollback()  # a transaction sees one snapshot of pg_stat_activity: poll in a new one
                assert time.monotonic() < deadline, f"backend {pid} is still there"
                time.sleep(0.005)
        self.killed.append(pid)

    @contextlib.contextmanager
    def at_commit(self, moment: str, eng: Engine, pids: list[int]) -> Iterator[None]:
        """At the moment "before_commit", kill the backend of *pids*' last entry, once, before *eng* sends COMMIT.

        An engine "commit" listener does it, while the block runs; at any other moment, the block runs as it is.
        """
        if moment != "before_commit":
            yield
            return

        def before_commit(conn: object) -> None:
            if not self.killed:
                self.terminate(pids[-1])

        event.listen(eng, "commit", before_commit)
        try:
            yield
        finally:
            event.remove(eng, "commit", before_commit)


def backend_pid(session: Session) -> int:
    """The process id of the backend serving *session*'s connection."""
    return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


async def abackend_pid(session: AsyncSession) -> int:
    """The process id of the backend serving *session*'s connection."""
    return int((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())


def described(error: BaseException) -> tuple[str, str, str, object, bool]:
    """A DBAPIError's class, its driver error's class and that one's cause's, the SQLSTATE, connection_invalidated.

    Under asyncpg, the driver error is SQLAlchemy's adapter of the exception that asyncpg raised, its cause.
    """
    assert isinstance(error, DBAPIError), repr(error)
    return (
        type(error).__name__,
        type(error.orig).__name__,
        type(getattr(error.orig, "__cause__", None) or error.orig).__name__,
        getattr(error.orig, "sqlstate", None),
        error.connection_invalidated,
    )


def run_service(unit: SqlAlchemyShopUnitOfWork, service: Callable[..., None], entry: str) -> None:
    """Run *service* in *unit*, entered the *entry* way: a block and commit(), or a @transactional call."""
    if entry == "block":
        with unit:
            service(unit)
            unit.commit()
    else:
        transactional(factory=lambda: unit, retries=Retry(retries=3, backoff=0))(service)()


async def arun_service(
    unit: AsyncSqlAlchemyShopUnitOfWork, service: Callable[..., Awaitable[None]], entry: str
) -> None:
    """The async twin of run_service()."""
    if entry == "block":
        async with unit:
            await service(unit)
            await unit.commit()
    else:
        await transactional(factory=lambda: unit, retries=Retry(retries=3, backoff=0))(service)()


def check_failed(
    unit: Any, eng: Engine | AsyncEngine, error: BaseException, description: tuple[object, ...], message: str
) -> None:
    """*error* is described so, says *message*, is not retryable; *unit* rolled back; *eng* has its connections back."""
    assert description == described(error)
    assert message in str(error)
    assert False is errors.is_retryable(error)
    assert (False, False, 0, 1) == (unit.active, unit.committed, unit.commits, unit.rollbacks)
    assert 0 == checked_out(eng)


def commit_next(unit: SqlAlchemyShopUnitOfWork, reader: Engine, pids: list[int] | None = None) -> None:
    """The next block of *unit* commits an item "next", alone; its backend's pid goes to *pids* if given."""
    with unit:
        unit.items.add(Item("next"))
        if pids is not None:
            pids.append(backend_pid(unit.session))
        unit.commit()
    assert (True, 1) == (unit.committed, unit.commits)
    assert ["next"] == item_names(reader)


async def acommit_next(unit: AsyncSqlAlchemyShopUnitOfWork, reader: Engine, pids: list[int] | None = None) -> None:
    """The async twin of commit_next()."""
    async with unit:
        await unit.items.add(Item("next"))
        if pids is not None:
            pids.append(await abackend_pid(unit.session))
        await unit.commit()
    assert (True, 1) == (unit.committed, unit.commits)
    assert ["next"] == item_names(reader)


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(name="reader")
def _reader(pg_database: Database, provisioner: Provisioner) -> Engine:
    """An engine of its own, to read what was committed."""
    return provisioner.schema_engine("postgresql")


@pytest.fixture(name="killer")
def _killer(pg_database: Database, provisioner: Provisioner) -> Iterator[Killer]:
    """Kills backends from an engine of its own."""
    eng = provisioner.track(pg_database.engine())
    yield Killer(eng)
    eng.dispose()


@pytest.fixture(name="timeout_engine")
def _timeout_engine(pg_engine: Engine, pg_database: Database, provisioner: Provisioner) -> Iterator[Engine]:
    """A psycopg engine whose connections cancel any statement that runs longer than the statement timeout."""
    eng = provisioner.track(
        pg_database.engine(connect_args={"options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"})
    )
    yield eng
    eng.dispose()


@pytest.fixture(name="async_timeout_engine")
async def _async_timeout_engine(
    pg_async_engine: AsyncEngine, pg_database: Database, provisioner: Provisioner
) -> AsyncIterator[AsyncEngine]:
    """The asyncpg twin of timeout_engine."""
    eng = create_async_engine(
        pg_database.async_url, connect_args={"server_settings": {"statement_timeout": str(STATEMENT_TIMEOUT_MS)}}
    )
    provisioner.track(eng.sync_engine)
    try:
        yield eng
    finally:
        await eng.dispose()


# -- 1. a backend killed under a unit of work ------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("moment", MOMENTS)
def test_killed_backend_fails_the_unit_of_work_and_the_next_one_commits(
    pg_engine: Engine, reader: Engine, killer: Killer, moment: str, entry: str
) -> None:
    """psycopg: a killed backend raises OperationalError, commits nothing, is not retried, tells the hooks its end."""
    unit = SqlAlchemyShopUnitOfWork(pg_engine)
    pids: list[int] = []
    calls: list[int] = []
    ended: list[str] = []

    def service(uow: ShopUnitOfWork = NEW_UOW) -> None:
        calls.append(1)
        uow.on_rollback(lambda: ended.append("on_rollback"))
        uow.after_completion(ended.append)
        session: Session = uow.session  # type: ignore[attr-defined]
        uow.items.add(Item("before the kill"))
        session.flush()
        pids.append(backend_pid(session))
        if moment == "in_savepoint":
            with uow.savepoint():  # releasing it flushes, and fails
                uow.items.add(Item("in the savepoint"))
                session.flush()
                killer.terminate(pids[-1])
                uow.items.add(Item("after the kill"))
            return
        if moment == "mid_transaction":
            killer.terminate(pids[-1])
        uow.items.add(Item("after the kill"))
        if moment == "before_commit":
            session.flush()  # the COMMIT is all that is left

    with pytest.raises(DBAPIError) as caught, killer.at_commit(moment, pg_engine, pids):
        run_service(unit, service, entry)

    killed = ("OperationalError", "AdminShutdown", "AdminShutdown", "57P01", True)
    check_failed(unit, pg_engine, caught.value, killed, TERMINATED)
    assert [1] == calls
    # A COMMIT whose connection died may have committed: no on_rollback, and the status says so.
    assert (["unknown"] if moment == "before_commit" else ["on_rollback", "rolled_back"]) == ended
    assert pids == killer.killed
    assert [] == item_names(reader)

    commit_next(unit, reader, pids)
    assert pids[0] != pids[1]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("moment", MOMENTS)
async def test_async_killed_backend_fails_the_unit_of_work_and_the_next_one_commits(
    pg_async_engine: AsyncEngine, reader: Engine, killer: Killer, moment: str, entry: str
) -> None:
    """asyncpg: a killed backend raises DBAPIError, commits nothing, is not retried, tells the hooks how it ended."""
    unit = AsyncSqlAlchemyShopUnitOfWork(pg_async_engine)
    pids: list[int] = []
    calls: list[int] = []
    ended: list[str] = []

    async def service(uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        calls.append(1)
        uow.on_rollback(lambda: ended.append("on_rollback"))
        uow.after_completion(ended.append)
        session: AsyncSession = uow.session  # type: ignore[attr-defined]
        await uow.items.add(Item("before the kill"))
        await session.flush()
        pids.append(await abackend_pid(session))
        if moment == "in_savepoint":
            async with uow.savepoint():
                await uow.items.add(Item("in the savepoint"))
                await session.flush()
                killer.terminate(pids[-1])
                await uow.items.add(Item("after the kill"))
            return
        if moment == "mid_transaction":
            killer.terminate(pids[-1])
        await uow.items.add(Item("after the kill"))
        if moment == "before_commit":
            await session.flush()

    with pytest.raises(DBAPIError) as caught, killer.at_commit(moment, pg_async_engine.sync_engine, pids):
        await arun_service(unit, service, entry)

    killed = ("DBAPIError", "Error", "ConnectionDoesNotExistError", "08003", True)
    check_failed(unit, pg_async_engine, caught.value, killed, TERMINATED)
    assert [1] == calls
    assert (["unknown"] if moment == "before_commit" else ["on_rollback", "rolled_back"]) == ended
    assert pids == killer.killed
    assert [] == item_names(reader)

    await acommit_next(unit, reader, pids)
    assert pids[0] != pids[1]


# -- 2. a statement that runs past statement_timeout -------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_statement_timeout_fails_the_unit_of_work_and_the_next_one_commits(
    timeout_engine: Engine, reader: Engine, entry: str
) -> None:
    """psycopg: a statement past statement_timeout raises QueryCanceled 57014, commits nothing, is not retried."""
    unit = SqlAlchemyShopUnitOfWork(timeout_engine)
    calls: list[int] = []

    def service(uow: ShopUnitOfWork = NEW_UOW) -> None:
        calls.append(1)
        uow.items.add(Item("before the slow query"))
        uow.session.flush()  # type: ignore[attr-defined]
        uow.session.execute(text(SLOW_QUERY))  # type: ignore[attr-defined]
        uow.items.add(Item("after the slow query"))

    with pytest.raises(DBAPIError) as caught:
        run_service(unit, service, entry)

    cancelled = ("OperationalError", "QueryCanceled", "QueryCanceled", QUERY_CANCELED, False)
    check_failed(unit, timeout_engine, caught.value, cancelled, TIMED_OUT)
    assert [1] == calls
    assert [] == item_names(reader)

    commit_next(unit, reader)


@pytest.mark.parametrize("entry", ENTRIES)
async def test_async_statement_timeout_fails_the_unit_of_work_and_the_next_one_commits(
    async_timeout_engine: AsyncEngine, reader: Engine, entry: str
) -> None:
    """asyncpg: a statement past statement_timeout raises SQLSTATE 57014, commits nothing, is not retried."""
    unit = AsyncSqlAlchemyShopUnitOfWork(async_timeout_engine)
    calls: list[int] = []

    async def service(uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        calls.append(1)
        await uow.items.add(Item("before the slow query"))
        await uow.session.flush()  # type: ignore[attr-defined]
        await uow.session.execute(text(SLOW_QUERY))  # type: ignore[attr-defined]
        await uow.items.add(Item("after the slow query"))

    with pytest.raises(DBAPIError) as caught:
        await arun_service(unit, service, entry)

    cancelled = ("DBAPIError", "Error", "QueryCanceledError", QUERY_CANCELED, False)
    check_failed(unit, async_timeout_engine, caught.value, cancelled, TIMED_OUT)
    assert [1] == calls
    assert [] == item_names(reader)

    await acommit_next(unit, reader)


# -- 3. a statement timeout inside a savepoint -------------------------------------


def test_statement_timeout_in_a_savepoint_rolls_back_the_savepoint_only(timeout_engine: Engine, reader: Engine) -> None:
    """psycopg: a statement cancelled by timeout inside a savepoint rolls it back; the block goes on and commits."""
    unit = SqlAlchemyShopUnitOfWork(timeout_engine)

    with unit:
        unit.items.add(Item("before the savepoint"))
        with pytest.raises(DBAPIError) as caught, unit.savepoint():
            unit.items.add(Item("in the savepoint"))
            unit.session.execute(text(SLOW_QUERY))
        unit.items.add(Item("after the savepoint"))
        unit.commit()

    assert ("OperationalError", "QueryCanceled", "QueryCanceled", QUERY_CANCELED, False) == described(caught.value)
    assert (True, 1, 0) == (unit.committed, unit.commits, unit.rollbacks)
    assert 0 == checked_out(timeout_engine)
    assert ["after the savepoint", "before the savepoint"] == item_names(reader)


async def test_async_statement_timeout_in_a_savepoint_rolls_back_the_savepoint_only(
    async_timeout_engine: AsyncEngine, reader: Engine
) -> None:
    """asyncpg: a statement cancelled by timeout inside a savepoint rolls it back; the block goes on and commits."""
    unit = AsyncSqlAlchemyShopUnitOfWork(async_timeout_engine)

    async with unit:
        await unit.items.add(Item("before the savepoint"))
        with pytest.raises(DBAPIError) as caught:
            async with unit.savepoint():
                await unit.items.add(Item("in the savepoint"))
                await unit.session.execute(text(SLOW_QUERY))
        await unit.items.add(Item("after the savepoint"))
        await unit.commit()

    assert ("DBAPIError", "Error", "QueryCanceledError", QUERY_CANCELED, False) == described(caught.value)
    assert (True, 1, 0) == (unit.committed, unit.commits, unit.rollbacks)
    assert 0 == checked_out(async_timeout_engine)
    assert ["after the savepoint", "before the savepoint"] == item_names(reader)
