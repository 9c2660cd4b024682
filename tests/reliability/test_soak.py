"""Soak: 10,000 units of work, sync and then async, with failures injected at random.

Each unit of work is a small service that adds a ``Sku`` row under a key of
its own, entered one of four ways: ``with uow:`` and ``commit()``, a
``@transactional(factory=...)`` call, a decorated call joining the caller's
block, or a block with a savepoint in it. A seeded ``random.Random`` plans,
for each one, a fault: an exception in the service, a flush that fails (a
``before_flush`` or ``after_flush`` listener that raises), a COMMIT that
fails (an engine ``commit`` listener that raises), and on asyncpg a task
cancelled while its query runs. Afterwards the table holds exactly the rows
of the units of work that reported success, and nothing was left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from typing import Any

import attrs
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from tests.support.databases import Database, Provisioner
from tests.support.models import Sku
from tests.support.threads import checked_out
from tests.support.uows import (
    AsyncShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    ShopUnitOfWork,
    SqlAlchemyShopUnitOfWork,
)
from uow import NEW_UOW, transactional

#: How many units of work each soak runs.
UNITS = 10_000

#: How many async units of work run at once, and the size of the async engine's pool.
CONCURRENCY = 20

#: How long a batch of tasks may take before the test gives up on it: a hang guard, never asserted.
TIMEOUT = 60.0

#: The ways a unit of work is entered.
WAYS = ("block", "decorated", "joined", "savepoint")

#: Faults and how often each is planned, in percent; "cancel" only on the async soak.
SYNC_FAULTS = {"none": 76, "service": 8, "before_flush": 4, "after_flush": 4, "commit": 8}
ASYNC_FAULTS = {"none": 70, "service": 7, "before_flush": 4, "after_flush": 4, "commit": 7, "cancel": 8}

#: The outcome each fault must produce: what the unit of work's caller sees.
OUTCOMES = {
    "none": "ok",
    "service": "Boom",
    "before_flush": "Injected",
    "after_flush": "Injected",
    "commit": "Injected",
    "cancel": "CancelledError",
}

#: A query that a cancelled task waits on; it never ends by itself before the task is cancelled.
SLOW_QUERY = "SELECT pg_sleep(10)"

#: The fault planned for the unit of work running in this thread or task, read by the listeners.
FAULT: ContextVar[str] = ContextVar("soak_fault", default="none")


class Boom(Exception):
    """Raised by service code inside a block."""


class Injected(Exception):
    """Raised by an event listener, standing for a failure of the database or the network."""


class SoakSession(Session):
    """The sync session class of the async soak's sessions, where its flush listeners go."""


@attrs.frozen
class Plan:
    """What one unit of work does: how it is entered, which fault hits it, and what it adds."""

    n: int
    way: str
    fault: str
    flush_early: bool
    savepoint_fails: bool
    cancel_delay: float

    @property
    def key(self) -> str:
        return f"u{self.n:05}"

    def committed_keys(self) -> set[str]:
        """The keys this unit of work commits when it succeeds."""
        keys = {self.key}
        if self.way == "joined":
            keys.add(self.key + "j")
        if self.way == "savepoint" and not self.savepoint_fails:
            keys.add(self.key + "s")
        return keys


def plans(seed: int, faults: dict[str, int]) -> list[Plan]:
    """UNITS plans drawn from a generator seeded with *seed*."""
    rng = random.Random(seed)
    kinds, weights = list(faults), list(faults.values())
    return [
        Plan(
            n=n,
            way=rng.choice(WAYS),
            fault=rng.choices(kinds, weights)[0],
            flush_early=rng.random() < 0.3,
            savepoint_fails=rng.random() < 0.5,
            cancel_delay=rng.choice([0.0, rng.uniform(0.0, 0.005)]),
        )
        for n in range(UNITS)
    ]


def committed_keys(eng: Engine) -> set[str]:
    """The keys of the committed skus, read through a separate connection with plain SQL."""
    with eng.connect() as conn:
        return {str(code) for (code,) in conn.execute(text("SELECT code FROM uow_skus"))}


def expected(done: list[Plan], outcomes: dict[int, str]) -> tuple[dict[int, str], set[str]]:
    """The outcome every plan must have had, and the keys of those that succeeded."""
    keys = set().union(*(plan.committed_keys() for plan in done if outcomes.get(plan.n) == "ok"))
    return {plan.n: OUTCOMES[plan.fault] for plan in done}, keys


def trouble(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings and errors logged by SQLAlchemy (its pool included), the drivers or uow."""
    return [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.levelno >= logging.WARNING and record.name.split(".")[0] in ("sqlalchemy", "asyncpg", "uow")
    ]


def warned(recwarn: pytest.WarningsRecorder) -> list[str]:
    """The warnings emitted during the test, but pytest's own (record_property warns under junit xunit2)."""
    return [str(warning.message) for warning in recwarn if not issubclass(warning.category, pytest.PytestWarning)]


class Raising:
    """Event listeners that raise Injected when the current unit of work is planned to fail there."""

    def __init__(self) -> None:
        self.raised: Counter[str] = Counter()

    def _maybe(self, stage: str) -> None:
        if FAULT.get() == stage:
            self.raised[stage] += 1
            raise Injected(stage)

    def before_flush(self, session: Session, context: object, instances: object) -> None:
        self._maybe("before_flush")

    def after_flush(self, session: Session, context: object) -> None:
        self._maybe("after_flush")

    def commit(self, conn: object) -> None:
        self._maybe("commit")

    @contextlib.contextmanager
    def listening(self, session_target: Any, engine: Engine) -> Iterator[None]:
        """Listen on *session_target* (a sessionmaker or a session class) and *engine* inside the block."""
        hooks: list[tuple[Any, str, Callable[..., None]]] = [
            (session_target, "before_flush", self.before_flush),
            (session_target, "after_flush", self.after_flush),
            (engine, "commit", self.commit),
        ]
        for target, name, fn in hooks:
            event.listen(target, name, fn)
        try:
            yield
        finally:
            for target, name, fn in hooks:
                event.remove(target, name, fn)


@attrs.frozen
class Watch:
    """What a soak is watched through: the test's log, its warnings, and its recorded properties."""

    caplog: pytest.LogCaptureFixture
    recwarn: pytest.WarningsRecorder
    record_property: Callable[[str, object], None]


@attrs.define
class Soak:
    """What a soak planned, what its units of work reported, and what its listeners raised."""

    todo: list[Plan]
    watch: Watch
    raising: Raising = attrs.field(factory=Raising)
    outcomes: dict[int, str] = attrs.field(factory=dict)

    def check(self, eng: Engine | AsyncEngine, reader: Engine) -> Counter[str]:
        """Every unit of work had its planned outcome, exactly the successes committed, nothing was left behind.

        Record the planned faults and the successes; return the planned faults, counted.
        """
        gc.collect()
        planned = Counter(plan.fault for plan in self.todo)
        self.watch.record_property("planned_faults", dict(planned))
        self.watch.record_property("succeeded", sum(outcome == "ok" for outcome in self.outcomes.values()))
        want_outcomes, want_keys = expected(self.todo, self.outcomes)
        assert want_outcomes == self.outcomes
        assert want_keys == committed_keys(reader)
        assert 0 == checked_out(eng)
        assert [] == trouble(self.watch.caplog)
        assert [] == warned(self.watch.recwarn)
        listened = ("before_flush", "after_flush", "commit")
        assert {stage: planned[stage] for stage in listened} == dict(self.raising.raised)
        return planned


# -- fixtures -----------------------------------------------------------------


@pytest.fixture(name="reader")
def _reader(pg_database: Database, provisioner: Provisioner) -> Engine:
    """An engine without listeners, to read what was committed."""
    return provisioner.schema_engine("postgresql")


@pytest.fixture(name="watch")
def _watch(
    caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder, record_property: Callable[[str, object], None]
) -> Watch:
    """The test's log, from WARNING up, its warnings, and its recorded properties."""
    caplog.set_level(logging.WARNING)
    return Watch(caplog, recwarn, record_property)


@pytest.fixture(name="soak_async_engine")
async def _soak_async_engine(
    pg_async_engine: AsyncEngine, pg_database: Database, provisioner: Provisioner
) -> AsyncIterator[AsyncEngine]:
    """An asyncpg engine whose pool holds a connection for every task of a batch, on emptied tables."""
    eng = create_async_engine(pg_database.async_url, pool_size=CONCURRENCY, max_overflow=0, pool_timeout=TIMEOUT)
    provisioner.track(eng.sync_engine)
    try:
        yield eng
    finally:
        await eng.dispose()


# -- the services ---------------------------------------------------------------


def work(unit: ShopUnitOfWork, plan: Plan) -> None:
    """Add the plan's row (and a savepoint's), flush if planned, and raise if the service is to fail."""
    unit.skus.add(Sku(plan.key, plan.way))
    if plan.flush_early:
        unit.session.flush()  # type: ignore[attr-defined]
    if plan.way == "savepoint":
        try:
            with unit.savepoint():
                unit.skus.add(Sku(plan.key + "s", "in a savepoint"))
                if plan.savepoint_fails:
                    raise Boom("rolled back to the savepoint")
        except Boom:
            pass
    if plan.fault == "service":
        raise Boom(plan.key)


async def slow_query(unit: AsyncShopUnitOfWork, started: asyncio.Event) -> None:
    """Tell the test that the slow query is about to be sent, and send it: the test cancels the task meanwhile."""
    started.set()
    await unit.session.execute(text(SLOW_QUERY))  # type: ignore[attr-defined]


async def awork(unit: AsyncShopUnitOfWork, plan: Plan, started: asyncio.Event) -> None:
    """The async twin of work(); a unit of work planned to be cancelled waits on a slow query (in its savepoint)."""
    await unit.skus.add(Sku(plan.key, plan.way))
    if plan.flush_early:
        await unit.session.flush()  # type: ignore[attr-defined]
    if plan.way == "savepoint":
        try:
            async with unit.savepoint():
                await unit.skus.add(Sku(plan.key + "s", "in a savepoint"))
                if plan.fault == "cancel":  # cancelled inside the savepoint
                    await slow_query(unit, started)
                if plan.savepoint_fails:
                    raise Boom("rolled back to the savepoint")
        except Boom:
            pass
    elif plan.fault == "cancel":
        await slow_query(unit, started)
    if plan.fault == "service":
        raise Boom(plan.key)


def sync_runner(maker: sessionmaker[Session]) -> Callable[[Plan], None]:
    """Run one plan's unit of work, entered the plan's way."""
    shared = SqlAlchemyShopUnitOfWork(maker)

    @transactional(factory=lambda: SqlAlchemyShopUnitOfWork(maker))
    def decorated(plan: Plan, uow: ShopUnitOfWork = NEW_UOW) -> None:
        work(uow, plan)

    def run(plan: Plan) -> None:
        token = FAULT.set(plan.fault)
        try:
            if plan.way == "decorated":
                decorated(plan)
                return
            with shared:
                if plan.way == "joined":
                    decorated(plan)  # joins the block: its commit is the block's
                    shared.skus.add(Sku(plan.key + "j", "after the joined call"))
                else:
                    work(shared, plan)
                shared.commit()
        finally:
            FAULT.reset(token)

    return run


def async_runner(maker: async_sessionmaker[Any]) -> Callable[[Plan, asyncio.Event], Any]:
    """Run one plan's unit of work in the current task, entered the plan's way."""

    @transactional(factory=lambda: AsyncSqlAlchemyShopUnitOfWork(maker))
    async def decorated(plan: Plan, started: asyncio.Event, uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        await awork(uow, plan, started)

    async def run(plan: Plan, started: asyncio.Event) -> None:
        FAULT.set(plan.fault)
        if plan.way == "decorated":
            await decorated(plan, started)
            return
        unit = AsyncSqlAlchemyShopUnitOfWork(maker)
        async with unit:
            if plan.way == "joined":
                await decorated(plan, started)
                await unit.skus.add(Sku(plan.key + "j", "after the joined call"))
            else:
                await awork(unit, plan, started)
            await unit.commit()

    return run


# -- the soaks ------------------------------------------------------------------


def test_sync_soak_commits_exactly_the_units_of_work_that_succeeded(
    pg_engine: Engine, reader: Engine, watch: Watch
) -> None:
    """10,000 sync units of work with random faults: the table holds exactly the rows of those that succeeded."""
    soak = Soak(plans(20_240_611, SYNC_FAULTS), watch)
    maker = sessionmaker(pg_engine, expire_on_commit=False)
    run = sync_runner(maker)

    with soak.raising.listening(maker, pg_engine):
        for plan in soak.todo:
            try:
                run(plan)
            except (Boom, Injected) as error:
                soak.outcomes[plan.n] = type(error).__name__
            else:
                soak.outcomes[plan.n] = "ok"

    planned = soak.check(pg_engine, reader)
    assert all(planned[fault] >= 300 for fault in ("service", "before_flush", "after_flush", "commit"))
    assert {"ok", "Boom", "Injected"} == set(soak.outcomes.values())


async def test_async_soak_commits_exactly_the_units_of_work_that_succeeded(
    soak_async_engine: AsyncEngine, reader: Engine, watch: Watch
) -> None:
    """10,000 asyncpg units of work, 20 at a time, with random faults and cancellations: exactly the successes stay."""
    soak = Soak(plans(20_240_612, ASYNC_FAULTS), watch)
    maker = async_sessionmaker(soak_async_engine, expire_on_commit=False, sync_session_class=SoakSession)
    run = async_runner(maker)
    cancelled: list[int] = []
    invalidated: list[object] = []  # SQLAlchemy invalidates a connection whose query a cancellation interrupted
    event.listen(
        soak_async_engine.sync_engine, "invalidate", lambda dbapi_conn, record, error: invalidated.append(error)
    )

    async def one(plan: Plan, started: asyncio.Event) -> None:
        try:
            await run(plan, started)
        except (Boom, Injected, asyncio.CancelledError) as error:
            soak.outcomes[plan.n] = type(error).__name__
            raise
        soak.outcomes[plan.n] = "ok"

    async def cancel(task: asyncio.Task[None], plan: Plan, started: asyncio.Event) -> None:
        await asyncio.wait_for(started.wait(), TIMEOUT)  # the slow query is about to be sent
        if plan.cancel_delay:
            await asyncio.sleep(plan.cancel_delay)  # a random point of the query's round trip
        cancelled.append(int(task.cancel()))

    with soak.raising.listening(SoakSession, soak_async_engine.sync_engine):
        for start in range(0, UNITS, CONCURRENCY):
            batch: list[asyncio.Future[None]] = []
            for plan in soak.todo[start : start + CONCURRENCY]:
                started = asyncio.Event()
                task = asyncio.create_task(one(plan, started))
                batch.append(task)
                if plan.fault == "cancel":
                    batch.append(asyncio.ensure_future(cancel(task, plan, started)))
            await asyncio.wait_for(asyncio.gather(*batch, return_exceptions=True), TIMEOUT)

    planned = soak.check(soak_async_engine, reader)
    assert [1] * planned["cancel"] == cancelled  # every cancellation reached a task still running
    watch.record_property("connections_invalidated", len(invalidated))
    assert all(planned[fault] >= 300 for fault in ("service", "before_flush", "after_flush", "commit", "cancel"))
    assert {"ok", "Boom", "Injected", "CancelledError"} == set(soak.outcomes.values())
