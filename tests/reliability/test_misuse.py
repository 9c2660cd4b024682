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

Generators hold blocks open while they are suspended, as a streaming
response does: the machine starts generators (async generators on an async
unit of work) whose body enters ``with uow:`` (joined), ``uow.savepoint()``
or a ``requires_new`` transaction, adds a Sku, counts and yields, directly or
through a generator that delegates to it; it resumes them with ``next()``,
runs them out, closes them, and breaks out of ``for`` loops over them, across
its other steps. The model follows docs/transactions.md#generators: the code
around a suspended generator acts in the innermost block that no suspended
generator holds, and is refused with OwnershipError (naming the generator)
while one holds a savepoint or a transaction above it; a block's exit first
closes what suspended generators hold above it, as if they had been closed
(logged as a warning, which the machine counts), and a generator resumed
after that may not use the unit of work; closing a generator is no failure;
blocks that overlap raise OwnershipError, but a joined one simply goes.
After every step the open scopes of the unit of work are the model's. While
the unit of work is idle, threads (or tasks) race to enter it: each one gets
OwnershipError or has its row stored.

It runs on the sync fake, on SQLite (a file), on PostgreSQL, and on the
async twins: the async fake and asyncpg. The async ones run every step in a
single task that the machine owns, on an event loop of the test's own, as a
request handler would.

The machine keeps to what the documentation promises. Keys are never reused,
so no step fails on a duplicate key. A transaction never writes a row that
another open one has touched (docs/transactions.md: keep the inner and the
outer block on different rows; on a database the inner one would wait for the
outer one's lock), and on SQLite ``requires_new`` starts only while no outer
transaction may hold a lock. Reads show a transaction the rows committed
since it began, on the databases as on the fake (READ COMMITTED). Two rules
that this machine found broken are pinned by the regression tests at the
end of this file: ``get()`` right after ``remove()``, and ``commit()`` inside
a savepoint of a rollback-only transaction.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, event, settings
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

#: The blocks a generator enters: ``with uow:`` (joined), ``uow.savepoint()``, and a transaction of its own.
REQUIRES_NEW = "requires_new"
GENERATOR_BLOCKS = (JOINED, SAVEPOINT, REQUIRES_NEW)

#: The most generators the machine keeps suspended at once.
MAX_GENERATORS = 3

#: What the ``uow`` logger says when a block ends while a scope that a generator entered after it is still open.
CLOSED_EARLY = "as if its generator had been closed"

#: What ``next()`` returns, in the machine, for a generator that has ended.
DONE = "done"


class Boom(Exception):
    """Raised into a block by the machine, to leave it with an exception."""


class HookFailed(Exception):
    """Raised by an ``on_commit`` hook that the machine registered to fail."""


class Raised(Exception):
    """In the model of a generator's body: the unit of work raises *kind* here, its message naming *match* if given."""

    def __init__(self, kind: type[BaseException], match: str | None = None) -> None:
        super().__init__(kind.__name__)
        self.kind = kind
        self.match = match


#: What made a boundary rollback-only: the exception itself, or only its type when it was raised in a generator.
Poison = BaseException | type[BaseException] | None


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
    #: The repository objects this transaction handed out; they must refuse any use once it has ended.
    repositories: list[object] = attrs.Factory(list)


@attrs.define(eq=False)
class Frame:
    """The model of one open block."""

    kind: str
    block: Any
    tx: Tx
    #: The exception of a joined scope that made this boundary (owner or savepoint) rollback-only.
    poison: Poison = None
    rollback_only: bool = False
    #: A savepoint's state when it began: added, removed, and how many hooks there were.
    mark: tuple[frozenset[str], frozenset[str], int] = (frozenset(), frozenset(), 0)
    #: The generator whose body entered this block, and the name of its function; None for the machine's own.
    gen: Gen | None = None
    where: str = ""
    #: Whether that generator runs now (while the machine resumes or closes it), rather than being suspended.
    running: bool = False


@attrs.define(eq=False)
class Gen:
    """The model of one generator that the machine started: it enters a block, adds a Sku and yields, per key."""

    how: str
    #: Whether it delegates to the generator that does the work, from a joined block of its own.
    nested: bool
    keys: list[str]
    #: Whether it calls commit() in its block after its last key.
    commit: bool
    #: The generator the machine drives, and (async, nested) the inner one, which it closes after the outer one.
    iterator: Any = None
    inner: Any = None
    #: How many keys it has yielded.
    position: int = 0
    #: The frames of the blocks its body entered, outermost first, whether still open or not.
    entered: list[Frame] = attrs.Factory(list)


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


# -- generators that hold a block of the unit of work open while suspended ---------


def generator_block_of(unit: Any, how: str) -> Any:
    """What a generator's ``with`` statement enters: *unit* itself (joined), a savepoint, or a new transaction."""
    if how == JOINED:
        return unit
    if how == SAVEPOINT:
        return unit.savepoint()
    return unit.transaction(propagation=REQUIRES_NEW)


def generator_block(unit: Any, how: str, keys: list[str], commit: bool) -> Iterator[tuple[str, int]]:
    """Enter a block of *unit*, then add a Sku and yield its key and count(), per key; commit() at the end if asked."""
    with generator_block_of(unit, how):
        for key in keys:
            unit.skus.add(Sku(key, DESCRIPTION))
            yield key, unit.skus.count()
        if commit:
            unit.commit()


def delegating_generator(unit: Any, inner: Iterator[tuple[str, int]]) -> Iterator[tuple[str, int]]:
    """Join the block of the code around, and yield what *inner* yields: closing this one closes *inner* first."""
    with unit:
        yield from inner


async def async_generator_block(unit: Any, how: str, keys: list[str], commit: bool) -> AsyncIterator[tuple[str, int]]:
    """The async twin of :func:`generator_block`."""
    async with generator_block_of(unit, how):
        for key in keys:
            await unit.skus.add(Sku(key, DESCRIPTION))
            yield key, await unit.skus.count()
        if commit:
            await unit.commit()


async def async_delegating_generator(
    unit: Any, inner: AsyncIterator[tuple[str, int]]
) -> AsyncIterator[tuple[str, int]]:
    """The async twin of :func:`delegating_generator`: closing this one leaves *inner* suspended in its block."""
    async with unit:
        async for value in inner:
            yield value


class EarlyCloses(logging.Handler):
    """Counts the warnings of the ``uow`` logger about scopes closed early, as if their generator had been closed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if CLOSED_EARLY in record.getMessage():
            self.count += 1


# -- the backends ---------------------------------------------------------------


class Backend:
    """What the machine needs from an implementation: units of work, committed keys, pool and a place to run."""

    is_async = False
    #: Whether the unit of work has a ``session`` property whose commit() is guarded.
    has_session = True
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

    def __init__(self, kind: type[Any] = FakeShopUnitOfWork) -> None:
        self.kind = kind

    def new_unit(self) -> Any:
        return self.kind()

    def committed(self, unit: Any) -> list[str]:
        return sorted(row["code"] for row in unit.database.rows(Sku))


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
        #: The keys that threads or tasks racing for the idle unit of work tried to store.
        self.raced: set[str] = set()
        #: The generators started and not ended yet, oldest first.
        self.generators: list[Gen] = []
        #: How many scopes a block's exit closed early, and the warnings the ``uow`` logger gave for them.
        self.closed_early = 0
        self.early = EarlyCloses()
        logging.getLogger("uow").addHandler(self.early)

    # -- running calls ----------------------------------------------------------

    def outcome(
        self,
        expected: type[BaseException] | None,
        operation: Callable[[], Coroutine[Any, Any, Any]],
        *,
        match: str | None = None,
    ) -> Any:
        """Run *operation*; it must raise exactly *expected* (its message naming *match*), or succeed when None."""
        try:
            result = self.backend.run(operation)
        except Exception as error:
            if expected is None or type(error) is not expected:
                wanted = "success" if expected is None else expected.__name__
                raise AssertionError(f"expected {wanted}, got {type(error).__name__}: {error}") from error
            if match is not None and match not in str(error):
                raise AssertionError(f"expected {expected.__name__} naming {match}, got: {error}") from error
            return error
        if expected is not None:
            raise AssertionError(f"expected {expected.__name__}, nothing was raised")
        return result

    def use(self, operation: Callable[[], Coroutine[Any, Any, Any]]) -> tuple[type[Exception] | None, Any]:
        """Run *operation*, a use of the unit of work: it raises what :meth:`use_error` says, or works."""
        error = self.use_error()
        holder = self.holder() if error is OwnershipError else None
        return error, self.outcome(error, operation, match=None if holder is None else holder.where)

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

    def suspended(self, frame: Frame) -> bool:
        """Whether *frame* is held by a generator that is suspended now: the running code is outside it."""
        return frame.gen is not None and not frame.running

    def acting_index(self) -> int:
        """Where the running code acts: the innermost block not held by a suspended generator.

        The machine's outermost block is never a generator's: generators
        start inside a block of the machine.
        """
        index = len(self.stack) - 1
        while index > 0 and self.suspended(self.stack[index]):
            index -= 1
        return index

    def acting(self) -> Frame:
        """The block the running code acts in."""
        return self.stack[self.acting_index()]

    def holder(self) -> Frame | None:
        """A savepoint or transaction that a suspended generator holds above the acting block: it refuses any use."""
        return next((frame for frame in self.stack[self.acting_index() + 1 :] if frame.kind != JOINED), None)

    def boundary(self, frame: Frame | None = None) -> Frame:
        """The innermost block that can roll back on its own (owner or savepoint) around *frame*, or the acting one."""
        index = self.acting_index() if frame is None else self.stack.index(frame)
        return next(outer for outer in reversed(self.stack[: index + 1]) if outer.kind != JOINED)

    def use_error(self) -> type[Exception] | None:
        """What any use of the unit of work raises now, if anything."""
        if not self.stack:
            return InactiveUnitOfWorkError
        if self.holder() is not None:
            return OwnershipError
        if self.boundary().poison is not None:
            return RollbackOnlyError
        return None

    def caused_by(self, poison: Poison, error: BaseException) -> None:
        """*error* names *poison* as its cause: the same exception, or one of its type raised in a generator."""
        if isinstance(poison, type):
            assert poison is type(error.__cause__)
        else:
            assert poison is error.__cause__

    def view(self, tx: Tx) -> set[str]:
        """The keys *tx* sees: the committed ones as they are now, with its own work."""
        return (set(self.durable) | tx.added) - tx.removed

    def transactions(self) -> list[Tx]:
        return [frame.tx for frame in self.stack if frame.kind == OWNER]

    def touch(self, tx: Tx, *, store: bool = True) -> None:
        """*tx* used its session (*store*: its rows too, which changes nothing in what it sees)."""
        tx.touched = True

    def claimed_elsewhere(self, tx: Tx) -> set[str]:
        return set().union(*(other.claims for other in self.transactions() if other is not tx))

    def restore(self, frame: Frame) -> None:
        """A savepoint rolls back: its work and the hooks registered inside it are dropped."""
        added, removed, hooks = frame.mark
        frame.tx.added = set(added)
        frame.tx.removed = set(removed)
        frame.tx.unflushed.clear()
        del frame.tx.hooks[hooks:]

    def pop(self, frame: Frame) -> None:
        """*frame*, the innermost, is left; an owner's repositories refuse any use from now on."""
        assert frame is self.stack.pop()
        if frame.kind == OWNER:
            self.stale.extend(frame.tx.repositories)

    def close_early(self, frame: Frame) -> None:
        """A block's exit closes *frame*, the innermost, as if its generator had been closed: a savepoint rolls back."""
        self.closed_early += 1
        if frame.kind == SAVEPOINT:
            self.restore(frame)
        self.pop(frame)

    def leave_model(self, frame: Frame, exc: Poison) -> tuple[type[Exception] | None, Poison]:
        """Leave *frame*'s block with *exc* in the model; return what the exit raises, if anything, and its cause.

        Blocks still open above it are closed early if suspended generators
        hold them all; if a block above is running, a joined scope is simply
        removed, and any other raises OwnershipError ("blocks must nest").
        """
        if frame not in self.stack:
            return None, None  # an outer block's exit closed it early: its own exit does nothing
        closing = exc is GeneratorExit
        above = self.stack[self.stack.index(frame) + 1 :]
        overlap = any(not self.suspended(held) for held in above)
        if overlap and frame.kind == JOINED:
            boundary = self.boundary(frame)
            self.stack.remove(frame)
            if exc is not None and not closing and boundary.poison is None:
                boundary.poison = exc
            return None, None
        for held in reversed(above):
            self.close_early(held)
        if overlap:
            exc = OwnershipError
        if frame.kind == JOINED:
            boundary = self.boundary(frame)
            self.pop(frame)
            if exc is not None and not closing and boundary.poison is None:
                boundary.poison = exc
            return None, None
        if frame.kind == SAVEPOINT:
            if exc is None and frame.poison is None and not frame.rollback_only:
                frame.tx.unflushed.clear()  # releasing a savepoint flushes
            else:
                self.restore(frame)
        self.pop(frame)  # an owner that did not commit() rolls back
        if overlap:  # the transaction around becomes rollback-only
            if self.stack and self.boundary().poison is None:
                self.boundary().poison = OwnershipError
            return OwnershipError, None
        if exc is None and frame.poison is not None:
            return RollbackOnlyError, frame.poison
        return None, None

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
        elif self.use_error() is not None:
            error = self.use(operation)[1]
            if isinstance(error, RollbackOnlyError):
                self.caused_by(self.boundary().poison, error)
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
            tx = self.acting().tx
            frame = Frame(kind, block, tx)
            if kind == SAVEPOINT:
                self.touch(tx)
                tx.unflushed.clear()  # beginning a savepoint flushes
                frame.mark = (frozenset(tx.added), frozenset(tx.removed), len(tx.hooks))
        self.stack.append(frame)

    @precondition(lambda self: bool(self.stack))
    @rule()
    def leave_cleanly(self) -> None:
        """Leave the innermost block of the machine without an exception, closing what generators hold above it."""
        frame = self.acting()

        async def operation() -> Any:
            return await self.leave(frame.block, None)

        closed_early = self.closed_early
        expected, cause = self.leave_model(frame, None)
        error = self.outcome(expected, operation)
        if cause is not None:
            self.caused_by(cause, error)
        self.look_after_closing_early(closed_early)

    @precondition(lambda self: bool(self.stack))
    @rule()
    def leave_with_exception(self) -> None:
        """Leave the innermost block of the machine with an exception, which must propagate unchanged."""
        frame = self.acting()
        self.booms += 1
        boom = Boom(f"boom {self.booms}")

        async def operation() -> Any:
            return await self.leave(frame.block, boom)

        closed_early = self.closed_early
        assert (None, None) == self.leave_model(frame, boom)
        assert not self.outcome(None, operation)  # __exit__ does not swallow it, nor raise another one
        self.look_after_closing_early(closed_early)

    @precondition(lambda self: len(self.stack) > 1)
    @rule(error=st.booleans(), data=st.data())
    def leave_out_of_order(self, error: bool, data: st.DataObject) -> None:
        """Leave a block of the machine from under one entered after it: a joined scope goes, others must nest."""
        acting = self.acting_index()
        # ``with uow:`` leaves the scope the code acts in; a block object leaves the one it entered.
        below = [frame for frame in self.stack[:acting] if frame.gen is None and frame.block is not self.unit]
        if not below:
            return
        frame = below[data.draw(st.integers(0, len(below) - 1), label="block")]
        self.booms += 1
        boom = Boom(f"boom {self.booms}") if error else None

        async def operation() -> Any:
            return await self.leave(frame.block, boom)

        closed_early = self.closed_early
        expected, _ = self.leave_model(frame, boom)
        self.outcome(expected, operation, match="blocks must nest")
        event(f"out of order ({frame.kind}): {'refused' if expected else 'left'}")
        self.look_after_closing_early(closed_early)

    def look_after_closing_early(self, closed_early: int) -> None:
        """After an exit closed blocks early, count() where the code acts now: their work is kept or gone as due."""
        if self.closed_early > closed_early and self.stack and self.use_error() is None:
            self.check_count()

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

        if self.use_error() is not None:
            self.use(operation)
            return
        if self.commit_refused():
            self.outcome(RollbackOnlyError, operation)  # out to the owner: a savepoint does not hide it
            return
        frame = self.acting()
        if frame.kind != OWNER:
            self.outcome(None, operation)
            self.flushed(frame.tx)
            return
        self.outcome(self.committed(frame.tx), operation)

    def commit_refused(self) -> bool:
        """Whether commit() raises RollbackOnlyError: set_rollback_only() from the owner in to the acting block."""
        index = self.acting_index()
        tx = self.stack[index].tx
        return any(other.rollback_only for other in self.stack[: index + 1] if other.tx is tx)

    def flushed(self, tx: Tx) -> None:
        """A commit() that is not the owner's flushes."""
        self.touch(tx)
        tx.unflushed.clear()

    def committed(self, tx: Tx) -> type[Exception] | None:
        """The owner commits *tx*, then runs its hooks: the model's new state, and what commit() raises."""
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
        self.durable = (self.durable | tx.added) - tx.removed
        self.commits += 1
        tx.added, tx.removed, tx.hooks, tx.unflushed = set(), set(), [], set()
        tx.touched = False
        self.durable.update(written)
        self.commits += len(written)
        return expected

    def check_rollback(self) -> None:
        """``rollback()``: the owner discards its work and goes on; a joined scope or a savepoint may not."""

        async def operation() -> Any:
            return await settle(self.unit.rollback())

        if not self.stack or self.holder() is not None:
            self.use(operation)  # only these: a rollback-only transaction may still roll back
            return
        frame = self.acting()
        if frame.kind != OWNER:
            self.outcome(JoinedScopeError, operation)
            return
        self.outcome(None, operation)
        tx = frame.tx
        tx.added, tx.removed, tx.hooks, tx.unflushed = set(), set(), [], set()
        tx.touched = False
        frame.poison = None
        frame.rollback_only = False

    def check_set_rollback_only(self) -> None:
        """``set_rollback_only()``: the boundary rolls back quietly at its end, and commit() is refused."""

        async def operation() -> Any:
            return await settle(self.unit.set_rollback_only())

        if self.use(operation)[0] is None:
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

        if self.use(operation)[0] is None:
            self.acting().tx.hooks.append((number, robust, behaviour, key))

    def check_session_behind_the_owners_back(self, method: str) -> None:
        """``session.commit()``, ``rollback()`` or ``close()`` outside the owner's own block are refused."""

        async def operation() -> Any:
            return await settle(getattr(self.unit.session, method)())

        if self.use_error() is not None:
            self.use(operation)
        elif self.acting().kind != OWNER:
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

        if self.use(operation)[0] is None:
            tx = self.acting().tx
            self.touch(tx)
            tx.added.update(keys)
            tx.claims.update(keys)

    def check_get(self, data: st.DataObject) -> None:
        """``get()`` finds exactly the keys the transaction sees."""
        key = data.draw(st.sampled_from([*self.keys, "never-added"]), label="key")

        async def operation() -> Any:
            return await settle(self.repository().get(key))

        error, found = self.use(operation)
        if error is None:
            tx = self.acting().tx
            self.touch(tx)
            assert (key in self.view(tx)) == (found is not None)
            assert found is None or key == found.code
            tx.claims.add(key)

    def check_remove(self, data: st.DataObject) -> None:
        """``remove()`` an object that ``get()`` returned; one added in the block is simply not added."""
        error = self.use_error()
        key = "never-added"
        if error is None:
            tx = self.acting().tx
            # Not the keys of a race: which of them were stored varies from run to run, and the draw may not.
            candidates = sorted(self.view(tx) - self.claimed_elsewhere(tx) - self.raced)
            if not candidates:
                return
            key = data.draw(st.sampled_from(candidates), label="key")

        async def operation() -> Any:
            repo = self.repository()
            found = await settle(repo.get(key))
            return await settle(repo.remove(found))

        self.use(operation)
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

        error, counted = self.use(operation)
        if error is None:
            tx = self.acting().tx
            self.touch(tx)
            tx.unflushed.clear()
            seen = self.view(tx)
            assert len(seen) == counted
            tx.claims.update(seen)

    def check_get_by(self) -> None:
        """``get_by()`` returns the one match, None for none, and raises MultipleResultsError for several."""

        async def operation() -> Any:
            return await settle(self.repository().get_by(description=DESCRIPTION))

        if self.use_error() is not None:
            self.use(operation)
            return
        tx = self.acting().tx
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

        if self.use_error() is not None:
            self.use(operation)
            return
        self.outcome(expected[which], operation)
        self.touch(self.acting().tx, store=which == "not loaded")

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

    # -- generators that hold a block open while suspended -----------------------

    def body_uses(self, gen: Gen) -> Frame:
        """A generator's body uses the unit of work: the block it acts in, or Raised with what the use raises.

        Once an outer block's exit has closed its block early, a generator
        that resumes may not use the unit of work until its own exit has come:
        its work would land in whatever block is open now.
        """
        if self.stack and any(frame not in self.stack for frame in gen.entered):
            raise Raised(OwnershipError, self.generator_names[0])
        error = self.use_error()
        if error is not None:
            holder = self.holder() if error is OwnershipError else None
            raise Raised(error, None if holder is None else holder.where)
        return self.acting()

    def body_enters(self, gen: Gen, how: str, where: str) -> None:
        """A generator's body enters a block: joined, a savepoint, or a transaction of its own."""
        acting = self.body_uses(gen)
        if how == REQUIRES_NEW:
            frame = Frame(OWNER, None, Tx())
        else:
            frame = Frame(how, None, acting.tx)
            if how == SAVEPOINT:
                self.touch(acting.tx)
                acting.tx.unflushed.clear()  # beginning a savepoint flushes
                frame.mark = (frozenset(acting.tx.added), frozenset(acting.tx.removed), len(acting.tx.hooks))
        frame.gen, frame.where, frame.running = gen, where, True
        self.stack.append(frame)
        gen.entered.append(frame)

    def body_adds(self, gen: Gen, key: str) -> int:
        """A generator's body adds a Sku, where it acts now, and counts what that transaction sees: the count."""
        tx = self.body_uses(gen).tx
        self.touch(tx)
        tx.added.add(key)
        tx.unflushed.clear()
        seen = self.view(tx)
        tx.claims.update(seen)
        return len(seen)

    def body_commits(self, gen: Gen) -> None:
        """A generator's body calls commit(): the owner's real one if it acts in an owner's block, else a flush."""
        frame = self.body_uses(gen)
        if self.commit_refused():
            raise Raised(RollbackOnlyError)
        if frame.kind != OWNER:
            self.flushed(frame.tx)
            return
        failure = self.committed(frame.tx)
        if failure is not None:
            raise Raised(failure)

    def body_leaves(self, frames: list[Frame], exc: Raised | None) -> Raised | None:
        """A generator's body leaves *frames*, innermost first, with *exc*; return what comes out of the outermost."""
        for frame in reversed(frames):
            raised, _ = self.leave_model(frame, None if exc is None else exc.kind)
            if raised is not None:
                exc = Raised(raised)
        return exc

    def body_resumes(self, gen: Gen) -> tuple[Raised | None, Any]:
        """Model ``next()`` on *gen*: (None, what it yields or DONE at its end), or (what it raises, DONE)."""
        for frame in gen.entered:
            frame.running = True
        try:
            exc: Raised | None = None
            try:
                if gen.position == 0:
                    if gen.nested:
                        self.body_enters(gen, JOINED, self.generator_names[1])
                    self.body_enters(gen, gen.how, self.generator_names[0])
                if gen.position < len(gen.keys):
                    key = gen.keys[gen.position]
                    counted = self.body_adds(gen, key)
                    gen.position += 1
                    return None, (key, counted)
                if gen.commit:
                    self.body_commits(gen)
            except Raised as raised:
                exc = raised
            return self.body_leaves(gen.entered, exc), DONE
        finally:
            for frame in gen.entered:
                frame.running = False

    def body_closes(self, gen: Gen) -> Raised | None:
        """Model ``close()`` of *gen*, suspended at a yield: GeneratorExit leaves its blocks; what close() raises.

        ``yield from`` closes the inner generator first. ``async for`` does
        not: the outer generator's exit closes the inner one's block early,
        and the machine's ``aclose()`` of the inner one afterwards does nothing.
        """
        frames = [gen.entered] if not (gen.nested and self.backend.is_async) else [gen.entered[:1], gen.entered[1:]]
        failure: Raised | None = None
        for running in frames:
            for frame in running:
                frame.running = True
            try:
                exc = self.body_leaves(running, Raised(GeneratorExit))
            finally:
                for frame in running:
                    frame.running = False
            if failure is None and exc is not None and exc.kind is not GeneratorExit:
                failure = exc
        return failure

    @property
    def generator_names(self) -> tuple[str, str]:
        """The functions of the generator that does the work and of the one that delegates to it."""
        if self.backend.is_async:
            return async_generator_block.__name__, async_delegating_generator.__name__
        return generator_block.__name__, delegating_generator.__name__

    def predict(self, gen: Gen, action: str) -> tuple[Raised | None, Any]:
        """Model *action* on *gen*: what it raises, or else what it returns."""
        if action == "next":
            return self.body_resumes(gen)
        if action == "close":
            return self.body_closes(gen), None
        values: list[tuple[str, int]] = []
        while True:
            exc, value = self.body_resumes(gen)
            if exc is not None or value == DONE:
                return exc, values
            values.append(value)
            if action == "break":
                return self.body_closes(gen), values

    def generator_operation(self, gen: Gen, action: str) -> Callable[[], Coroutine[Any, Any, Any]]:
        """The machine's call that does *action* on *gen*: next(), run it out, close(), or break out of a for loop."""
        iterator, inner = gen.iterator, gen.inner
        if not self.backend.is_async:
            if action == "next":
                return lambda: settle(next(iterator, DONE))
            if action == "exhaust":
                return lambda: settle(list(iterator))
            if action == "close":
                return lambda: settle(iterator.close())
            held = [iterator]
            gen.iterator = iterator = None  # the for loop holds the last reference: break closes it at once

            async def break_out() -> list[tuple[str, int]]:
                values = []
                for value in held.pop():
                    values.append(value)
                    break
                return values

            return break_out

        async def operation() -> Any:
            try:
                if action == "next":
                    return await anext(iterator, DONE)
                if action == "exhaust":
                    return [value async for value in iterator]
                values = []
                if action == "break":
                    async for value in iterator:
                        values.append(value)
                        break
                await iterator.aclose()  # an async for loop does not close it
                return values if action == "break" else None
            finally:
                if inner is not None and (action != "next" or iterator.ag_frame is None):
                    await inner.aclose()

        return operation

    def drive(self, gen: Gen, action: str) -> None:
        """Do *action* on *gen* and check what comes out, and where its work landed, against the model."""
        alive = weakref.ref(gen.iterator)
        closed_early = self.closed_early
        exc, value = self.predict(gen, action)
        operation = self.generator_operation(gen, action)
        result = self.outcome(None if exc is None else exc.kind, operation, match=None if exc is None else exc.match)
        if exc is None:
            assert value == result
        ended = exc is not None or action != "next" or value == DONE
        if ended:
            self.generators.remove(gen)
        if action == "break" and exc is None and not self.backend.is_async:
            assert alive() is None  # closed and gone as soon as the loop let go of it
        outcome = "yields" if not ended else "ends" if exc is None else exc.kind.__name__
        event(f"generator {action} ({gen.how}{', nested' if gen.nested else ''}): {outcome}")
        self.look_after_closing_early(closed_early)

    @precondition(lambda self: bool(self.stack) and len(self.generators) < MAX_GENERATORS)
    @rule(how=st.sampled_from(GENERATOR_BLOCKS), nested=st.booleans(), rounds=st.integers(1, 3), commit=st.booleans())
    def start_generator(self, how: str, nested: bool, rounds: int, commit: bool) -> None:
        """Start a generator whose body enters a block, adds a Sku and yields: it stays suspended in its block."""
        if len(self.stack) + 1 + nested > MAX_DEPTH:
            return
        if how == REQUIRES_NEW:
            if len(self.transactions()) >= MAX_TRANSACTIONS:
                return
            if self.backend.sqlite and any(tx.touched for tx in self.transactions()):
                return  # SQLite: the generator's transaction would wait for the outer one's lock
        gen = Gen(how, nested, [self.fresh_key() for _ in range(rounds)], commit)
        if self.backend.is_async:
            gen.iterator = async_generator_block(self.unit, how, gen.keys, commit)
            if nested:
                gen.inner, gen.iterator = gen.iterator, async_delegating_generator(self.unit, gen.iterator)
        else:
            gen.iterator = generator_block(self.unit, how, gen.keys, commit)
            if nested:
                gen.iterator = delegating_generator(self.unit, gen.iterator)
        self.generators.append(gen)
        self.drive(gen, "next")

    @precondition(lambda self: bool(self.generators))
    @rule(data=st.data())
    def advance_generator(self, data: st.DataObject) -> None:
        """Resume a suspended generator with next(): it adds a Sku in the block it acts in, or leaves its block."""
        self.drive(self.generators[data.draw(st.integers(0, len(self.generators) - 1), label="generator")], "next")

    @precondition(lambda self: bool(self.generators))
    @rule(action=st.sampled_from(["exhaust", "close", "break"]), data=st.data())
    def finish_generator(self, action: str, data: st.DataObject) -> None:
        """Run a suspended generator to its end, close() it, or break out of a for loop over it."""
        self.drive(self.generators[data.draw(st.integers(0, len(self.generators) - 1), label="generator")], action)

    @precondition(lambda self: not self.stack and not self.raced)  # once an example: threads take time
    @rule(workers=st.integers(2, 4))
    def race_for_the_idle_unit(self, workers: int) -> None:
        """Threads (or tasks) enter the idle unit of work at once: each gets OwnershipError or has its row stored."""
        # Opening the session yields to the others, so that they arrive while an entry is under way: the claim
        # must be taken before that. The entries store their keys in an order that varies from run to run.
        keys = [self.fresh_key() for _ in range(workers)]
        self.raced.update(keys)
        unit = self.unit
        outcomes: dict[str, BaseException | None] = {}
        open_session = unit._open
        try:
            self.race(unit, keys, outcomes, open_session)
        finally:
            del unit._open  # the class's own again
        assert sorted(keys) == sorted(outcomes)
        assert {} == {
            key: repr(error) for key, error in outcomes.items() if type(error) not in (OwnershipError, type(None))
        }
        stored = {key for key, error in outcomes.items() if error is None}
        assert stored, "every entry was refused, though no block was open"
        self.durable |= stored
        self.commits += len(stored)
        event(f"race of {workers}: {workers - len(stored)} refused")

    def race(self, unit: Any, keys: list[str], outcomes: dict[str, BaseException | None], open_session: Any) -> None:
        """Enter *unit* from a thread (or task) per key at once, each adding its key and committing."""
        if self.backend.is_async:

            async def slow_open() -> Any:
                await asyncio.sleep(0)
                return await open_session()

            unit._open = slow_open

            async def enter(key: str) -> None:
                try:
                    async with unit:
                        await unit.skus.add(Sku(key, DESCRIPTION))
                        await asyncio.sleep(0)  # the others arrive while this one is inside
                        await unit.commit()
                except Exception as error:
                    outcomes[key] = error
                else:
                    outcomes[key] = None

            async def operation() -> Any:
                return await asyncio.gather(*(enter(key) for key in keys))

            self.outcome(None, operation)
            return

        def slow_open_in_a_thread() -> Any:
            time.sleep(0.0005)
            return open_session()

        unit._open = slow_open_in_a_thread
        start = threading.Barrier(len(keys))

        def enter_in_a_thread(key: str) -> None:
            try:
                start.wait(TIMEOUT)
                with unit:
                    unit.skus.add(Sku(key, DESCRIPTION))
                    time.sleep(0)  # the others arrive while this one is inside
                    unit.commit()
            except Exception as error:
                outcomes[key] = error
            else:
                outcomes[key] = None

        threads = [threading.Thread(target=enter_in_a_thread, args=(key,), name=key) for key in keys]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert not any(thread.is_alive() for thread in threads)

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
    def open_blocks_match_the_model(self) -> None:
        """The unit of work's open scopes are the model's blocks, and each scope closed early was logged."""
        assert [frame.kind for frame in self.stack] == [scope.kind.value for scope in self.unit._scopes]
        assert self.closed_early == self.early.count

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
            for gen in reversed(self.generators):  # the latest first, as their blocks nest

                async def close(gen: Gen = gen) -> None:
                    if not self.backend.is_async:
                        gen.iterator.close()
                        return
                    try:
                        await gen.iterator.aclose()
                    finally:
                        if gen.inner is not None:
                            await gen.inner.aclose()

                try:
                    self.backend.run(close)
                except Exception as error:
                    failures.append(error)
            self.generators.clear()
            blocks = [frame.block for frame in reversed(self.stack) if frame.gen is None]
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
            logging.getLogger("uow").removeHandler(self.early)
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
