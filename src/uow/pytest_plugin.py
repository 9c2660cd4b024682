"""pytest fixtures for code that uses uow.

Installing uow registers this module with pytest (through the ``pytest11``
entry point). It defines fixtures and nothing else: no autouse fixture, no
hook, no command-line option, so a test that requests none of its fixtures
runs exactly as it would without it.

* ``uow_fake`` and ``uow_async_fake``: a fresh fake unit of work for each
  test, built by ``uow_fake_factory`` / ``uow_async_fake_factory``, which a
  project overrides to return its own fake class.
* ``uow_session_factory`` and ``uow_async_session_factory``: per-test
  rollback isolation on a real database. They hand out sessions bound to
  one connection whose transaction is rolled back after the test, each
  session working in a savepoint of it, so the code under test commits for
  real and the test still leaves nothing behind. A project overrides
  ``uow_engine`` / ``uow_async_engine`` to give its engine.
* :func:`capture_on_commit`, also given by the ``uow_capture_on_commit``
  fixture: record the ``on_commit`` hooks of a unit of work, and run them
  or not.

The async database fixtures run on SQLAlchemy's asyncio extension, which
needs greenlet (``uow[asyncio]``, or an async driver extra): the plugin
imports it only when a test requests one of them, so that pytest runs
without greenlet, fakes and sync fixtures included.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import pytest
from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from ._async_unit_of_work import AsyncUnitOfWork
from ._sqlalchemy import greenlet_missing
from ._unit_of_work import UnitOfWork
from .errors import ConfigurationError, _shown

try:
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover - the async fixtures then need another async plugin
    _async_fixture = pytest.fixture  # type: ignore[assignment]

if TYPE_CHECKING:  # importing sqlalchemy.ext.asyncio needs greenlet: the async fixtures import it when used
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

__all__ = [
    "CaptureOnCommit",
    "capture_on_commit",
    "uow_async_connection",
    "uow_async_engine",
    "uow_async_fake",
    "uow_async_fake_factory",
    "uow_async_session_factory",
    "uow_capture_on_commit",
    "uow_connection",
    "uow_engine",
    "uow_fake",
    "uow_fake_factory",
    "uow_session_factory",
]

F = TypeVar("F", bound=Callable[..., object])


def _override(name: str, what: str, example: str) -> ConfigurationError:
    msg = (
        f"the {name} fixture is not set: uow's pytest plugin cannot know {what}. Override it in your "
        f"conftest.py, for example:\n\n@pytest.fixture\ndef {name}():\n    {example}\n"
    )
    return ConfigurationError(msg)


def _need_greenlet(fixture: str) -> None:
    """Raise a ConfigurationError that says what to install if SQLAlchemy's asyncio extension cannot run."""
    missing = greenlet_missing(f"the {fixture} fixture")
    if missing is not None:
        raise ConfigurationError(str(missing)) from missing.__cause__


# -- fakes --------------------------------------------------------------------


@pytest.fixture
def uow_fake_factory() -> Callable[[], UnitOfWork]:
    """What builds :func:`uow_fake`: override it to return your fake unit of work class."""
    raise _override("uow_fake_factory", "your fake unit of work class", "return FakeShopUnitOfWork")


@pytest.fixture
def uow_fake(uow_fake_factory: Callable[[], UnitOfWork]) -> UnitOfWork:
    """A fresh unit of work from ``uow_fake_factory``, for this test alone."""
    unit = uow_fake_factory()
    if not isinstance(unit, UnitOfWork):
        msg = (
            f"uow_fake_factory returned {_shown(unit)}, not a uow.UnitOfWork: return a sync fake class there, "
            "and an async one from uow_async_fake_factory"
        )
        raise ConfigurationError(msg)
    return unit


@pytest.fixture
def uow_async_fake_factory() -> Callable[[], AsyncUnitOfWork]:
    """What builds :func:`uow_async_fake`: override it to return your async fake unit of work class."""
    raise _override("uow_async_fake_factory", "your async fake unit of work class", "return AsyncFakeShopUnitOfWork")


@pytest.fixture
def uow_async_fake(uow_async_fake_factory: Callable[[], AsyncUnitOfWork]) -> AsyncUnitOfWork:
    """A fresh unit of work from ``uow_async_fake_factory``, for this test alone."""
    unit = uow_async_fake_factory()
    if not isinstance(unit, AsyncUnitOfWork):
        msg = (
            f"uow_async_fake_factory returned {_shown(unit)}, not a uow.AsyncUnitOfWork: return an async fake "
            "class there, and a sync one from uow_fake_factory"
        )
        raise ConfigurationError(msg)
    return unit


# -- rollback isolation on a real database ------------------------------------


@pytest.fixture
def uow_engine() -> Engine:
    """The engine that :func:`uow_connection` connects to: override it to return yours."""
    raise _override("uow_engine", "your database", "return engine  # a sqlalchemy.Engine, with the tables created")


@pytest.fixture
def uow_connection(uow_engine: Engine) -> Iterator[Connection]:
    """A connection of ``uow_engine`` in a transaction that is rolled back after the test."""
    if not isinstance(uow_engine, Engine):
        msg = (
            f"uow_engine returned {_shown(uow_engine)}, not a sqlalchemy.Engine; "
            "an AsyncEngine goes in uow_async_engine"
        )
        raise ConfigurationError(msg)
    with uow_engine.connect() as connection:
        transaction = connection.begin()
        if _sqlite_needs_begin(connection.dialect.name, connection.connection.driver_connection):
            connection.exec_driver_sql("BEGIN")
        yield connection
        if connection.invalidated:
            return  # the database discarded the transaction with the connection
        if not transaction.is_active:
            pytest.fail(_ended_early("uow_connection"), pytrace=False)
        transaction.rollback()


@pytest.fixture
def uow_session_factory(uow_connection: Connection) -> sessionmaker[Session]:
    """Sessions on the test's connection, each in a savepoint of the test's transaction.

    Give it to your ``SqlAlchemyUnitOfWork``: its commits release the
    savepoint, so later units of work of the test see the data, and the
    rollback after the test removes it.
    """
    factory = sessionmaker(bind=uow_connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    _one_transaction_at_a_time(factory, "uow_session_factory")
    return factory


@pytest.fixture
def uow_async_engine() -> AsyncEngine:
    """The engine that :func:`uow_async_connection` connects to: override it to return yours."""
    _need_greenlet("uow_async_engine")
    raise _override("uow_async_engine", "your database", "return async_engine  # a sqlalchemy AsyncEngine")


@_async_fixture
async def uow_async_connection(uow_async_engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection of ``uow_async_engine`` in a transaction that is rolled back after the test."""
    _need_greenlet("uow_async_connection")
    from sqlalchemy.ext.asyncio import AsyncEngine

    if not isinstance(uow_async_engine, AsyncEngine):
        msg = (
            f"uow_async_engine returned {_shown(uow_async_engine)}, not a sqlalchemy AsyncEngine; "
            "a sync Engine goes in uow_engine"
        )
        raise ConfigurationError(msg)
    async with uow_async_engine.connect() as connection:
        transaction = await connection.begin()
        raw = await connection.get_raw_connection()
        if _sqlite_needs_begin(connection.dialect.name, raw.driver_connection):
            await connection.exec_driver_sql("BEGIN")
        yield connection
        if connection.invalidated:
            return
        if not transaction.is_active:
            pytest.fail(_ended_early("uow_async_connection"), pytrace=False)
        await transaction.rollback()


@pytest.fixture
def uow_async_session_factory(uow_async_connection: AsyncConnection) -> async_sessionmaker[AsyncSession]:
    """Async sessions on the test's connection, each in a savepoint of the test's transaction.

    The async twin of :func:`uow_session_factory`, for your
    ``AsyncSqlAlchemyUnitOfWork``.
    """
    _need_greenlet("uow_async_session_factory")
    from sqlalchemy.ext.asyncio import async_sessionmaker

    session_class: type[Session] = type("Session", (Session,), {})  # the listeners below are for these sessions only
    factory = async_sessionmaker(
        bind=uow_async_connection,
        join_transaction_mode="create_savepoint",
        expire_on_commit=False,
        sync_session_class=session_class,
    )
    _one_transaction_at_a_time(session_class, "uow_async_session_factory")
    return factory


def _sqlite_needs_begin(dialect: str, driver_connection: Any) -> bool:
    """Whether SQLite's driver has not started the transaction that the fixture has begun.

    Python's sqlite3 driver (and aiosqlite on top of it), in its default
    legacy transaction control, sends BEGIN only before a write. The
    sessions' SAVEPOINT would then start a transaction of its own, and
    releasing it, at the code's commit, would write to the database for good.
    The fixture sends the BEGIN itself. An engine that already begins
    (``connect_args={"autocommit": False}`` on Python 3.12 and later, or
    SQLAlchemy's event recipe) needs nothing.
    """
    return dialect == "sqlite" and getattr(driver_connection, "in_transaction", True) is False


def _ended_early(fixture: str) -> str:
    return (
        f"the transaction of {fixture} was ended by the test or the code under test (a commit() or rollback() "
        "of the connection itself), so this test's data may be left in the database. Commit through "
        "sessions of the session factory fixture, which only release their savepoint"
    )


def _one_transaction_at_a_time(target: sessionmaker[Session] | type[Session], fixture: str) -> None:
    """Make a session of *target* that starts a transaction while another one holds one raise.

    On the test's single connection, the second session's transaction would
    be a savepoint inside the first one's: it would see the first one's
    uncommitted work, and its commit would be undone by the first one's
    rollback. That is not what a second transaction does on a database.
    """
    holding: weakref.WeakSet[Session] = weakref.WeakSet()

    def after_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
        if transaction.parent is not None:
            return  # a savepoint of the session's own transaction
        if any(other is not session for other in holding):
            msg = (
                f"two sessions of {fixture} are in a transaction at once (propagation='requires_new', or a "
                "second unit of work entered inside a first one): on the test's one connection, the second "
                "would run in a savepoint of the first, see its uncommitted work and be rolled back with it. "
                "Test this code on the engine itself, without rollback isolation, and clean up after the test"
            )
            raise ConfigurationError(msg)
        holding.add(session)

    def after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            holding.discard(session)

    event.listen(target, "after_begin", after_begin)
    event.listen(target, "after_transaction_end", after_transaction_end)


# -- on_commit hooks ----------------------------------------------------------

#: The units of work that a capture_on_commit() block is capturing now.
_capturing: weakref.WeakSet[UnitOfWork | AsyncUnitOfWork] = weakref.WeakSet()


@contextmanager
def capture_on_commit(
    unit: UnitOfWork | AsyncUnitOfWork, *, execute: bool = False
) -> Iterator[list[Callable[[], object]]]:
    """Capture the ``on_commit`` hooks registered on *unit* inside the ``with`` block.

    Yields a list that receives each captured hook when the owner's commit
    would run it: after the real commit, in the order uow runs hooks. Hooks
    dropped by a rollback never reach it. With ``execute=False`` (the
    default) the hooks do not run, and the test may call them itself; with
    ``execute=True`` they also run, as uow runs them, ``robust`` included.
    Hooks registered inside the block are captured even if their commit
    comes after it.
    """
    if not isinstance(unit, (UnitOfWork, AsyncUnitOfWork)):
        msg = f"capture_on_commit() takes a unit of work, not {_shown(unit)}"
        raise ConfigurationError(msg)
    if unit in _capturing:
        msg = f"capture_on_commit() is already capturing the hooks of {_shown(unit)}: use the list it gave"
        raise ConfigurationError(msg)
    captured: list[Callable[[], object]] = []
    state = vars(unit)
    had_own = "on_commit" in state  # a spy, for example
    previous = state.get("on_commit")
    register = unit.on_commit

    def on_commit(callback: Callable[[], object], *, robust: bool = False) -> None:
        if callable(callback):
            callback = _capturing_hook(callback, captured, execute)
        register(callback, robust=robust)  # uow checks the callback as usual

    state["on_commit"] = on_commit
    _capturing.add(unit)
    try:
        yield captured
    finally:
        _capturing.discard(unit)
        if had_own:
            state["on_commit"] = previous
        else:
            del state["on_commit"]


def _capturing_hook(
    callback: Callable[[], object], captured: list[Callable[[], object]], execute: bool
) -> Callable[[], object]:
    """A hook that records *callback* when it runs, and calls it if *execute*.

    The hook is a coroutine function when *callback* is one, so that a sync
    unit of work refuses it, as it refuses *callback*.
    """
    if inspect.iscoroutinefunction(callback):

        async def async_hook() -> object:
            captured.append(callback)
            return await cast("Awaitable[object]", callback()) if execute else None

        return _named(async_hook, callback)

    def hook() -> object:
        captured.append(callback)
        return callback() if execute else None

    return _named(hook, callback)


def _named(hook: F, callback: Callable[..., object]) -> F:
    """Give *hook* the name of *callback*, for uow's messages and log lines."""
    for attribute in ("__module__", "__name__", "__qualname__"):
        value = getattr(callback, attribute, None)
        if isinstance(value, str):
            setattr(hook, attribute, value)
    return hook


class CaptureOnCommit(Protocol):
    """The type of :func:`capture_on_commit`, which the ``uow_capture_on_commit`` fixture gives."""

    def __call__(
        self, unit: UnitOfWork | AsyncUnitOfWork, *, execute: bool = False
    ) -> AbstractContextManager[list[Callable[[], object]]]: ...


@pytest.fixture
def uow_capture_on_commit() -> CaptureOnCommit:
    """The :func:`capture_on_commit` context manager, for tests that take their tools as fixtures."""
    return capture_on_commit
