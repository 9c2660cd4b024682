"""The product repository: uow's collection interface plus one query of the domain's own."""

from __future__ import annotations

import abc

from sqlalchemy import select

import uow

from .domain import Batch, Product
from .orm import batches

__all__ = ["InMemoryProductRepository", "ProductRepository", "SqlAlchemyProductRepository"]


class ProductRepository(uow.Repository[Product]):
    """Products by SKU (``get``), and by the reference of one of their batches."""

    @abc.abstractmethod
    def get_by_batchref(self, ref: str) -> Product | None:
        """The product that has a batch with reference *ref*, or ``None``."""


class SqlAlchemyProductRepository(uow.SqlAlchemyRepository[Product], ProductRepository):
    """The product repository on a SQLAlchemy session."""

    def get_by_batchref(self, ref: str) -> Product | None:
        stmt = select(Product).join(Batch).where(batches.c.reference == ref)
        product = self.session.scalars(stmt).one_or_none()
        return None if product is None else self._track(product)


class InMemoryProductRepository(uow.InMemoryRepository[Product], ProductRepository):
    """The product repository of the fake unit of work."""

    def get_by_batchref(self, ref: str) -> Product | None:
        return next((p for p in self.list() if any(b.reference == ref for b in p.batches)), None)
