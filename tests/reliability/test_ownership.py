"""Ownership under contention: many threads or tasks enter one idle unit of work at once.

Entering an idle unit of work claims it in one atomic step: of the threads
(or tasks) that enter it at the same time one gets in, and the others get
``OwnershipError`` at once. 16 threads x 2,000 entries on one sync unit of
work, and 64 tasks x 2,000 entries on one async unit of work, on PostgreSQL
and MariaDB: every entry adds a sku of its own and commits, or is refused.
The keys whose ``commit()`` returned equal the rows stored, read through a
separate connection with plain SQL: no commit reported and lost, no row
stored unreported. Before the claim was atomic, two threads could both own
the unit of work, and a ``commit()`` could return with its row never stored.

Each worker yields between its entries (``time.sleep(0)``, ``await
asyncio.sleep(0)``) so that the claim changes hands, and each task yields
inside its block so that the others try to enter while it holds the unit of
work; the sync test makes the interpreter switch threads every 10
microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import attrs
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.support.databases import Database, Provisioner
from tests.support.models import Sku, skus
from tests.support.threads import TaskBarrier, checked_out, thread_failures
from tests.support.uows import AsyncSqlAlchemyShopUnitOfWork, SqlAlchemyShopUnitOfWork
from uow import errors

#: How long a thread, a barrier or a task may wait before the test gives up on it: a hang guard, never asserted.
TIMEOUT = 120.0

#: Threads on the sync unit of work, tasks on the async one, and the entries each of them makes.
THREADS = 16
TASKS = 64
ENTRIES = 2_000

#: The interpreter's thread switch interval during the sync test, so that threads switch often.
SWITCH_INTERVAL = 1e-5

#: Only one entry at a time can hold the unit of work, so a small pool is plenty.
POOL = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 30}


# -- helpers ------------------------------------------------------------------


@attrs.define
class Tally:
    """What one thread's or task's entries did."""

    committed: list[str] = attrs.Factory(list)  # keys whose commit() returned: reported successes
    refused: int = 0  # entries that raised OwnershipError
    refused_in_block: int = 0  # of those, the ones refused after getting into the block
    failures: list[BaseException] = attrs.Factory(list)  # any other exception

    def refuse(self, entered: bool) -> None:
        self.refused += 1
        self.refused_in_block += entered


@attrs.define
class Outcome:
    """The entries of all the workers, against the rows stored."""

    entries: int
    owners: int
    reported: set[str]
    stored: set[str]
    refused: int
    refused_in_block: int
    failures: list[BaseException]
    seconds: float

    @classmethod
    def of(cls, tallies: list[Tally], reader: Engine, seconds: float) -> Outcome:
        return cls(
            entries=len(tallies) * ENTRIES,
            owners=sum(bool(tally.committed) for tally in tallies),
            reported={key for tally in tallies for key in tally.committed},
            stored=stored_codes(reader),
            refused=sum(tally.refused for tally in tallies),
            refused_in_block=sum(tally.refused_in_block for tally in tallies),
            failures=[failure for tally in tallies for failure in tally.failures],
            seconds=seconds,
        )

    def record(self, label: str, record_property: Callable[[str, object], None]) -> None:
        """Record the figures as properties of the test, and print them (shown with ``-s``)."""
        figures = {
            "entries": self.entries,
            "owners": self.owners,
            "stored": len(self.stored),
            "refused": self.refused,
            "refused_in_block": self.refused_in_block,
            "reported_not_stored": len(self.reported - self.stored),
            "stored_not_reported": len(self.stored - self.reported),
            "other_failures": len(self.failures),
            "seconds": round(self.seconds, 2),
        }
        for name, value in figures.items():
            record_property(name, value)
        print(f"\n{label}: " + ", ".join(f"{name}={value}" for name, value in figures.items()))

    def check(self) -> None:
        """The rows are the reported ones, every entry was refused or stored its row, and both outcomes happened."""
        assert self.reported == self.stored  # none reported and not stored, none stored and not reported
        assert [] == [repr(failure) for failure in self.failures]
        assert self.entries == len(self.reported) + self.refused
        assert 0 == self.refused_in_block  # the atomic claim refuses at the door, never halfway through a block
        assert 0 < len(self.stored)
        assert 0 < self.refused
        assert 1 < self.owners  # the claim changed hands: the idle unit of work was contended, not kept by one


def stored_codes(reader: Engine) -> set[str]:
    """The codes of the committed skus, read through a separate connection with plain SQL."""
    with reader.connect() as conn:
        return {code for (code,) in conn.execute(text("SELECT code FROM uow_skus"))}


def closing_leaks(eng: Engine) -> Callable[[], None]:
    """Track the connections *eng* checks out; the function returned closes those still out, which only a bug leaks.

    A leaked connection keeps its transaction, and that transaction's locks,
    until the process ends: MariaDB's ``DROP DATABASE`` at the end of the run
    would wait for it forever. Closed, the test fails instead of hanging (the
    pool still counts it checked out, so the leak is reported).
    """
    out: dict[object, Any] = {}

    def checkout(dbapi_connection: Any, record: object, proxy: object) -> None:
        out[record] = dbapi_connection

    def checkin(dbapi_connection: Any, record: object) -> None:
        out.pop(record, None)

    event.listen(eng, "checkout", checkout)
    event.listen(eng, "checkin", checkin)

    def close_leaked() -> None:
        for dbapi_connection in list(out.values()):
            with contextlib.suppress(Exception):  # closed already, or broken: either way it holds nothing now
                eng.dialect.do_terminate(dbapi_connection)

    return close_leaked


def enter(unit: SqlAlchemyShopUnitOfWork, tally: Tally, key: str) -> None:
    """One entry: add the sku *key* and commit, or be refused; *tally* records which."""
    entered = False
    try:
        with unit:
            entered = True
            unit.skus.add(Sku(key))
            unit.commit()
            tally.committed.append(key)
    except errors.OwnershipError:
        tally.refuse(entered)
    except Exception as error:  # the test judges every other failure
        tally.failures.append(error)


async def enter_async(unit: AsyncSqlAlchemyShopUnitOfWork, tally: Tally, key: str) -> None:
    """One entry of a task, which lets the others run inside its block: add the sku *key* and commit, or be refused."""
    entered = False
    try:
        async with unit:
            entered = True
            await unit.skus.add(Sku(key))
            await asyncio.sleep(0)  # the other tasks run, and try to enter, while this one holds the unit of work
            await unit.commit()
            tally.committed.append(key)
    except errors.OwnershipError:
        tally.refuse(entered)
    except Exception as error:  # the test judges every other failure
        tally.failures.append(error)


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(name="database", params=["postgresql", "mariadb"])
def _database(request: pytest.FixtureRequest, provisioner: Provisioner) -> Database:
    """This run's database on PostgreSQL and on MariaDB in turn, with the test tables created and no sku."""
    with provisioner.schema_engine(request.param).begin() as conn:
        conn.execute(skus.delete())
    return provisioner.database(request.param)


@pytest.fixture(name="reader")
def _reader(database: Database, provisioner: Provisioner) -> Engine:
    """An engine of its own, to read the rows stored."""
    return provisioner.schema_engine(database.backend)


@pytest.fixture(name="sync_engine")
def _sync_engine(database: Database, provisioner: Provisioner) -> Iterator[Engine]:
    """A small-pooled sync engine (psycopg or PyMySQL) of this test alone; its pool is checked after the test."""
    eng = provisioner.track(database.engine(**POOL))
    close_leaked = closing_leaks(eng)
    yield eng
    close_leaked()


@pytest.fixture(name="async_engine")
async def _async_engine(database: Database, provisioner: Provisioner) -> AsyncIterator[AsyncEngine]:
    """A small-pooled async engine (asyncpg or aiomysql) of this test alone; its pool is checked after the test."""
    eng = create_async_engine(database.async_url, **POOL)
    close_leaked = closing_leaks(provisioner.track(eng.sync_engine))
    try:
        yield eng
    finally:
        close_leaked()
        await eng.dispose()


@pytest.fixture(name="switching_often")
def _switching_often() -> Iterator[None]:
    """The interpreter switches threads every 10 microseconds during the test."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


# -- the tests ----------------------------------------------------------------


@pytest.mark.usefixtures("switching_often")
def test_16_threads_entering_one_unit_of_work_store_exactly_the_commits_reported(
    database: Database, sync_engine: Engine, reader: Engine, record_property: Callable[[str, object], None]
) -> None:
    """16 threads x 2,000 entries into one idle unit of work: each is refused or stores its row, no commit is lost."""
    unit = SqlAlchemyShopUnitOfWork(sync_engine)
    tallies = [Tally() for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS, timeout=TIMEOUT)

    def worker(n: int) -> None:
        tally = tallies[n]
        barrier.wait()
        for entry in range(ENTRIES):
            enter(unit, tally, f"{n}-{entry}")
            time.sleep(0)  # let the others have their turn: the unit of work is idle now

    started = time.perf_counter()
    crashed = thread_failures(THREADS, worker, timeout=TIMEOUT)
    outcome = Outcome.of(tallies, reader, time.perf_counter() - started)
    outcome.record(f"{database.backend} sync, {THREADS} threads", record_property)

    assert {} == crashed
    outcome.check()
    assert len(outcome.stored) == unit.commits
    assert False is unit.active
    assert 0 == checked_out(sync_engine)


async def test_64_tasks_entering_one_unit_of_work_store_exactly_the_commits_reported(
    database: Database, async_engine: AsyncEngine, reader: Engine, record_property: Callable[[str, object], None]
) -> None:
    """64 tasks x 2,000 entries into one idle async unit of work: each is refused or stores its row, none is lost."""
    unit = AsyncSqlAlchemyShopUnitOfWork(async_engine)
    tallies = [Tally() for _ in range(TASKS)]
    barrier = TaskBarrier(TASKS, timeout=TIMEOUT)

    async def worker(n: int) -> None:
        tally = tallies[n]
        await barrier.wait()
        for entry in range(ENTRIES):
            await enter_async(unit, tally, f"{n}-{entry}")
            await asyncio.sleep(0)  # a refusal raises before any await: let the others have their turn

    started = time.perf_counter()
    workers = asyncio.gather(*(worker(n) for n in range(TASKS)), return_exceptions=True)
    crashed = await asyncio.wait_for(workers, TIMEOUT)
    outcome = Outcome.of(tallies, reader, time.perf_counter() - started)
    outcome.record(f"{database.backend} async, {TASKS} tasks", record_property)

    assert [None] * TASKS == crashed
    outcome.check()
    assert len(outcome.stored) == unit.commits
    assert False is unit.active
    assert 0 == checked_out(async_engine)
