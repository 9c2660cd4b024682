"""The async unit of work backed by a SQLAlchemy ``AsyncSession``.

Importing this module imports ``sqlalchemy.ext.asyncio``, which needs
greenlet: ``uow`` imports it only when ``uow.AsyncSqlAlchemyUnitOfWork`` is
first used, and says which extra to install when greenlet is missing.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, AsyncSessionTransaction, async_sessionmaker
from sqlalchemy.orm import sessionmaker

from ._async_unit_of_work import AsyncUnitOfWork
from ._outbox import Inbox, Message, Outbox
from ._scope import _Transaction
from ._sqlalchemy import (
    _guard_session,
    _guard_writes,
    _has_changes,
    _held_connections,
    _hold,
    _inactive_session,
    _invalidate,
    _prepare,
    _single_bind,
    _sqlite_needs_begin,
    _unguard_session,
)
from ._sqlalchemy_repository import AsyncSqlAlchemyRepository
from .errors import ConfigurationError, _shown

__all__ = ["AsyncSqlAlchemyUnitOfWork"]


class AsyncSqlAlchemyUnitOfWork(AsyncUnitOfWork):
    """The async twin of :class:`SqlAlchemyUnitOfWork`, over an ``AsyncSession``.

    *session_factory* is an ``async_sessionmaker`` (or any callable returning
    an ``AsyncSession``) or an ``AsyncEngine``, for which uow builds an
    ``async_sessionmaker`` with ``expire_on_commit=False``.
    """

    _repository_base = AsyncSqlAlchemyRepository
    _generic_repository = AsyncSqlAlchemyRepository

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession] | Callable[[], AsyncSession] | AsyncEngine,
        *,
        autocommit: bool = False,
        read_only: bool = False,
        isolation_level: str | None = None,
    ) -> None:
        super().__init__(autocommit=autocommit, read_only=read_only, isolation_level=isolation_level)
        if isinstance(session_factory, (Engine, sessionmaker)):
            msg = (
                f"{type(self).__name__} is asynchronous but was given a sync {type(session_factory).__name__}; "
                "use SqlAlchemyUnitOfWork, or pass an AsyncEngine or async_sessionmaker"
            )
            raise ConfigurationError(msg)
        if isinstance(session_factory, AsyncEngine):
            session_factory = async_sessionmaker(session_factory, expire_on_commit=False)
        elif not callable(session_factory):
            msg = (
                f"{type(self).__name__} takes an AsyncEngine or an async session factory, not {_shown(session_factory)}"
            )
            raise ConfigurationError(msg)
        self.session_factory = session_factory

    @property
    def session(self) -> AsyncSession:
        """The async session of the active transaction."""
        if not self._scopes:
            raise _inactive_session()
        scope = self._scope_for("uow.session")
        scope.tx.used = True
        session: AsyncSession = scope.tx.session
        return session

    async def _open(self) -> AsyncSession:
        session = self.session_factory()
        if not isinstance(session, AsyncSession):
            msg = (
                f"the session factory of {type(self).__name__} returned {_shown(session)}, "
                "not a sqlalchemy.ext.asyncio.AsyncSession"
            )
            raise ConfigurationError(msg)
        return session

    def _prepare(self, tx: _Transaction) -> None:
        if tx.isolation_level is not None or tx.read_only:
            _prepare(tx.session.sync_session, tx, self._models())

    def _guard_writes(self, tx: _Transaction) -> None:
        _guard_writes(tx.session.sync_session, self)

    async def _flush(self, session: AsyncSession) -> None:
        await session.flush()

    async def _commit(self, session: AsyncSession) -> None:
        await session.commit()

    async def _store_messages(
        self, session: AsyncSession, outbox: Outbox, messages: list[tuple[Message, bytes]]
    ) -> None:
        await session.execute(outbox._insert, outbox.rows(messages))  # as the sync twin does

    async def _receive(self, session: AsyncSession, inbox: Inbox, consumer: str, message_id: str) -> bool:
        dialect = session.sync_session.get_bind(clause=inbox.table).dialect.name
        return inbox.inserted(await session.execute(inbox.receipt(consumer, message_id, dialect)))

    async def _rollback(self, session: AsyncSession) -> None:
        await session.rollback()

    async def _close(self, session: AsyncSession, *, invalidate: bool) -> None:
        try:
            if invalidate:
                await session.invalidate()
                return
            held = _held_connections(session.sync_session)
            try:
                await session.close()
            except BaseException:
                await session.run_sync(lambda _: _invalidate(held))
                await session.invalidate()
                raise
        finally:
            _unguard_session(session.sync_session)

    async def _begin_savepoint(self, session: AsyncSession) -> AsyncSessionTransaction:
        bind = _single_bind(session.sync_session)
        if bind is not None and bind.dialect.name == "sqlite":
            connection = await session.connection()
            raw = await connection.get_raw_connection()
            if _sqlite_needs_begin(raw.driver_connection):
                await connection.exec_driver_sql("BEGIN")
        return await session.begin_nested()

    async def _end_savepoint(self, handle: AsyncSessionTransaction, *, release: bool) -> None:
        if release:
            try:
                await handle.commit()  # flushes first, which may fail
            except BaseException:
                await handle.rollback()
                raise
        else:
            await handle.rollback()

    def _has_changes(self, session: AsyncSession) -> bool:
        return _has_changes(session.sync_session)

    def _read_only_scope(self, session: AsyncSession, *, starts: bool) -> None:
        """The flush guard sees changed attributes by itself."""

    def _adopt(self, session: AsyncSession, parent: _Transaction | None) -> None:
        _hold(session.sync_session, parent)

    def _guard_session(self, tx: _Transaction) -> None:
        _guard_session(tx.session.sync_session, self, tx.session)
