"""uow: the Unit of Work and Repository patterns on SQLAlchemy 2.x, sync and async.

Services receive a unit of work and work inside ``with uow:``; the unit of
work owns the session and exposes repositories. :class:`SqlAlchemyUnitOfWork`
runs on a database, :class:`FakeUnitOfWork` in memory for unit tests.
"""

from __future__ import annotations

from . import errors
from ._fake import AsyncFakeUnitOfWork, FakeUnitOfWork
from ._memory import AsyncInMemoryRepository, InMemoryRepository
from ._repository import AsyncRepository, Repository
from ._sqlalchemy import AsyncSqlAlchemyUnitOfWork, SqlAlchemyUnitOfWork
from ._sqlalchemy_repository import AsyncSqlAlchemyRepository, SqlAlchemyRepository
from ._transactional import NEW_UOW, Retry, transactional
from ._unit_of_work import AsyncUnitOfWork, UnitOfWork, current, repository

__all__ = [
    "AsyncFakeUnitOfWork",
    "AsyncInMemoryRepository",
    "AsyncRepository",
    "AsyncSqlAlchemyRepository",
    "AsyncSqlAlchemyUnitOfWork",
    "AsyncUnitOfWork",
    "FakeUnitOfWork",
    "InMemoryRepository",
    "NEW_UOW",
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
