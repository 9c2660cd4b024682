"""Units of work backed by SQLAlchemy sessions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from ._repository import _RepositoryBase
from ._sqlalchemy_repository import AsyncSqlAlchemyRepository, SqlAlchemyRepository
from ._unit_of_work import AsyncUnitOfWork, UnitOfWork
from .errors import ConfigurationError, InactiveUnitOfWorkError

__all__ = ["AsyncSqlAlchemyUnitOfWork", "SqlAlchemyUnitOfWork"]


def _inactive_session() -> InactiveUnitOfWorkError:
    return InactiveUnitOfWorkError(
        "uow.session was used outside a block: the unit of work has a session only "
        "inside `with uow:` (or `async with uow:`)"
    )


class SqlAlchemyUnitOfWork(UnitOfWork):
    """A :class:`~uow.UnitOfWork` that opens a SQLAlchemy ``Session`` for each block.

    *session_factory* is a ``sessionmaker`` (or any callable returning a
    ``Session``), which uow uses as it is, or an ``Engine``, for which uow
    builds a ``sessionmaker`` with ``expire_on_commit=False`` so that objects
    returned from a block stay readable after it.
    """

    _repository_base = SqlAlchemyRepository
    _generic_repository = SqlAlchemyRepository

    def __init__(
        self, session_factory: sessionmaker[Session] | Callable[[], Session] | Engine, *, autocommit: bool = False
    ) -> None:
        super().__init__(autocommit=autocommit)
        if isinstance(session_factory, (AsyncEngine, async_sessionmaker)):
            msg = (
                f"{type(self).__name__} is synchronous but was given an async {type(session_factory).__name__}; "
                "use AsyncSqlAlchemyUnitOfWork, or pass a sync Engine or sessionmaker"
            )
            raise ConfigurationError(msg)
        if isinstance(session_factory, Engine):
            session_factory = sessionmaker(session_factory, expire_on_commit=False)
        elif not callable(session_factory):
            msg = f"{type(self).__name__} takes an Engine or a session factory, not {session_factory!r}"
            raise ConfigurationError(msg)
        self.session_factory = session_factory
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        """The session of the active block."""
        if self._session is None:
            raise _inactive_session()
        self._used = True
        return self._session

    def _open(self) -> None:
        session = self.session_factory()
        if not isinstance(session, Session):
            msg = f"the session factory of {type(self).__name__} returned {session!r}, not a sqlalchemy.orm.Session"
            raise ConfigurationError(msg)
        self._session = session

    def _new_repository(self, repository_class: type[Any], model: type[Any]) -> _RepositoryBase[Any]:
        repo: _RepositoryBase[Any] = repository_class(self._session, model)
        return repo

    def _commit(self) -> None:
        assert self._session is not None
        self._session.commit()

    def _rollback(self) -> None:
        assert self._session is not None
        self._session.rollback()

    def _close(self, *, invalidate: bool) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if not invalidate:
            try:
                session.close()
            except BaseException:
                session.invalidate()
                raise
            return
        session.invalidate()


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
    ) -> None:
        super().__init__(autocommit=autocommit)
        if isinstance(session_factory, (Engine, sessionmaker)):
            msg = (
                f"{type(self).__name__} is asynchronous but was given a sync {type(session_factory).__name__}; "
                "use SqlAlchemyUnitOfWork, or pass an AsyncEngine or async_sessionmaker"
            )
            raise ConfigurationError(msg)
        if isinstance(session_factory, AsyncEngine):
            session_factory = async_sessionmaker(session_factory, expire_on_commit=False)
        elif not callable(session_factory):
            msg = f"{type(self).__name__} takes an AsyncEngine or an async session factory, not {session_factory!r}"
            raise ConfigurationError(msg)
        self.session_factory = session_factory
        self._session: AsyncSession | None = None

    @property
    def session(self) -> AsyncSession:
        """The async session of the active block."""
        if self._session is None:
            raise _inactive_session()
        self._used = True
        return self._session

    async def _open(self) -> None:
        session = self.session_factory()
        if not isinstance(session, AsyncSession):
            msg = (
                f"the session factory of {type(self).__name__} returned {session!r}, "
                "not a sqlalchemy.ext.asyncio.AsyncSession"
            )
            raise ConfigurationError(msg)
        self._session = session

    def _new_repository(self, repository_class: type[Any], model: type[Any]) -> _RepositoryBase[Any]:
        repo: _RepositoryBase[Any] = repository_class(self._session, model)
        return repo

    async def _commit(self) -> None:
        assert self._session is not None
        await self._session.commit()

    async def _rollback(self) -> None:
        assert self._session is not None
        await self._session.rollback()

    async def _close(self, *, invalidate: bool) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if not invalidate:
            try:
                await session.close()
            except BaseException:
                await session.invalidate()
                raise
            return
        await session.invalidate()
