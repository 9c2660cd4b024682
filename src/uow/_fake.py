"""Fake units of work over an in-memory database, for fast unit tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._async_unit_of_work import AsyncUnitOfWork
from ._machine import _UnitOfWorkCore
from ._memory import AsyncInMemoryRepository, InMemoryDatabase, InMemoryRepository, InMemorySession, _Savepoint
from ._outbox import Inbox, Message, Outbox
from ._scope import _Transaction
from ._unit_of_work import UnitOfWork
from .errors import ConfigurationError

__all__ = ["AsyncFakeUnitOfWork", "FakeUnitOfWork"]


class _FakeCore(_UnitOfWorkCore):
    """What the sync and async fakes share: the database, and every step of a transaction."""

    def __init__(
        self,
        *,
        autocommit: bool = False,
        read_only: bool = False,
        isolation_level: str | None = None,
        unenforced: Iterable[str] = (),
    ) -> None:
        """*unenforced* names what the models declare that the fake cannot model and should leave out.

        A CHECK constraint given as SQL text (by its name), a computed column,
        a server default that is not a literal or a server-side ON UPDATE (as
        ``"table.column"``), or a trigger (``"table trigger"``): without an
        opt-out, building a repository of such a model raises
        ``ConfigurationError`` that names it. A named CHECK constraint that
        the fake can evaluate is left unchecked too.
        """
        super().__init__(autocommit=autocommit, read_only=read_only, isolation_level=isolation_level)
        if isinstance(unenforced, str):
            msg = f"unenforced= takes a collection of names, not the string {unenforced!r}: write ({unenforced!r},)"
            raise ConfigurationError(msg)
        #: The committed state, shared by every block of this unit of work.
        self.database = InMemoryDatabase(frozenset(unenforced))
        #: The rows that ``for_update=True`` locked, in every block: ``(Model, primary key)`` to the lock
        #: taken, ``"update"``, ``"skip_locked"`` or ``"nowait"``, so that a test can assert that a service
        #: locked what it changes. A composite key is a tuple.
        self.locked: dict[tuple[type[Any], Any], str] = {}

    @property
    def published(self) -> list[Message]:
        """The messages that committed transactions wrote to the outbox, oldest first, for a test to assert on.

        A relay would send exactly these: a message published in work that
        rolled back, or in a savepoint that rolled back, is not among them.
        """
        return self.database.published

    def _prepare(self, tx: _Transaction) -> None:
        """The fake has no isolation levels, and read-only mode is enforced at flush."""

    def _guard_writes(self, tx: _Transaction) -> None:
        store: InMemorySession = tx.session
        store.check_write = self._check_write

    def _has_changes(self, session: InMemorySession) -> bool:
        return session.has_changes()

    def _read_only_scope(self, session: InMemorySession, *, starts: bool) -> None:
        session.watch_changes(starts=starts)

    def _adopt(self, session: InMemorySession, parent: _Transaction | None) -> None:
        """Every transaction of the fake has a session of its own: nothing to check."""

    def _open_store(self) -> InMemorySession:
        session = InMemorySession(self.database)
        session.locked = self.locked
        return session

    @staticmethod
    def _drop_store(store: InMemorySession) -> None:
        """End the transaction: whatever was not committed is discarded, and its objects are detached."""
        store.close()


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

    def _open(self) -> InMemorySession:
        return self._open_store()

    def _flush(self, session: InMemorySession) -> None:
        session.flush()

    def _commit(self, session: InMemorySession) -> None:
        session.commit()

    def _store_messages(self, session: InMemorySession, outbox: Outbox, messages: list[tuple[Message, bytes]]) -> None:
        session.stage_messages(message for message, _ in messages)

    def _receive(self, session: InMemorySession, inbox: Inbox, consumer: str, message_id: str) -> bool:
        return session.receive(inbox.table, consumer, message_id)

    def _rollback(self, session: InMemorySession) -> None:
        session.rollback()

    def _close(self, session: InMemorySession, *, invalidate: bool) -> None:
        self._drop_store(session)

    def _begin_savepoint(self, session: InMemorySession) -> _Savepoint:
        return session.begin_nested()

    def _end_savepoint(self, handle: _Savepoint, *, release: bool) -> None:
        handle.session.end_nested(handle, release=release)


class AsyncFakeUnitOfWork(_FakeCore, AsyncUnitOfWork):
    """The async twin of :class:`FakeUnitOfWork`, for ``async with uow:`` services."""

    _repository_base = AsyncInMemoryRepository
    _generic_repository = AsyncInMemoryRepository

    async def _open(self) -> InMemorySession:
        return self._open_store()

    async def _flush(self, session: InMemorySession) -> None:
        session.flush()

    async def _commit(self, session: InMemorySession) -> None:
        session.commit()

    async def _store_messages(
        self, session: InMemorySession, outbox: Outbox, messages: list[tuple[Message, bytes]]
    ) -> None:
        session.stage_messages(message for message, _ in messages)

    async def _receive(self, session: InMemorySession, inbox: Inbox, consumer: str, message_id: str) -> bool:
        return session.receive(inbox.table, consumer, message_id)

    async def _rollback(self, session: InMemorySession) -> None:
        session.rollback()

    async def _close(self, session: InMemorySession, *, invalidate: bool) -> None:
        self._drop_store(session)

    async def _begin_savepoint(self, session: InMemorySession) -> _Savepoint:
        return session.begin_nested()

    async def _end_savepoint(self, handle: _Savepoint, *, release: bool) -> None:
        handle.session.end_nested(handle, release=release)
