"""uow: the Unit of Work and Repository patterns on SQLAlchemy 2.x, sync and async.

Services receive a unit of work and work inside ``with uow:``; the unit of
work owns the session and exposes repositories. :class:`SqlAlchemyUnitOfWork`
runs on a database, :class:`FakeUnitOfWork` in memory for unit tests.
"""

from __future__ import annotations

import typing as _typing

from . import errors
from ._async_unit_of_work import AsyncUnitOfWork
from ._declare import repository
from ._fake import AsyncFakeUnitOfWork, FakeUnitOfWork
from ._memory import AsyncInMemoryRepository, InMemoryRepository
from ._outbox import Inbox, Message, Outbox
from ._ownership import current
from ._query import Page
from ._repository import AsyncRepository, Repository
from ._sqlalchemy import SqlAlchemyUnitOfWork
from ._sqlalchemy_repository import AsyncSqlAlchemyRepository, SqlAlchemyRepository
from ._transactional import NEW_UOW, Retry, transactional
from ._unit_of_work import UnitOfWork

if _typing.TYPE_CHECKING:
    from ._sqlalchemy_async import AsyncSqlAlchemyUnitOfWork

__all__ = [
    "AsyncFakeUnitOfWork",
    "AsyncInMemoryRepository",
    "AsyncRepository",
    "AsyncSqlAlchemyRepository",
    "AsyncSqlAlchemyUnitOfWork",
    "AsyncUnitOfWork",
    "FakeUnitOfWork",
    "InMemoryRepository",
    "Inbox",
    "Message",
    "NEW_UOW",
    "Outbox",
    "Page",
    "Repository",
    "Retry",
    "SqlAlchemyRepository",
    "SqlAlchemyUnitOfWork",
    "UnitOfWork",
    "current",
    "errors",
    "repository",
    "transactional",
]


def __getattr__(name: str) -> _typing.Any:
    # SQLAlchemy's asyncio extension needs greenlet, which SQLAlchemy 2.1 no longer installs: the async
    # SQLAlchemy unit of work is imported when it is first asked for, so that sync code runs without it.
    if name == "AsyncSqlAlchemyUnitOfWork":
        from ._sqlalchemy import greenlet_missing

        missing = greenlet_missing("uow.AsyncSqlAlchemyUnitOfWork")
        if missing is not None:
            raise missing
        from ._sqlalchemy_async import AsyncSqlAlchemyUnitOfWork

        globals()[name] = AsyncSqlAlchemyUnitOfWork
        return AsyncSqlAlchemyUnitOfWork
    msg = f"module 'uow' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
