"""The units of work of the allocation service, declared once with uow.

Services are typed against :class:`AllocationUnitOfWork`; production code
passes a :class:`SqlAlchemyAllocationUnitOfWork`, unit tests a
:class:`FakeAllocationUnitOfWork`. Both map the domain on construction
(:func:`allocation.orm.start_mappers` is idempotent), because the real
repositories and the in-memory fake both read the mapping.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import uow

from . import orm
from .domain import Batch, Product
from .read_model import AllocationView
from .repository import InMemoryProductRepository, ProductRepository, SqlAlchemyProductRepository

__all__ = ["AllocationUnitOfWork", "FakeAllocationUnitOfWork", "SqlAlchemyAllocationUnitOfWork"]


class AllocationUnitOfWork(uow.UnitOfWork):
    """What the services need: the products, and the batches to list them."""

    products = uow.repository(Product, ProductRepository)
    #: A read-side repository: batches are changed through their product, the aggregate.
    batches = uow.repository(Batch)
    #: ``Allocated`` goes to other services through the outbox; their messages are received once.
    #: The read model of the allocations, which the consumer of ``allocation.allocated`` keeps.
    allocations_view = uow.repository(AllocationView)
    outbox = orm.OUTBOX
    inbox = orm.INBOX


class SqlAlchemyAllocationUnitOfWork(uow.SqlAlchemyUnitOfWork, AllocationUnitOfWork):
    """The allocation unit of work on a database."""

    products = uow.repository(Product, SqlAlchemyProductRepository)

    def __init__(
        self, session_factory: sessionmaker[Session] | Callable[[], Session] | Engine, *, autocommit: bool = False
    ) -> None:
        orm.start_mappers()
        super().__init__(session_factory, autocommit=autocommit)


class FakeAllocationUnitOfWork(uow.FakeUnitOfWork, AllocationUnitOfWork):
    """The allocation unit of work in memory, for unit tests."""

    products = uow.repository(Product, InMemoryProductRepository)

    def __init__(self, *, autocommit: bool = False) -> None:
        orm.start_mappers()
        super().__init__(autocommit=autocommit)
