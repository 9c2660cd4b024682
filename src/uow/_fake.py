"""Fake units of work over an in-memory database, for fast unit tests."""

from __future__ import annotations

from typing import Any

from ._memory import AsyncInMemoryRepository, InMemoryDatabase, InMemoryRepository, InMemorySession
from ._repository import _RepositoryBase
from ._unit_of_work import AsyncUnitOfWork, UnitOfWork, _UnitOfWorkCore

__all__ = ["AsyncFakeUnitOfWork", "FakeUnitOfWork"]


class _FakeCore(_UnitOfWorkCore):
    """What the sync and async fakes share: the database and its session."""

    def __init__(self, *, autocommit: bool = False) -> None:
        super().__init__(autocommit=autocommit)
        #: The committed state, shared by every block of this unit of work.
        self.database = InMemoryDatabase()
        self._store: InMemorySession | None = None

    def _new_repository(self, repository_class: type[Any], model: type[Any]) -> _RepositoryBase[Any]:
        assert self._store is not None
        repo: _RepositoryBase[Any] = repository_class(self._store, model)
        return repo

    def _open_store(self) -> None:
        self._store = InMemorySession(self.database)

    def _store_or_fail(self) -> InMemorySession:
        assert self._store is not None
        return self._store

    def _drop_store(self) -> None:
        """End the block: whatever was not committed is discarded."""
        if self._store is not None:
            self._store.rollback()
        self._store = None


class FakeUnitOfWork(_FakeCore, UnitOfWork):
    """A :class:`~uow.UnitOfWork` over an in-memory database, for unit tests.

    It keeps the real one's rules: uncommitted work disappears at the end of
    a block, objects are copies that a rollback throws away, and the
    in-memory repositories raise what a database would. A test asserts on
    :attr:`committed`, :attr:`commits`, :attr:`rolled_back` and
    :attr:`rollbacks`.
    """

    _repository_base = InMemoryRepository
    _generic_repository = InMemoryRepository

    def _open(self) -> None:
        self._open_store()

    def _commit(self) -> None:
        self._store_or_fail().commit()

    def _rollback(self) -> None:
        self._store_or_fail().rollback()

    def _close(self, *, invalidate: bool) -> None:
        self._drop_store()


class AsyncFakeUnitOfWork(_FakeCore, AsyncUnitOfWork):
    """The async twin of :class:`FakeUnitOfWork`, for ``async with uow:`` services."""

    _repository_base = AsyncInMemoryRepository
    _generic_repository = AsyncInMemoryRepository

    async def _open(self) -> None:
        self._open_store()

    async def _commit(self) -> None:
        self._store_or_fail().commit()

    async def _rollback(self) -> None:
        self._store_or_fail().rollback()

    async def _close(self, *, invalidate: bool) -> None:
        self._drop_store()
