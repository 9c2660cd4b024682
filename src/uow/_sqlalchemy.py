"""The sync unit of work backed by a SQLAlchemy session, and the session helpers both twins share.

This module never imports ``sqlalchemy.ext.asyncio``: that needs greenlet,
which a sync application may not have. ``_sqlalchemy_async.py`` holds the
async twin.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import UnboundExecutionError
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, sessionmaker
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from ._machine import _UnitOfWorkCore
from ._outbox import Inbox, Message, Outbox
from ._scope import _Transaction
from ._sqlalchemy_repository import SqlAlchemyRepository
from ._unit_of_work import UnitOfWork
from .errors import ConfigurationError, InactiveUnitOfWorkError, JoinedScopeError, _shown

if TYPE_CHECKING:
    from sqlalchemy.orm import UOWTransaction

__all__ = ["SqlAlchemyUnitOfWork"]


def _inactive_session() -> InactiveUnitOfWorkError:
    return InactiveUnitOfWorkError(
        "uow.session was used outside a block: the unit of work has a session only "
        "inside `with uow:` (or `async with uow:`)"
    )


def _guard_session(session: Session, unit: _UnitOfWorkCore, handle: object) -> None:
    """Make ``commit()``, ``rollback()`` and ``close()`` of *session* raise outside the owner's scope.

    The methods are shadowed on this one instance; uow's own calls reach them
    in the owner's scope, where the guard lets them through. *handle* is what
    the unit of work holds: the session, or the ``AsyncSession`` around it.
    A unit of work guards its session once a scope is entered on top of the
    owner's: before that, only the owner's code can reach it.
    """
    for name in _GUARDED:
        method = getattr(session, name)

        def guarded(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            if not unit._owner_acts(handle):
                msg = (
                    f"session.{_name}() in a joined scope: only the owner of the transaction may do that. "
                    "Call uow.commit() (which the owner makes durable), raise an exception to roll back, "
                    "or use `uow.savepoint()`"
                )
                raise JoinedScopeError(msg)
            return _method(*args, **kwargs)

        setattr(session, name, guarded)


def _hold(session: Session, parent: _Transaction | None) -> None:
    """Take *session* for a unit of work: check that it is fresh, and mark it held so that no other one takes it."""
    attributes = session.__dict__
    if parent is not None or _HELD in attributes or session.in_transaction():
        _check_fresh(session, parent)  # the common case, a new session and nothing outside, needs no check
    attributes[_HELD] = True


def _unguard_session(session: Session) -> None:
    """Give the session back as it came: its own methods, its own engine, no listener of uow's."""
    attributes = session.__dict__
    attributes.pop(_HELD, None)
    if _GUARDED[0] in attributes:
        for name in _GUARDED:
            attributes.pop(name, None)
    changed = attributes.pop(_CHANGED, None)
    if changed is not None:
        own_bind, listening = changed
        session.bind = own_bind
        if listening:
            event.remove(session, "after_begin", _start_read_only)


#: Instance attributes that uow sets on the sessions its units of work hold, and removes when
#: they close: a mark that the session is held, and, for a session whose engine uow replaced to
#: apply options, its own engine and whether the read-only listener is on.
_HELD = "_uow_held"
_CHANGED = "_uow_changed"


_GUARDED = ("commit", "rollback", "close")


def _guard_writes(session: Session, unit: _UnitOfWorkCore) -> None:
    """Make a flush or an ORM write statement raise ReadOnlyError while the innermost scope is read-only."""

    def before_flush(session: Session, context: UOWTransaction, instances: object) -> None:
        if not unit._writes_forbidden():
            return
        changed = [obj for obj in session.dirty if session.is_modified(obj)]
        if session.new or session.deleted or changed:
            unit._check_write(
                f"{len(session.new)} new, {len(changed)} changed and {len(session.deleted)} deleted objects"
            )

    def do_orm_execute(state: ORMExecuteState) -> None:
        if state.is_insert or state.is_update or state.is_delete:
            unit._check_write("an INSERT, UPDATE or DELETE statement")

    event.listen(session, "before_flush", before_flush)
    event.listen(session, "do_orm_execute", do_orm_execute)


def _prepare(session: Session, tx: _Transaction, models: Iterable[type[Any]]) -> None:
    """Make every connection *session* takes for *tx* use its isolation level and read-only mode.

    The options go on a copy of the session's engine
    (``Engine.execution_options()``, which shares the pool), so they apply
    to the first connection and to those taken after each commit, without
    taking one now; closing the session puts its own engine back. A session
    bound to a connection, as in a test that joins an external transaction,
    keeps that connection's settings. *models* are the unit of work's mapped
    classes: they must all use the session's engine.
    """
    if tx.isolation_level is None and not tx.read_only:
        return
    bind = session.bind
    if isinstance(bind, Connection):
        return
    if not isinstance(bind, Engine) or any(session.get_bind(model) is not bind for model in models):
        if tx.isolation_level is None:
            return  # read-only stays enforced by the flush guard
        msg = (
            "isolation_level= needs a session whose models all use one engine (sessionmaker(engine)); "
            "this session has other binds"
        )
        raise ConfigurationError(msg)
    options: dict[str, Any] = {}
    if tx.isolation_level is not None:
        options["isolation_level"] = tx.isolation_level
    if tx.read_only and bind.dialect.name == "postgresql":
        options["postgresql_readonly"] = True
    listening = tx.read_only and bind.dialect.name in ("mysql", "mariadb")
    if listening:
        event.listen(session, "after_begin", _start_read_only)
    if options or listening:
        session.__dict__[_CHANGED] = (bind, listening)
    if options:
        session.bind = _engine_with(bind, options)


def _engine_with(engine: Engine, options: dict[str, Any]) -> Engine:
    """A copy of *engine* with *options*, made once per engine and options: making one takes a while."""
    copies: dict[tuple[tuple[str, Any], ...], Engine] = engine.__dict__.setdefault("_uow_engine_copies", {})
    key = tuple(sorted(options.items()))
    copy = copies.get(key)
    if copy is None:
        copy = copies[key] = engine.execution_options(**options)
    return copy


def _start_read_only(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    """MySQL and MariaDB: make the transaction that this connection starts next READ ONLY."""
    if transaction.nested or transaction.parent is not None:
        return  # a savepoint inside the transaction, which is READ ONLY already
    connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def _held_connections(session: Session) -> list[Connection]:
    """The connections *session*'s transaction holds, taken before closing it.

    When the rollback inside ``Session.close()`` fails, the session has
    already let go of its connections, and they stay checked out; uow
    invalidates them instead. SQLAlchemy keeps them in a private attribute,
    so this is best effort: if it is missing, nothing is taken.
    """
    transaction = session.get_transaction()
    held = getattr(transaction, "_connections", None) if transaction is not None else None
    if not isinstance(held, dict):
        return []
    return [entry[0] for entry in held.values() if isinstance(entry[0], Connection)]


def _invalidate(connections: list[Connection]) -> None:
    """Invalidate connections whose rollback failed, so that the pool never hands them out again."""
    for connection in connections:
        if not connection.closed and not connection.invalidated:
            connection.invalidate()


def _single_bind(session: Session) -> Engine | Connection | None:
    """The one engine or connection *session* is bound to; None for a session with several binds."""
    try:
        return session.get_bind()
    except UnboundExecutionError:
        return None


def _has_changes(session: Session) -> bool:
    """Whether *session* would write something at its next flush."""
    return bool(session.new or session.deleted) or any(session.is_modified(obj) for obj in session.dirty)


def _check_fresh(session: Session, parent: _Transaction | None) -> None:
    """Refuse a new session that would share work with another one, before anything uses it.

    *parent* is the transaction active in this context, if any. A factory that
    hands out a session already in use (a ``scoped_session``) would make uow
    commit or close someone else's work, and a pool that gives a thread one
    connection (``SingletonThreadPool`` for SQLite in memory, ``StaticPool``)
    would make a nested transaction's commit commit the outer one.
    """
    handle = parent.session if parent is not None else None
    outer_session = getattr(handle, "sync_session", handle)  # an AsyncSession holds a Session
    if session is outer_session or _HELD in session.__dict__ or session.in_transaction():
        msg = (
            "the session factory returned a session that is already in use (a scoped_session?): uow must "
            "not commit or close a session it does not own. Give the unit of work a sessionmaker or an engine"
        )
        raise ConfigurationError(msg)
    if parent is None or not isinstance(outer_session, Session):
        return
    bind, outer_bind = _single_bind(session), _single_bind(outer_session)
    if not (isinstance(bind, Engine) and isinstance(outer_bind, Engine) and bind.pool is outer_bind.pool):
        return
    pool = bind.pool
    shared = isinstance(pool, StaticPool) or (
        isinstance(pool, SingletonThreadPool) and _owner_thread(parent) == threading.get_ident()
    )
    if shared:
        msg = (
            f"a transaction inside another one needs a second connection, but this engine's "
            f"{type(pool).__name__} gives every session of a thread the same one, so the inner commit "
            "would commit the outer work too. Use a file database or a server, or join the outer transaction"
        )
        raise ConfigurationError(msg)


def _owner_thread(parent: _Transaction) -> int | None:
    """The thread that runs the owner of *parent*, for a sync unit of work; None for an async one.

    An async unit of work's connections come from an async engine's pool,
    which a sync session never shares.
    """
    owner = parent.unit._owner
    if isinstance(owner, int):
        return owner
    if isinstance(owner, tuple):  # a sync unit of work used in an asyncio task: its thread, and the task
        thread: int = owner[0]
        return thread
    return None


def greenlet_missing(what: str) -> ImportError | None:
    """Why *what*, which runs on SQLAlchemy's asyncio extension, cannot run here: greenlet is missing; else None.

    The check imports greenlet itself rather than ``sqlalchemy.ext.asyncio``:
    SQLAlchemy raises ImportError only on the first import of its extension
    without greenlet, and a second one succeeds.
    """
    try:
        importlib.import_module("greenlet")
    except ImportError as error:
        msg = (
            f"{what} runs on SQLAlchemy's asyncio extension, which needs greenlet: install uow[asyncio], or a "
            f"driver extra that brings it (uow[asyncpg], uow[aiomysql], uow[aiosqlite]). ({error})"
        )
        missing = ImportError(msg, name="greenlet")
        missing.__cause__ = error
        return missing
    return None


def _async_kinds() -> tuple[type[Any], ...]:
    """SQLAlchemy's async engine and session factory, if its asyncio extension is loaded: else nothing is one."""
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    return (module.AsyncEngine, module.async_sessionmaker) if module is not None else ()


def _sqlite_needs_begin(driver_connection: Any) -> bool:
    """Whether SQLite has no transaction open yet on this connection.

    Python's sqlite3 driver (and aiosqlite on top of it) sends BEGIN only
    before a write. A SAVEPOINT sent before any write would then open the
    transaction itself, and releasing it would commit the outer block's work
    at once. uow sends the BEGIN first.
    """
    return getattr(driver_connection, "in_transaction", True) is False


class SqlAlchemyUnitOfWork(UnitOfWork):
    """A :class:`~uow.UnitOfWork` that opens a SQLAlchemy ``Session`` for each transaction.

    *session_factory* is a ``sessionmaker`` (or any callable returning a
    ``Session``), which uow uses as it is, or an ``Engine``, for which uow
    builds a ``sessionmaker`` with ``expire_on_commit=False`` so that objects
    returned from a block stay readable after it.
    """

    _repository_base = SqlAlchemyRepository
    _generic_repository = SqlAlchemyRepository

    def __init__(
        self,
        session_factory: sessionmaker[Session] | Callable[[], Session] | Engine,
        *,
        autocommit: bool = False,
        read_only: bool = False,
        isolation_level: str | None = None,
    ) -> None:
        super().__init__(autocommit=autocommit, read_only=read_only, isolation_level=isolation_level)
        #: What opens the session of each transaction.
        self.session_factory: sessionmaker[Session] | Callable[[], Session]
        if session_factory.__class__ is sessionmaker:  # the common case, built per call by a factory: no more checks
            self.session_factory = session_factory
            return
        if isinstance(session_factory, _async_kinds()):
            msg = (
                f"{type(self).__name__} is synchronous but was given an async {type(session_factory).__name__}; "
                "use AsyncSqlAlchemyUnitOfWork, or pass a sync Engine or sessionmaker"
            )
            raise ConfigurationError(msg)
        if isinstance(session_factory, Engine):
            session_factory = sessionmaker(session_factory, expire_on_commit=False)
        elif not callable(session_factory):
            msg = f"{type(self).__name__} takes an Engine or a session factory, not {_shown(session_factory)}"
            raise ConfigurationError(msg)
        self.session_factory = session_factory

    @property
    def session(self) -> Session:
        """The session of the active transaction."""
        if not self._scopes:
            raise _inactive_session()
        scope = self._scope_for("uow.session")
        scope.tx.used = True
        session: Session = scope.tx.session
        return session

    def _open(self) -> Session:
        session = self.session_factory()
        if not isinstance(session, Session):
            msg = (
                f"the session factory of {type(self).__name__} returned {_shown(session)}, not a sqlalchemy.orm.Session"
            )
            raise ConfigurationError(msg)
        return session

    def _prepare(self, tx: _Transaction) -> None:
        if tx.isolation_level is not None or tx.read_only:
            _prepare(tx.session, tx, self._models())

    def _guard_writes(self, tx: _Transaction) -> None:
        _guard_writes(tx.session, self)

    def _flush(self, session: Session) -> None:
        session.flush()

    def _commit(self, session: Session) -> None:
        session.commit()

    def _store_messages(self, session: Session, outbox: Outbox, messages: list[tuple[Message, bytes]]) -> None:
        # Through the session, so that its execution options and do_orm_execute listeners apply to it as to
        # every other statement of the transaction; one prepared statement, which sends no positions back.
        session.execute(outbox._insert, outbox.rows(messages))

    def _receive(self, session: Session, inbox: Inbox, consumer: str, message_id: str) -> bool:
        dialect = session.get_bind(clause=inbox.table).dialect.name
        return inbox.inserted(session.execute(inbox.receipt(consumer, message_id, dialect)))

    def _rollback(self, session: Session) -> None:
        session.rollback()

    def _close(self, session: Session, *, invalidate: bool) -> None:
        try:
            if invalidate:
                session.invalidate()
                return
            held = _held_connections(session)
            try:
                session.close()
            except BaseException:
                _invalidate(held)
                session.invalidate()
                raise
        finally:
            _unguard_session(session)

    def _begin_savepoint(self, session: Session) -> SessionTransaction:
        bind = _single_bind(session)
        if bind is not None and bind.dialect.name == "sqlite":
            connection = session.connection()
            if _sqlite_needs_begin(connection.connection.driver_connection):
                connection.exec_driver_sql("BEGIN")
        return session.begin_nested()

    def _end_savepoint(self, handle: SessionTransaction, *, release: bool) -> None:
        if release:
            try:
                handle.commit()  # flushes first, which may fail
            except BaseException:
                handle.rollback()
                raise
        else:
            handle.rollback()

    def _has_changes(self, session: Session) -> bool:
        return _has_changes(session)

    def _read_only_scope(self, session: Session, *, starts: bool) -> None:
        """The flush guard sees changed attributes by itself."""

    def _adopt(self, session: Session, parent: _Transaction | None) -> None:
        _hold(session, parent)

    def _guard_session(self, tx: _Transaction) -> None:
        _guard_session(tx.session, self, tx.session)
