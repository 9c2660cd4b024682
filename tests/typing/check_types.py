"""Checked by ``mypy --strict`` in CI: the exact types users see on a unit of work.

Not collected by pytest (the file name does not start with ``test_``); running
it is pointless, type-checking it is the test.
"""

from __future__ import annotations

import abc

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
        unit.commit()


def implementations(sql: SqlAlchemyAllocationUnitOfWork, fake: FakeAllocationUnitOfWork) -> None:
    with sql:
        assert_type(sql.products, SqlAlchemyProductRepository)
        assert_type(sql.batches, uow.Repository[Batch])
    with fake as entered:
        assert_type(entered, FakeAllocationUnitOfWork)
        assert_type(fake.products, InMemoryProductRepository)
        assert_type(fake.committed, bool)
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
    assert_type(AllocationUnitOfWork.batches, uow._unit_of_work.ModelRepository[Batch])
    error: errors.UowError = errors.InactiveUnitOfWorkError("x")
    assert isinstance(error, RuntimeError)
