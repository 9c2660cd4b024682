"""Checked by ``mypy --strict`` in CI: the exact types users see on a unit of work.

Not collected by pytest (the file name does not start with ``test_``); running
it is pointless, type-checking it is the test.
"""

from __future__ import annotations

import abc
from collections.abc import Coroutine
from typing import Any

from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from typing_extensions import assert_type

import uow
from uow import errors


class Batch:
    reference: str


class Product:
    sku: str


class ProductRepository(uow.Repository[Product]):
    @abc.abstractmethod
    def get_by_batchref(self, reference: str) -> Product | None: ...


class SqlAlchemyProductRepository(uow.SqlAlchemyRepository[Product], ProductRepository):
    def get_by_batchref(self, reference: str) -> Product | None:
        return None


class InMemoryProductRepository(uow.InMemoryRepository[Product], ProductRepository):
    def get_by_batchref(self, reference: str) -> Product | None:
        return None


class AllocationUnitOfWork(uow.UnitOfWork):
    batches = uow.repository(Batch)
    products = uow.repository(Product, ProductRepository)


class SqlAlchemyAllocationUnitOfWork(uow.SqlAlchemyUnitOfWork, AllocationUnitOfWork):
    products = uow.repository(Product, SqlAlchemyProductRepository)


class FakeAllocationUnitOfWork(uow.FakeUnitOfWork, AllocationUnitOfWork):
    products = uow.repository(Product, InMemoryProductRepository)


class AsyncAllocationUnitOfWork(uow.AsyncUnitOfWork):
    batches = uow.repository(Batch)


def service(unit: AllocationUnitOfWork) -> None:
    with unit:
        assert_type(unit, AllocationUnitOfWork)
        assert_type(unit.batches, uow.Repository[Batch])
        assert_type(unit.products, ProductRepository)
        assert_type(unit.products.get("sku"), Product | None)
        assert_type(unit.products.get_by_batchref("ref"), Product | None)
        assert_type(unit.batches.list(reference="r"), list[Batch])
        assert_type(unit.batches.count(), int)
        assert_type(unit.batches.seen, tuple[Batch, ...])
        assert_type(unit.publish("batches.allocated", {"ref": "r"}, key="r"), uow.Message)
        unit.commit()


def implementations(sql: SqlAlchemyAllocationUnitOfWork, fake: FakeAllocationUnitOfWork) -> None:
    with sql:
        assert_type(sql.products, SqlAlchemyProductRepository)
        assert_type(sql.batches, uow.Repository[Batch])
    with fake as entered:
        assert_type(entered, FakeAllocationUnitOfWork)
        assert_type(fake.products, InMemoryProductRepository)
        assert_type(fake.committed, bool)
        assert_type(fake.published, list[uow.Message])
        assert_type(fake.commits, int)
    service(sql)
    service(fake)


async def async_service(unit: AsyncAllocationUnitOfWork) -> None:
    async with unit:
        assert_type(unit.batches, uow.AsyncRepository[Batch])
        assert_type(await unit.batches.get("r"), Batch | None)
        assert_type(await unit.batches.list(), list[Batch])
        await unit.commit()


def declarations() -> None:
    assert_type(AllocationUnitOfWork.batches, uow._declare.ModelRepository[Batch])
    error: errors.UowError = errors.InactiveUnitOfWorkError("x")
    assert isinstance(error, RuntimeError)


class AsyncProductUnitOfWork(uow.AsyncUnitOfWork):
    products = uow.repository(Product)


class FakeAsyncProductUnitOfWork(uow.AsyncFakeUnitOfWork, AsyncProductUnitOfWork):
    pass


@uow.transactional
def allocate(reference: str, qty: int, uow: AllocationUnitOfWork = uow.NEW_UOW) -> Batch | None:
    return uow.batches.get(reference)


@uow.transactional(factory=FakeAllocationUnitOfWork, read_only=True, retries=uow.Retry(retries=2))
def count_batches(uow: AllocationUnitOfWork = uow.NEW_UOW) -> int:
    return uow.batches.count()


@uow.transactional(factory=FakeAsyncProductUnitOfWork, propagation="requires_new", retries=3)
async def count_products(uow: AsyncProductUnitOfWork = uow.NEW_UOW) -> int:
    return await uow.products.count()


class AllocationService:
    @uow.transactional
    def allocate(self, reference: str, uow: AllocationUnitOfWork = uow.NEW_UOW) -> str:
        return reference

    @uow.transactional
    @classmethod
    def build(cls, uow: AllocationUnitOfWork = uow.NEW_UOW) -> AllocationService:
        return cls()

    @staticmethod
    @uow.transactional
    def total(uow: AllocationUnitOfWork = uow.NEW_UOW) -> int:
        return uow.batches.count()


def decorated(fake: FakeAllocationUnitOfWork) -> None:
    assert_type(allocate("ref", 1), Batch | None)
    assert_type(allocate("ref", 1, fake), Batch | None)
    assert_type(allocate(reference="ref", qty=1, uow=fake), Batch | None)
    assert_type(count_batches(), int)
    assert_type(count_products(), Coroutine[Any, Any, int]).close()
    assert_type(AllocationService().allocate("ref", fake), str)
    assert_type(AllocationService.build(), AllocationService)
    assert_type(AllocationService.total(uow=fake), int)
    configured = uow.transactional(factory=FakeAllocationUnitOfWork)
    assert_type(configured, uow._transactional.Transactional)
    assert_type(configured(read_only=True), uow._transactional.Transactional)


async def decorated_async() -> None:
    assert_type(await count_products(), int)
    assert_type(await count_products(FakeAsyncProductUnitOfWork()), int)


def current_and_transaction(unit: AllocationUnitOfWork, fake: FakeAllocationUnitOfWork) -> None:
    assert_type(uow.current(), uow.UnitOfWork | uow.AsyncUnitOfWork)
    assert_type(uow.current(FakeAllocationUnitOfWork), FakeAllocationUnitOfWork)
    # mypy refuses an abstract class where current() declares type[...]: remove these ignores once it accepts them.
    assert_type(uow.current(AllocationUnitOfWork), AllocationUnitOfWork)
    assert_type(uow.current(AsyncProductUnitOfWork), AsyncProductUnitOfWork)
    with unit.transaction(read_only=True) as entered:
        assert_type(entered, AllocationUnitOfWork)
        with unit.savepoint() as saved:
            assert_type(saved, AllocationUnitOfWork)
    with fake.transaction(propagation="requires_new", isolation_level="SERIALIZABLE") as faked:
        assert_type(faked, FakeAllocationUnitOfWork)


async def async_transaction(unit: AsyncProductUnitOfWork) -> None:
    async with unit.transaction(read_only=True) as entered:
        assert_type(entered, AsyncProductUnitOfWork)


class Base(DeclarativeBase):
    pass


class Ticket(Base):
    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    rank: Mapped[int | None]


class TicketUnitOfWork(uow.UnitOfWork):
    tickets = uow.repository(Ticket)


def queries(unit: TicketUnitOfWork) -> None:
    """Where clauses and ordering terms are SQLAlchemy expressions on the model's attributes."""
    with unit:
        found = unit.tickets.list(Ticket.rank > 3, order_by=Ticket.rank.desc().nulls_last(), limit=20, offset=20)
        assert_type(found, list[Ticket])
        assert_type(unit.tickets.list(order_by=[Ticket.rank, Ticket.id.desc()]), list[Ticket])
        assert_type(unit.tickets.count(Ticket.rank.in_([1, 2])), int)
        assert_type(unit.tickets.exists(Ticket.rank.is_(None)), bool)
        page = unit.tickets.page(Ticket.rank > 3, order_by=Ticket.id, limit=20)
        assert_type(page, uow.Page[Ticket])
        assert_type(page.items, list[Ticket])
        assert_type(unit.tickets.page(limit=20, after=page.next).next, str | None)
        unit.tickets.page(Ticket.rank > 3)  # type: ignore[call-arg]
        unit.tickets.list(limit="20")  # type: ignore[arg-type]
        unit.tickets.list(order_by="rank")  # type: ignore[arg-type]
