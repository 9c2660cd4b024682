"""Misuse fuzzing: random sequences of public calls on a unit of work, checked against a model of the rules.

A ``RuleBasedStateMachine`` enters and leaves blocks in every way the API
offers (``with uow:``, joined scopes, ``uow.transaction(propagation=...)``,
``uow.savepoint()``), commits, rolls back, uses the repository, registers
``on_commit`` hooks, marks transactions rollback-only and calls
``session.commit()`` where only the owner may, in random orders, inside and
outside blocks, from the right and the wrong thread or task. Each call either
works or raises the exact ``uow.errors`` type that the documented rules of
docs/transactions.md and docs/lifecycle.md predict; anything else fails.

The machine keeps a model of what must be durable: the keys that a real
(owner) commit made durable, honouring savepoint rollbacks, joined scopes that
poison their transaction, ``requires_new`` transactions, and the hooks that
must have run. After every step the committed rows (read through a separate
connection, or from the fake's committed store) equal the model; whenever the
unit of work is idle, no connection is checked out of its pool and
``uow.current()`` raises ``InactiveUnitOfWorkError``.

It runs on the sync fake, on SQLite (a file), on PostgreSQL, and on the
async twins: the async fake and asyncpg. The async ones run every step in a
single task that the machine owns, on an event loop of the test's own, as a
request handler would.

The machine keeps to what the documentation promises. Keys are never reused,
so no step fails on a duplicate key. A transaction never writes a row that
another open one has touched (docs/transactions.md: keep the inner and the
outer block on different rows; on a database the inner one would wait for the
outer one's lock), and on SQLite ``requires_new`` starts only while no outer
transaction may hold a lock. Reads follow each backend's visibility: a
database shows a transaction the rows committed since it began, the fake its
snapshot. Two rules that this machine found broken are pinned by the
regression tests at the end of this file: ``get()`` right after ``remove()``,
and ``commit()`` inside a savepoint of a rollback-only transaction.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import uow
from tests.support.databases import Database, Provisioner
from tests.support.models import Item, Sku, metadata, skus
from tests.support.uows import (
    AsyncFakeShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    FakeShopUnitOfWork,
    SqlAlchemyShopUnitOfWork,
)
from uow.errors import (
    ActiveUnitOfWorkError,
    ConfigurationError,
    InactiveUnitOfWorkError,
    JoinedScopeError,
    ModelTypeError,
    MultipleResultsError,
    NotInRepositoryError,
    OwnershipError,
    RollbackOnlyError,
    UnknownFieldError,
)

#: How long one step, a thread or the machine's task may take before the test gives up: a hang guard, never asserted.
TIMEOUT = 30.0

#: The most blocks open at once, and the most transactions among them (``requires_new`` opens one more each).
MAX_DEPTH = 6
MAX_TRANSACTIONS = 3

#: The ways a block is entered: ``with uow:``, ``uow.transaction(propagation=...)`` and ``uow.savepoint()``.
ENTRANCES = ("with", "required", "requires_new", "nested", "mandatory", "never", "savepoint")

#: The description of every Sku the machine adds, so that ``get_by(description=...)`` matches them all.
DESCRIPTION = "fuzzed"

#: What the machine calls on an idle unit of work; each needs an active block.
IDLE_CALLS = ("commit", "rollback", "set_rollback_only", "on_commit", "repository", "session", "savepoint", "mandatory")

#: What an ``on_commit`` hook does when it runs.
HOOKS = ("works", "fails", "chains", "writes")

#: Mistakes that change nothing, as "kind: detail"; each raises uow's own error.
MISUSES = (
    "refused: unknown propagation",
    "refused: unknown isolation level",
    "refused: hook not callable",
    "refused: coroutine hook",
    "repository: unknown filter",
    "repository: wrong model",
    "repository: not loaded",
    "repository: key of the wrong shape",
    "session: commit",
    "session: rollback",
    "session: close",
    "kept repository",
    "elsewhere: repository",
    "elsewhere: commit",
    "elsewhere: enter",
    "elsewhere: current",
)

OWNER, JOINED, SAVEPOINT = "owner", "joined", "savepoint"


class Boom(Exception):
    """Raised into a block by the machine, to leave it with an exception."""


class HookFailed(Exception):
    """Raised by an ``on_commit`` hook that the machine registered to fail."""


# -- the model ------------------------------------------------------------------


@attrs.define(eq=False)
class Tx:
    """The model of one transaction: its work since its last commit or rollback, and its hooks."""

    #: Keys added and removed since the last commit or rollback.
    added: set[str] = attrs.Factory(set)
    removed: set[str] = attrs.Factory(set)
    #: Keys removed since the last flush.
    unflushed: set[str] = attrs.Factory(set)
    #: Registered hooks, in order: (id, robust, behaviour, key it writes).
    hooks: list[tuple[int, bool, str, str]] = attrs.Factory(list)
    #: Keys this transaction's session has loaded, added or removed: no other transaction may write them.
    claims: set[str] = attrs.Factory(set)
    #: Whether the session may hold a database transaction now (SQLite: a lock another writer would wait for).
    touched: bool = False
    #: The fake only: the committed keys as its working copy saw them when it took it; None before that.
    snapshot: frozenset[str] | None = None
    #: The repository objects this transaction handed out; they must refuse any use once it has ended.
    repositories: list[object] = attrs.Factory(list)


@attrs.define(eq=False)
class Frame:
    """The model of one open block."""

    kind: str
    block: Any
    tx: Tx
    #: The exception of a joined scope that made this boundary (owner or savepoint) rollback-only.
    poison: BaseException | None = None
    rollback_only: bool = False
    #: A savepoint's state when it began: added, removed, and how many hooks there were.
    mark: tuple[frozenset[str], frozenset[str], int] = (frozenset(), frozenset(), 0)


async def settle(value: Any) -> Any:
    """*value*, awaited if it is awaitable: one coroutine body serves the sync and the async unit of work."""
    if inspect.isawaitable(value):
        return await value
    return value


def run_without_loop(operation: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run an operation of a sync unit of work, which never suspends, to its end in this thread."""
    coroutine = operation()
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise AssertionError("an operation on a sync unit of work suspended")


# -- the backends ---------------------------------------------------------------


class Backend:
    """What the machine needs from an implementation: units of work, committed keys, pool and a place to run."""

    is_async = False
    #: Whether the unit of work has a ``session`` property whose commit() is guarded.
    has_session = True
    #: Whether transactions read committed rows as they are now (databases) or from a snapshot (the fake).
    fake = False
    #: SQLite lets one transaction write at a time, so a nested transaction may not wait for its outer one.
    sqlite = False

    def new_unit(self) -> Any:
        raise NotImplementedError

    def committed(self, unit: Any) -> list[str]:
        raise NotImplementedError

    def checked_out(self) -> int:
        return 0

    def start(self) -> None:
        """A new example begins."""

    def stop(self) -> None:
        """The example has ended."""

    def run(self, operation: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return run_without_loop(operation)


class FakeBackend(Backend):
    has_session = False
    fake = True

    def __init__(self, kind: type[Any] = FakeShopUnitOfWork) -> None:
        self.kind = kind

    def new_unit(self) -> Any:
        return self.kind()

    def committed(self, unit: Any) -> list[str]:
        return sorted(sku.code for sku in unit.database.tables.get(Sku, {}).values())


class DatabaseBackend(Backend):
    """A SQLAlchemy unit of work on *engine*; *reader* reads the committed rows through a connection of its own."""

    def __init__(self, engine: Any, reader: Engine, kind: type[Any] = SqlAlchemyShopUnitOfWork) -> None:
        self.engine = engine
        self.reader = reader
        self.kind = kind
        self.sqlite = reader.dialect.name == "sqlite"

    def new_unit(self) -> Any:
        return self.kind(self.engine)

    def start(self) -> None:
        with self.reader.begin() as connection:
            connection.execute(skus.delete())

    def committed(self, unit: Any) -> list[str]:
        with self.reader.connect() as connection:
            return sorted(code for (code,) in connection.execute(text("SELECT code FROM uow_skus")))

    def checked_out(self) -> int:
        return int(self.engine.pool.checkedout())


class TaskRunner:
    """Runs every operation of one example in a single task on a loop of its own, as one request would."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any]] | None] = asyncio.Queue()
        self.task = loop.create_task(self._serve(), name="machine")

    async def _serve(self) -> None:
        while (item := await self.queue.get()) is not None:
            operation, future = item
            try:
                result = await operation()
            except Exception as error:
                future.set_exception(error)
            else:
                future.set_result(result)

    def run(self, operation: Callable[[], Awaitable[Any]]) -> Any:
        future: asyncio.Future[Any] = self.loop.create_future()
        self.queue.put_nowait((operation, future))
        return self.loop.run_until_complete(asyncio.wait_for(future, TIMEOUT))

    def close(self) -> None:
        self.queue.put_nowait(None)
        self.loop.run_until_complete(asyncio.wait_for(self.task, TIMEOUT))


class AsyncBackendMixin(Backend):
    is_async = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.runner: TaskRunner | None = None

    def start(self) -> None:
        self.runner = TaskRunner(self.loop)

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def run(self, operation: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        assert self.runner is not None
        return self.runner.run(operation)


class AsyncFakeBackend(AsyncBackendMixin, FakeBackend):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        AsyncBackendMixin.__init__(self, loop)
        FakeBackend.__init__(self, AsyncFakeShopUnitOfWork)


class AsyncDatabaseBackend(AsyncBackendMixin, DatabaseBackend):
    def __init__(self, loop: asyncio.AbstractEventLoop, engine: AsyncEngine, reader: Engine) -> None:
        AsyncBackendMixin.__init__(self, loop)
        DatabaseBackend.__init__(self, engine, reader, AsyncSqlAlchemyShopUnitOfWork)

    def start(self) -> None:
        DatabaseBackend.start(self)
        AsyncBackendMixin.start(self)


# -- the machine ----------------------------------------------------------------


class MisuseMachine(RuleBasedStateMachine):
    """Drives one unit of work with random public calls and checks each outcome against the model."""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        backend.start()
        self.unit = backend.new_unit()
        self.stack: list[Frame] = []
        self.durable: set[str] = set()
        self.commits = 0
        self.ran: list[int] = []
        self.expected_ran: list[int] = []
        self.stale: list[Any] = []
        self.keys: list[str] = []
        self.hooks = 0
        self.booms = 0
        self.hook_problems: list[str] = []

    # -- running calls ----------------------------------------------------------

    def outcome(self, expected: type[Exception] | None, operation: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run *operation*; it must raise exactly *expected*, or succeed when *expected* is None."""
        try:
            result = self.backend.run(operation)
        except Exception as error:
            if expected is None or type(error) is not expected:
                wanted = "success" if expected is None else expected.__name__
                raise AssertionError(f"expected {wanted}, got {type(error).__name__}: {error}") from error
            return error
        if expected is not None:
            raise AssertionError(f"expected {expected.__name__}, nothing was raised")
        return result

    def enter(self, block: Any) -> Awaitable[Any]:
        return block.__aenter__() if self.backend.is_async else settle(block.__enter__())

    def leave(self, block: Any, error: BaseException | None) -> Awaitable[Any]:
        kind = None if error is None else type(error)
        if self.backend.is_async:
            return block.__aexit__(kind, error, None)
        return settle(block.__exit__(kind, error, None))

    def repository(self) -> Any:
        """The unit of work's repository of Skus, noted as one its transaction handed out."""
        repo = self.unit.skus
        tx = self.stack[-1].tx
        if all(repo is not seen for seen in tx.repositories):
            tx.repositories.append(repo)
        return repo

    def fresh_key(self) -> str:
        key = f"k{len(self.keys):03d}"
        self.keys.append(key)
        return key

    def hook(self, number: int, behaviour: str, key: str) -> Any:
        """An ``on_commit`` hook: it works, fails, registers another hook, or commits a Sku of its own."""
        self.ran.append(number)
        try:
            uow.current()
        except InactiveUnitOfWorkError:
            pass  # hooks run after the transaction: no unit of work is current
        else:
            self.hook_problems.append(f"hook {number} found a current unit of work")
        if behaviour == "fails":
            raise HookFailed(f"hook {number} failed")
        if behaviour == "chains":
            self.unit.on_commit(functools.partial(self.hook, -number, "works", ""))
        if behaviour != "writes":
            return None
        unit = self.unit

        async def write() -> None:
            await self.enter(unit)  # starts a transaction of its own: the one that committed has ended
            try:
                await settle(unit.skus.add(Sku(key, DESCRIPTION)))
                await settle(unit.commit())
            except BaseException as error:
                await self.leave(unit, error)
                raise
            await self.leave(unit, None)

        return write() if self.backend.is_async else run_without_loop(write)

    # -- the model ----------------------------------------------------------------

    def boundary(self) -> Frame:
        """The innermost block that can roll back on its own: the owner or a savepoint."""
        return next(frame for frame in reversed(self.stack) if frame.kind != JOINED)

    def use_error(self) -> type[Exception] | None:
        """What any use of the unit of work raises now, if anything."""
        if not self.stack:
            return InactiveUnitOfWorkError
        if self.boundary().poison is not None:
            return RollbackOnlyError
        return None

    def view(self, tx: Tx) -> set[str]:
        """The keys *tx* sees: the committed ones (as a snapshot on the fake), with its own work."""
        base = self.durable if tx.snapshot is None else tx.snapshot
        return (set(base) | tx.added) - tx.removed

    def transactions(self) -> list[Tx]:
        return [frame.tx for frame in self.stack if frame.kind == OWNER]

    def touch(self, tx: Tx, *, store: bool = True) -> None:
        """*tx* used its session; with *store*, the fake's working copy was read, so it took its snapshot."""
        tx.touched = True
        if store and self.backend.fake and tx.snapshot is None:
            tx.snapshot = frozenset(self.durable)

    def claimed_elsewhere(self, tx: Tx) -> set[str]:
        return set().union(*(other.claims for other in self.transactions() if other is not tx))

    def restore(self, frame: Frame) -> None:
        """A savepoint rolls back: its work and the hooks registered inside it are dropped."""
        added, removed, hooks = frame.mark
        frame.tx.added = set(added)
        frame.tx.removed = set(removed)
        frame.tx.unflushed.clear()
        del frame.tx.hooks[hooks:]

    def pop(self) -> Frame:
        frame = self.stack.pop()
        if frame.kind == OWNER:
            self.stale.extend(frame.tx.repositories)
        return frame

    # -- entering and leaving blocks ------------------------------------------

    @precondition(lambda self: len(self.stack) < MAX_DEPTH)
    @rule(how=st.sampled_from(ENTRANCES))
    def enter_block(self, how: str) -> None:
        """Enter a block: ``with uow:`` (joining when active), a propagation mode, or a savepoint."""
        unit = self.unit
        if how == "with":
            block = unit
        elif how == "savepoint":
            block = unit.savepoint()
        else:
            block = unit.transaction(propagation=how)

        async def operation() -> Any:
            return await self.enter(block)

        if not self.stack:
            if how in ("mandatory", "savepoint"):
                self.outcome(InactiveUnitOfWorkError, operation)
                return
            kind = OWNER
        elif self.boundary().poison is not None:
            error = self.outcome(RollbackOnlyError, operation)
            assert self.boundary().poison is error.__cause__
            return
        elif how == "never":
            self.outcome(ActiveUnitOfWorkError, operation)
            return
        elif how == "requires_new":
            if len(self.transactions()) >= MAX_TRANSACTIONS:
                return
            if self.backend.sqlite and any(tx.touched for tx in self.transactions()):
                return  # SQLite: the inner transaction would wait for the outer one's lock (documented)
            kind = OWNER
        elif how in ("nested", "savepoint"):
            kind = SAVEPOINT
        else:
            kind = JOINED
        assert unit is self.outcome(None, operation)
        if kind == OWNER:
            frame = Frame(OWNER, block, Tx())
        else:
            tx = self.stack[-1].tx
            frame = Frame(kind, block, tx)
            if kind == SAVEPOINT:
                self.touch(tx)
                tx.unflushed.clear()  # beginning a savepoint flushes
                frame.mark = (frozenset(tx.added), frozenset(tx.removed), len(tx.hooks))
        self.stack.append(frame)

    @precondition(lambda self: bool(self.stack))
    @rule()
    def leave_cleanly(self) -> None:
        """Leave the innermost block without an exception."""
        frame = self.stack[-1]

        async def operation() -> Any:
            return await self.leave(frame.block, None)

        if frame.kind == JOINED:
            self.outcome(None, operation)
        elif frame.kind == SAVEPOINT:
            if frame.poison is not None:
                error = self.outcome(RollbackOnlyError, operation)
                assert frame.poison is error.__cause__
                self.restore(frame)
            else:
                self.outcome(None, operation)
                if frame.rollback_only:
                    self.restore(frame)
                frame.tx.unflushed.clear()  # releasing a savepoint flushes
        elif frame.poison is not None:
            error = self.outcome(RollbackOnlyError, operation)
            assert frame.poison is error.__cause__
        else:
            self.outcome(None, operation)  # no commit(): the owner rolls back
        self.pop()

    @precondition(lambda self: bool(self.stack))
    @rule()
    def leave_with_exception(self) -> None:
        """Leave the innermost block with an exception, which must propagate unchanged."""
        frame = self.stack[-1]
        self.booms += 1
        boom = Boom(f"boom {self.booms}")

        async def operation() -> Any:
            return await self.leave(frame.block, boom)

        assert not self.outcome(None, operation)  # __exit__ does not swallow it, nor raise another one
        self.pop()
        if frame.kind == JOINED:
            boundary = self.boundary()
            if boundary.poison is None:
                boundary.poison = boom
        elif frame.kind == SAVEPOINT:
            self.restore(frame)

    @precondition(lambda self: bool(self.stack) and len(self.stack) < MAX_DEPTH)
    @rule(how=st.sampled_from(["savepoint", "nested"]))
    def enter_savepoint(self, how: str) -> None:
        """Enter a savepoint: ``uow.savepoint()``, or ``propagation="nested"`` inside a transaction."""
        self.enter_block(how)

    @precondition(lambda self: not self.stack)
    @rule(how=st.sampled_from(["with", "required", "requires_new", "nested", "never"]))
    def start_transaction(self, how: str) -> None:
        """Enter an idle unit of work: every mode but ``mandatory`` starts a transaction and owns it."""
        self.enter_block(how)

    @precondition(lambda self: not self.stack)
    @rule(call=st.sampled_from(IDLE_CALLS))
    def call_while_idle(self, call: str) -> None:
        """Outside a block there is nothing to use: each call raises InactiveUnitOfWorkError."""
        unit = self.unit
        if call == "session" and not self.backend.has_session:
            return
        calls: dict[str, Callable[[], Any]] = {
            "commit": unit.commit,
            "rollback": unit.rollback,
            "set_rollback_only": unit.set_rollback_only,
            "on_commit": lambda: unit.on_commit(print),
            "repository": lambda: unit.skus,
            "session": lambda: unit.session,
            "savepoint": lambda: self.enter(unit.savepoint()),
            "mandatory": lambda: self.enter(unit.transaction(propagation="mandatory")),
        }

        async def operation() -> Any:
            return await settle(calls[call]())

        self.outcome(InactiveUnitOfWorkError, operation)

    def check_refused_at_once(self, which: str) -> None:
        """Bad options and bad hooks are refused with ConfigurationError, active or not, before anything starts."""
        unit = self.unit
        if which == "coroutine hook" and self.backend.is_async:
            return  # an async unit of work awaits coroutine hooks

        async def coroutine_hook() -> None:
            """Never registered."""

        calls: dict[str, Callable[[], Any]] = {
            "unknown propagation": lambda: self.enter(unit.transaction(propagation="sometimes")),
            "unknown isolation level": lambda: self.enter(unit.transaction(isolation_level="SNAPSHOT")),
            "hook not callable": lambda: unit.on_commit("not callable"),
            "coroutine hook": lambda: unit.on_commit(coroutine_hook),
        }

        async def operation() -> Any:
            return await settle(calls[which]())

        self.outcome(ConfigurationError, operation)

    # -- the transaction --------------------------------------------------------

    @precondition(lambda self: bool(self.stack))
    @rule()
    def commit(self) -> None:
        """``commit()``: real in the owner's block, a check and a flush elsewhere."""

        async def operation() -> Any:
            return await settle(self.unit.commit())

        error = self.use_error()
        if error is not None:
            self.outcome(error, operation)
            return
        frame = self.stack[-1]
        tx = frame.tx
        if any(other.rollback_only for other in self.stack if other.tx is tx):
            self.outcome(RollbackOnlyError, operation)  # out to the owner: a savepoint does not hide it
            return
        if frame.kind != OWNER:
            self.outcome(None, operation)
            self.touch(tx)
            tx.unflushed.clear()
            return
        expected: type[Exception] | None = None
        written: list[str] = []
        queue = list(tx.hooks)
        while queue:
            number, robust, behaviour, key = queue.pop(0)
            self.expected_ran.append(number)
            if behaviour == "fails" and not robust:
                expected = HookFailed  # it stops the hooks after it; the data is committed by then
                break
            if behaviour == "chains":
                queue.append((-number, False, "works", ""))  # a hook registered by a hook runs in the same pass
            if behaviour == "writes":
                written.append(key)
        self.touch(tx)
        self.outcome(expected, operation)
        self.durable = (self.durable | tx.added) - tx.removed
        self.commits += 1
        tx.added, tx.removed, tx.hooks, tx.unflushed = set(), set(), [], set()
        tx.touched = False
        if self.backend.fake:
            tx.snapshot = frozenset(self.durable)  # taken at the commit, before the hooks committed theirs
        self.durable.update(written)
        self.commits += len(written)

    def check_rollback(self) -> None:
        """``rollback()``: the owner discards its work and goes on; a joined scope or a savepoint may not."""

        async def operation() -> Any:
            return await settle(self.unit.rollback())

        if not self.stack:
            self.outcome(InactiveUnitOfWorkError, operation)
            return
        frame = self.stack[-1]
        if frame.kind != OWNER:
            self.outcome(JoinedScopeError, operation)
            return
        self.outcome(None, operation)
        tx = frame.tx
        tx.added, tx.removed, tx.hooks, tx.unflushed = set(), set(), [], set()
        tx.touched = False
        tx.snapshot = None
        frame.poison = None
        frame.rollback_only = False

    def check_set_rollback_only(self) -> None:
        """``set_rollback_only()``: the boundary rolls back quietly at its end, and commit() is refused."""

        async def operation() -> Any:
            return await settle(self.unit.set_rollback_only())

        error = self.use_error()
        self.outcome(error, operation)
        if error is None:
            self.boundary().rollback_only = True

    @precondition(lambda self: bool(self.stack))
    @rule(robust=st.booleans(), behaviour=st.sampled_from(HOOKS))
    def on_commit(self, robust: bool, behaviour: str) -> None:
        """Register a hook, robust or not, that works, raises, registers another, or commits on its own."""
        if behaviour == "writes" and self.backend.sqlite and len(self.transactions()) > 1:
            return  # SQLite: it would wait for the lock of the suspended outer transaction
        self.hooks += 1
        number = self.hooks
        key = self.fresh_key() if behaviour == "writes" else ""
        callback = functools.partial(self.hook, number, behaviour, key)

        async def operation() -> Any:
            return await settle(self.unit.on_commit(callback, robust=robust))

        error = self.use_error()
        self.outcome(error, operation)
        if error is None:
            self.stack[-1].tx.hooks.append((number, robust, behaviour, key))

    def check_session_behind_the_owners_back(self, method: str) -> None:
        """``session.commit()``, ``rollback()`` or ``close()`` outside the owner's own block are refused."""

        async def operation() -> Any:
            return await settle(getattr(self.unit.session, method)())

        error = self.use_error()
        if error is not None:
            self.outcome(error, operation)
        elif self.stack[-1].kind != OWNER:
            self.outcome(JoinedScopeError, operation)

    # -- the repository ---------------------------------------------------------

    def check_add(self, count: int) -> None:
        """``add()`` or ``add_all()`` new Skus, under keys never used before."""
        keys = [self.fresh_key() for _ in range(count)]

        async def operation() -> Any:
            repo = self.repository()
            if count == 1:
                return await settle(repo.add(Sku(keys[0], DESCRIPTION)))
            return await settle(repo.add_all([Sku(key, DESCRIPTION) for key in keys]))

        error = self.use_error()
        self.outcome(error, operation)
        if error is None:
            tx = self.stack[-1].tx
            self.touch(tx)
            tx.added.update(keys)
            tx.claims.update(keys)

    def check_get(self, data: st.DataObject) -> None:
        """``get()`` finds exactly the keys the transaction sees."""
        key = data.draw(st.sampled_from([*self.keys, "never-added"]), label="key")

        async def operation() -> Any:
            return await settle(self.repository().get(key))

        error = self.use_error()
        found = self.outcome(error, operation)
        if error is None:
            tx = self.stack[-1].tx
            self.touch(tx)
            assert (key in self.view(tx)) == (found is not None)
            assert found is None or key == found.code
            tx.claims.add(key)

    def check_remove(self, data: st.DataObject) -> None:
        """``remove()`` an object that ``get()`` returned; one added in the block is simply not added."""
        error = self.use_error()
        key = "never-added"
        if error is None:
            tx = self.stack[-1].tx
            candidates = sorted(self.view(tx) - self.claimed_elsewhere(tx))
            if not candidates:
                return
            key = data.draw(st.sampled_from(candidates), label="key")

        async def operation() -> Any:
            repo = self.repository()
            found = await settle(repo.get(key))
            return await settle(repo.remove(found))

        self.outcome(error, operation)
        if error is None:
            self.touch(tx)
            if key in tx.added:
                tx.added.discard(key)
            else:
                tx.removed.add(key)
            tx.unflushed.add(key)
            tx.claims.add(key)

    def check_count(self) -> None:
        """``count()`` counts exactly the keys the transaction sees."""

        async def operation() -> Any:
            return await settle(self.repository().count())

        error = self.use_error()
        counted = self.outcome(error, operation)
        if error is None:
            tx = self.stack[-1].tx
            self.touch(tx)
            tx.unflushed.clear()
            seen = self.view(tx)
            assert len(seen) == counted
            tx.claims.update(seen)

    def check_get_by(self) -> None:
        """``get_by()`` returns the one match, None for none, and raises MultipleResultsError for several."""

        async def operation() -> Any:
            return await settle(self.repository().get_by(description=DESCRIPTION))

        error = self.use_error()
        if error is not None:
            self.outcome(error, operation)
            return
        tx = self.stack[-1].tx
        seen = self.view(tx)
        found = self.outcome(MultipleResultsError if len(seen) > 1 else None, operation)
        self.touch(tx)
        tx.unflushed.clear()
        if len(seen) < 2:
            assert sorted(seen) == ([] if found is None else [found.code])
        tx.claims.update(seen)

    def check_repository_misuse(self, which: str) -> None:
        """Mistakes with the repository raise uow's own errors, and leave the transaction healthy."""
        expected: dict[str, type[Exception]] = {
            "unknown filter": UnknownFieldError,
            "wrong model": ModelTypeError,
            "not loaded": NotInRepositoryError,
            "key of the wrong shape": UnknownFieldError,
        }
        unloaded = Sku(self.fresh_key(), DESCRIPTION)

        async def operation() -> Any:
            repo = self.repository()
            if which == "unknown filter":
                return await settle(repo.get_by(colour="red"))
            if which == "wrong model":
                return await settle(repo.add(Item("not a sku")))
            if which == "not loaded":
                return await settle(repo.remove(unloaded))
            return await settle(repo.get(("two", "values")))

        error = self.use_error()
        self.outcome(error or expected[which], operation)
        if error is None:
            self.touch(self.stack[-1].tx, store=which == "not loaded")

    def check_use_a_kept_repository(self, data: st.DataObject) -> None:
        """A repository kept from a transaction that has ended refuses any use."""
        repo = self.stale[data.draw(st.integers(0, len(self.stale) - 1), label="repository")]

        async def operation() -> Any:
            return await settle(repo.count())

        self.outcome(InactiveUnitOfWorkError, operation)

    def check_use_from_elsewhere(self, what: str) -> None:
        """Another thread (or task) gets OwnershipError while a block runs, InactiveUnitOfWorkError after.

        ``uow.current()`` there finds nothing either way: the block belongs to the thread and task that entered it.
        """
        if what == "enter" and not self.stack:
            return  # entering an idle unit of work elsewhere starts a transaction there: no misuse
        expected = InactiveUnitOfWorkError if not self.stack or what == "current" else OwnershipError
        unit = self.unit

        async def attempt() -> Any:
            if what == "repository":
                return await settle(unit.skus.count())
            if what == "commit":
                return await settle(unit.commit())
            if what == "current":
                return uow.current()
            return await self.enter(unit)

        if self.backend.is_async:

            async def operation() -> Any:
                # Not asyncio.wait_for(): before Python 3.12 the task it waits on acts for the waiting owner.
                task = asyncio.create_task(attempt(), name="elsewhere")
                await asyncio.wait({task}, timeout=TIMEOUT)
                return task.result()

            self.outcome(expected, operation)
            return
        outcomes: list[Exception | None] = []

        def in_another_thread() -> None:
            try:
                run_without_loop(attempt)
            except Exception as error:
                outcomes.append(error)
            else:
                outcomes.append(None)

        thread = threading.Thread(target=in_another_thread, name="elsewhere")
        thread.start()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert [expected] == [type(error) for error in outcomes]

    # -- the rules that only read or misuse: one rule each, so that the state-changing rules come up often --

    @precondition(lambda self: bool(self.stack))
    @rule(which=st.sampled_from(["rollback", "set_rollback_only"]))
    def give_up(self, which: str) -> None:
        """Give up the work: ``rollback()`` now, or ``set_rollback_only()`` for the end of the boundary."""
        if which == "rollback":
            self.check_rollback()
        else:
            self.check_set_rollback_only()

    @precondition(lambda self: bool(self.stack))
    @rule(which=st.sampled_from(["add one", "add two", "remove"]), data=st.data())
    def write(self, which: str, data: st.DataObject) -> None:
        """Write through the repository: add(), add_all() or remove()."""
        if which == "remove":
            self.check_remove(data)
        else:
            self.check_add(1 if which == "add one" else 2)

    @precondition(lambda self: bool(self.stack))
    @rule(which=st.sampled_from(["get", "count", "get_by"]), data=st.data())
    def read(self, which: str, data: st.DataObject) -> None:
        """Read through the repository: get(), count() or get_by()."""
        if which == "get":
            self.check_get(data)
        elif which == "count":
            self.check_count()
        else:
            self.check_get_by()

    @rule(which=st.sampled_from(MISUSES), data=st.data())
    def misuse(self, which: str, data: st.DataObject) -> None:
        """A mistake that changes nothing: it raises uow's own error, active or not."""
        kind, _, detail = which.partition(": ")
        if kind == "refused":
            self.check_refused_at_once(detail)
        elif kind == "repository" and self.stack:
            self.check_repository_misuse(detail)
        elif kind == "session" and self.stack and self.backend.has_session:
            self.check_session_behind_the_owners_back(detail)
        elif kind == "kept repository" and self.stale:
            self.check_use_a_kept_repository(data)
        elif kind == "elsewhere":
            self.check_use_from_elsewhere(detail)

    # -- invariants -------------------------------------------------------------

    @invariant()
    def committed_rows_match_the_model(self) -> None:
        """The committed rows are exactly the model's, and the hooks that ran exactly those it expects."""
        assert sorted(self.durable) == self.backend.committed(self.unit)
        assert self.commits == self.unit.commits
        assert self.expected_ran == self.ran
        assert [] == self.hook_problems

    @invariant()
    def idle_means_nothing_held(self) -> None:
        """Idle: no connection is checked out and nothing is current; active: this unit of work is current."""
        assert bool(self.stack) == self.unit.active

        async def current() -> Any:
            return uow.current()

        if self.stack:
            assert self.unit is self.outcome(None, current)
        else:
            assert 0 == self.backend.checked_out()
            self.outcome(InactiveUnitOfWorkError, current)

    def teardown(self) -> None:
        """Leave every open block with an exception, so that the unit of work ends idle whatever happened before."""
        failures: list[Exception] = []
        try:
            blocks = [frame.block for frame in reversed(self.stack)]
            self.stack.clear()
            # Blocks the model lost track of, after a failed step, are left through the unit of work itself.
            blocks += [self.unit] * (MAX_DEPTH + 1)
            for block in blocks:
                if not self.unit.active:
                    break

                async def operation(block: Any = block) -> Any:
                    return await self.leave(block, Boom("teardown"))

                try:
                    self.backend.run(operation)
                except Exception as error:
                    failures.append(error)
            assert [] == [f"{type(error).__name__}: {error}" for error in failures]
            assert not self.unit.active
            assert 0 == self.backend.checked_out()
        finally:
            self.backend.stop()


def run_machine(backend: Backend, *, examples: int, steps: int) -> None:
    """Run the machine on *backend* for *examples* random sequences of up to *steps* calls each."""
    run_state_machine_as_test(
        lambda: MisuseMachine(backend),
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- the tests --------------------------------------------------------------------


def test_misuse_on_the_fake() -> None:
    """Random sequences of public calls on the sync fake follow the documented rules."""
    run_machine(FakeBackend(), examples=300, steps=80)


def test_misuse_on_the_async_fake() -> None:
    """Random sequences of public calls on the async fake, from one task, follow the documented rules."""
    loop = asyncio.new_event_loop()
    try:
        run_machine(AsyncFakeBackend(loop), examples=150, steps=60)
    finally:
        loop.close()


def test_misuse_on_sqlite(tmp_path: Path) -> None:
    """Random sequences of public calls on SQLite (a file) follow the documented rules."""
    url = f"sqlite:///{tmp_path / 'misuse.sqlite3'}"
    engine, reader = create_engine(url), create_engine(url)
    metadata.create_all(reader)
    try:
        run_machine(DatabaseBackend(engine, reader), examples=120, steps=60)
    finally:
        engine.dispose()
        reader.dispose()


def test_misuse_on_postgresql(pg_engine: Engine, provisioner: Provisioner) -> None:
    """Random sequences of public calls on PostgreSQL follow the documented rules."""
    run_machine(DatabaseBackend(pg_engine, provisioner.schema_engine("postgresql")), examples=160, steps=60)


def test_misuse_on_asyncpg(pg_engine: Engine, pg_database: Database) -> None:
    """Random sequences of public calls on asyncpg, from one task, follow the documented rules."""
    loop = asyncio.new_event_loop()
    engine = create_async_engine(pg_database.async_url)
    try:
        run_machine(AsyncDatabaseBackend(loop, engine, pg_engine), examples=80, steps=60)
        assert 0 == engine.pool.checkedout()
    finally:
        loop.run_until_complete(engine.dispose())
        loop.close()


# -- where uow and its documentation disagree: the minimal reproductions --------------


@pytest.fixture(params=["fake", "postgresql"])
def shop(request: pytest.FixtureRequest) -> Any:
    """A unit of work on the fake, then on PostgreSQL."""
    if request.param == "fake":
        return FakeShopUnitOfWork()
    return SqlAlchemyShopUnitOfWork(request.getfixturevalue("pg_engine"))


def test_get_after_remove_in_the_same_block_finds_nothing(shop: Any) -> None:
    """After remove(), get() of the same key returns None, as count() already says there is nothing."""
    with shop:
        shop.skus.add(Sku("LAMP"))
        shop.commit()
    with shop:
        shop.skus.remove(shop.skus.get("LAMP"))
        assert None is shop.skus.get("LAMP")


def test_joined_commit_inside_a_savepoint_of_a_rollback_only_transaction_is_refused(shop: Any) -> None:
    """A joined commit() checks that the transaction may still commit, with or without a savepoint in between."""
    with shop:
        shop.set_rollback_only()
        with shop, pytest.raises(RollbackOnlyError):  # a service joined directly: its commit() is refused
            shop.commit()
        with shop.savepoint(), shop:  # the same service, joined inside a savepoint
            shop.skus.add(Sku("LAMP"))
            with pytest.raises(RollbackOnlyError):
                shop.commit()
