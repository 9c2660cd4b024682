"""The units of work the contract tests run against, declared once."""

from __future__ import annotations

import uow

from .models import INBOX, OUTBOX, Item, Note, Order, Pair, Sku


class ShopUnitOfWork(uow.UnitOfWork):
    items = uow.repository(Item)
    skus = uow.repository(Sku)
    pairs = uow.repository(Pair)
    orders = uow.repository(Order)
    notes = uow.repository(Note)
    outbox = OUTBOX
    inbox = INBOX


class SqlAlchemyShopUnitOfWork(uow.SqlAlchemyUnitOfWork, ShopUnitOfWork):
    pass


class FakeShopUnitOfWork(uow.FakeUnitOfWork, ShopUnitOfWork):
    pass


class AsyncShopUnitOfWork(uow.AsyncUnitOfWork):
    items = uow.repository(Item)
    skus = uow.repository(Sku)
    pairs = uow.repository(Pair)
    orders = uow.repository(Order)
    notes = uow.repository(Note)
    outbox = OUTBOX
    inbox = INBOX


class AsyncSqlAlchemyShopUnitOfWork(uow.AsyncSqlAlchemyUnitOfWork, AsyncShopUnitOfWork):
    pass


class AsyncFakeShopUnitOfWork(uow.AsyncFakeUnitOfWork, AsyncShopUnitOfWork):
    pass


class AuditUnitOfWork(uow.UnitOfWork):
    """A second kind of unit of work, for an audit trail that may live in another database."""

    notes = uow.repository(Note)


class SqlAlchemyAuditUnitOfWork(uow.SqlAlchemyUnitOfWork, AuditUnitOfWork):
    pass


class FakeAuditUnitOfWork(uow.FakeUnitOfWork, AuditUnitOfWork):
    pass


class AsyncAuditUnitOfWork(uow.AsyncUnitOfWork):
    notes = uow.repository(Note)


class AsyncSqlAlchemyAuditUnitOfWork(uow.AsyncSqlAlchemyUnitOfWork, AsyncAuditUnitOfWork):
    pass


class AsyncFakeAuditUnitOfWork(uow.AsyncFakeUnitOfWork, AsyncAuditUnitOfWork):
    pass
