"""Concurrency at scale on PostgreSQL: no update is lost, whatever the contention.

A thousand SERIALIZABLE increments of one row from 8 threads (and from 8
asyncpg tasks) reach the exact total through ``@transactional`` retries of
serialization failures. Under READ COMMITTED, a version counter turns the
lost update of two interleaved read-modify-write units of work into a
``StaleDataError`` for the second, and retries of it reach the exact total.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator

import attrs
import pytest
from sqlalchemy import Engine, MetaData, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.orm.exc import StaleDataError

import uow
from tests.support.databases import Database, Provisioner
from tests.support.threads import TaskBarrier, checked_out, counting, database_errors, thread_failures
from tests.support.uows import (
    AsyncShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    ShopUnitOfWork,
    SqlAlchemyShopUnitOfWork,
)
from uow import NEW_UOW, Retry, errors, transactional

#: How long a thread, a barrier or a task may wait before the test gives up on it: a hang guard, never asserted.
TIMEOUT = 120.0

#: Workers, and the increments each makes, for the SERIALIZABLE counter and for the version counter.
WORKERS = 8
SERIALIZABLE_INCREMENTS = 125
VERSIONED_INCREMENTS = 50

#: SQLSTATE of a serialization failure.
SERIALIZATION_FAILURE = "40001"


class RelBase(DeclarativeBase):
    """The reliability suite's own models, on a metadata of their own."""

    metadata = MetaData()


class Account(RelBase):
    """An account whose rows carry a version counter: an UPDATE of a stale version matches no row."""

    __tablename__ = "uow_rel_accounts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(nullable=False)
    version: Mapped[int] = mapped_column(nullable=False)

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012 - SQLAlchemy reads it as a plain dict


class AccountsUnitOfWork(uow.SqlAlchemyUnitOfWork):
    accounts = uow.repository(Account)


# -- helpers ------------------------------------------------------------------


def rows(eng: Engine, sql: str) -> list[tuple[object, ...]]:
    """Rows read through a separate connection, with plain SQL."""
    with eng.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql))]


def seed_counter(reader: Engine) -> None:
    """Commit a sku "counter" with stock 0 (after the engine fixtures emptied the tables)."""
    with reader.begin() as conn:
        conn.execute(text("INSERT INTO uow_skus (code, description, stock) VALUES ('counter', '', 0)"))


def sqlstate(error: BaseException) -> object:
    """The SQLSTATE of a database error, under psycopg and under asyncpg."""
    assert isinstance(error, DBAPIError), repr(error)
    return getattr(error.orig, "sqlstate", None)


@attrs.define
class Increments:
    """WORKERS workers that each call an increment *per_worker* times, starting together, and what they counted.

    The increment counts each run of its body in ``attempts[n]``, *n* being
    its worker; ``retries`` is its retry policy, which records in ``retried``
    every error it lets retry. After a run, the retries and the deepest one
    are recorded as properties of the test.
    """

    per_worker: int
    record_property: Callable[[str, object], None]
    retried: list[BaseException] = attrs.field(factory=list)
    attempts: list[int] = attrs.field(factory=lambda: [0] * WORKERS)  # runs of the function's body, by worker
    depths: list[int] = attrs.field(factory=list)  # attempts that each call took
    done: list[int] = attrs.field(factory=list)  # the worker of each call that returned
    retries: Retry = attrs.field(init=False)

    @retries.default
    def _retries(self) -> Retry:
        return Retry(retries=500, backoff=0.001, max_backoff=0.02, retry_if=counting(self.retried))

    @property
    def total(self) -> int:
        """How many increments the workers make together."""
        return WORKERS * self.per_worker

    def _called(self, n: int, before: int) -> None:
        self.depths.append(self.attempts[n] - before)
        self.done.append(n)

    def _record(self) -> None:
        self.record_property("retries", len(self.retried))
        self.record_property("deepest_retry", max(self.depths, default=1) - 1)

    def in_threads(self, increment: Callable[[int], None]) -> dict[int, BaseException]:
        """Run the workers in threads; return what each one raised."""
        barrier = threading.Barrier(WORKERS, timeout=TIMEOUT)

        def worker(n: int) -> None:
            barrier.wait()
            for _ in range(self.per_worker):
                before = self.attempts[n]
                increment(n)
                self._called(n, before)

        failures = thread_failures(WORKERS, worker, timeout=TIMEOUT)
        self._record()
        return failures

    async def in_tasks(self, increment: Callable[[int], Awaitable[None]]) -> list[BaseException | None]:
        """Run the workers in gathered tasks; return what each one returned or raised."""
        barrier = TaskBarrier(WORKERS, timeout=TIMEOUT)

        async def worker(n: int) -> None:
            await barrier.wait()
            for _ in range(self.per_worker):
                before = self.attempts[n]
                await increment(n)
                self._called(n, before)

        workers = asyncio.gather(*(worker(n) for n in range(WORKERS)), return_exceptions=True)
        outcomes = await asyncio.wait_for(workers, TIMEOUT)
        self._record()
        return outcomes

    def check(self) -> None:
        """Every call returned, and every run of the body was a call or a retry of one."""
        assert self.total == len(self.done)
        assert self.total + len(self.retried) == sum(self.attempts) == sum(self.depths)


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(name="reader")
def _reader(pg_database: Database, provisioner: Provisioner) -> Engine:
    """An engine of its own, to set up and read the rows."""
    return provisioner.schema_engine("postgresql")


@pytest.fixture(name="account")
def _account(pg_engine: Engine, reader: Engine) -> Iterator[None]:
    """The table uow_rel_accounts, created for the test, with account 1 at balance 0 and version 1; dropped after."""
    RelBase.metadata.create_all(reader)
    with reader.begin() as conn:
        conn.execute(text("INSERT INTO uow_rel_accounts (id, balance, version) VALUES (1, 0, 1)"))
    yield
    RelBase.metadata.drop_all(reader)


# -- 1. SERIALIZABLE increments of one row --------------------------------------


def test_serializable_increments_from_8_threads_lose_no_update(
    pg_engine: Engine, reader: Engine, record_property: Callable[[str, object], None]
) -> None:
    """8 threads x 125 SERIALIZABLE increments of one row reach exactly 1,000, retrying every serialization failure."""
    seed_counter(reader)
    seen = database_errors(pg_engine)
    counter = Increments(SERIALIZABLE_INCREMENTS, record_property)

    @transactional(
        factory=lambda: SqlAlchemyShopUnitOfWork(pg_engine), isolation_level="SERIALIZABLE", retries=counter.retries
    )
    def increment(n: int, uow: ShopUnitOfWork = NEW_UOW) -> None:
        counter.attempts[n] += 1
        sku = uow.skus.get("counter")
        assert sku is not None
        sku.stock += 1

    failures = counter.in_threads(increment)

    assert {} == failures
    counter.check()
    assert [(counter.total,)] == rows(reader, "SELECT stock FROM uow_skus WHERE code = 'counter'")
    assert {SERIALIZATION_FAILURE} == {sqlstate(error) for error in counter.retried}  # and there were some
    assert len(seen) == len(counter.retried)  # every error the database reported was retried, once
    assert 0 == checked_out(pg_engine)


async def test_serializable_increments_from_8_tasks_lose_no_update(
    pg_async_engine: AsyncEngine, reader: Engine, record_property: Callable[[str, object], None]
) -> None:
    """8 asyncpg tasks x 125 SERIALIZABLE increments of one row reach exactly 1,000, retrying serialization failures."""
    seed_counter(reader)
    seen = database_errors(pg_async_engine.sync_engine)
    counter = Increments(SERIALIZABLE_INCREMENTS, record_property)

    @transactional(
        factory=lambda: AsyncSqlAlchemyShopUnitOfWork(pg_async_engine),
        isolation_level="SERIALIZABLE",
        retries=counter.retries,
    )
    async def increment(n: int, uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        counter.attempts[n] += 1
        sku = await uow.skus.get("counter")
        assert sku is not None
        sku.stock += 1

    outcomes = await counter.in_tasks(increment)

    assert [None] * WORKERS == outcomes
    counter.check()
    assert [(counter.total,)] == rows(reader, "SELECT stock FROM uow_skus WHERE code = 'counter'")
    assert {SERIALIZATION_FAILURE} == {sqlstate(error) for error in counter.retried}  # and there were some
    assert len(seen) == len(counter.retried)  # every error the database reported was retried, once
    assert 0 == checked_out(pg_async_engine)


# -- 2. a version counter under READ COMMITTED -----------------------------------


@pytest.mark.usefixtures("account")
def test_interleaved_read_modify_write_makes_the_second_commit_raise_stale_data(
    pg_engine: Engine, reader: Engine
) -> None:
    """Two READ COMMITTED units of work read version 1; the first commits, the second gets ConcurrencyError."""
    read = threading.Barrier(2, timeout=TIMEOUT)
    first_committed = threading.Event()
    units = [AccountsUnitOfWork(pg_engine), AccountsUnitOfWork(pg_engine)]
    seen: dict[int, tuple[int, int]] = {}

    def read_modify_write(n: int) -> None:
        unit = units[n]
        with unit.transaction(isolation_level="READ COMMITTED"):
            account = unit.accounts.get(1)
            assert account is not None
            seen[n] = (account.balance, account.version)
            read.wait()  # both have read the row before either writes
            if n == 1:
                assert first_committed.wait(TIMEOUT)
            account.balance += 10 if n == 0 else 100
            unit.commit()
        first_committed.set()

    failures = thread_failures(2, read_modify_write, timeout=TIMEOUT)

    assert {0: (0, 1), 1: (0, 1)} == seen
    assert [1] == list(failures)
    error = failures[1]
    assert errors.ConcurrencyError is type(error)  # uow's error, a StaleDataError, caused by SQLAlchemy's
    assert StaleDataError is type(error.__cause__)
    assert "UPDATE statement on table 'uow_rel_accounts' expected to update 1 row(s); 0 were matched." == str(
        error.__cause__
    )
    assert True is errors.is_retryable(error)
    assert [(True, 1, 0), (False, 0, 1)] == [(unit.committed, unit.commits, unit.rollbacks) for unit in units]
    assert [(10, 2)] == rows(reader, "SELECT balance, version FROM uow_rel_accounts WHERE id = 1")
    assert 0 == checked_out(pg_engine)


@pytest.mark.usefixtures("account")
def test_versioned_increments_from_8_threads_lose_no_update(
    pg_engine: Engine, reader: Engine, record_property: Callable[[str, object], None]
) -> None:
    """8 threads x 50 READ COMMITTED increments retry StaleDataError to the exact total; the version counts them."""
    counter = Increments(VERSIONED_INCREMENTS, record_property)

    @transactional(
        factory=lambda: AccountsUnitOfWork(pg_engine), isolation_level="READ COMMITTED", retries=counter.retries
    )
    def increment(n: int, uow: AccountsUnitOfWork = NEW_UOW) -> None:
        counter.attempts[n] += 1
        account = uow.accounts.get(1)
        assert account is not None
        account.balance += 1

    failures = counter.in_threads(increment)

    assert {} == failures
    counter.check()
    balance_and_version = rows(reader, "SELECT balance, version FROM uow_rel_accounts WHERE id = 1")
    assert [(counter.total, 1 + len(counter.done))] == balance_and_version
    assert {errors.ConcurrencyError} == {type(error) for error in counter.retried}  # and there were some
    assert 0 == checked_out(pg_engine)
