"""A service on one database called inside a block on another: routing by kind, on PostgreSQL and MariaDB.

Orders live on one server and the audit trail on the other, each with a
unit of work class of its own. A decorated audit service called inside an
orders block must write to the audit database and commit there, whatever
the orders block does; before, it joined the orders block and its write was
rolled back with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import attrs
import pytest
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.integration.conftest import rows
from tests.support.databases import Provisioner
from tests.support.models import TABLES, Item, Note
from tests.support.uows import (
    AsyncAuditUnitOfWork,
    AsyncSqlAlchemyAuditUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    AuditUnitOfWork,
    SqlAlchemyAuditUnitOfWork,
    SqlAlchemyShopUnitOfWork,
)
from uow import NEW_UOW, Retry, transactional


class DriverError(Exception):
    """What a driver raises for a serialization failure: SQLSTATE 40001."""

    sqlstate = "40001"


@attrs.frozen
class Servers:
    """The orders database on one server, the audit database on the other."""

    orders: Engine
    audit: Engine
    orders_async: AsyncEngine
    audit_async: AsyncEngine


@pytest.fixture(
    name="servers", params=[("postgresql", "mariadb"), ("mariadb", "postgresql")], ids=lambda p: "-".join(p)
)
async def _servers(request: pytest.FixtureRequest, provisioner: Provisioner) -> AsyncIterator[Servers]:
    orders_backend, audit_backend = request.param
    engines = {backend: provisioner.schema_engine(backend) for backend in (orders_backend, audit_backend)}
    for eng in engines.values():
        with eng.begin() as conn:
            for table in TABLES:
                conn.execute(table.delete())
    async_engines = {
        backend: create_async_engine(provisioner.database(backend).async_url, pool_size=2)
        for backend in (orders_backend, audit_backend)
    }
    try:
        yield Servers(
            engines[orders_backend], engines[audit_backend], async_engines[orders_backend], async_engines[audit_backend]
        )
        for eng in async_engines.values():
            assert 0 == eng.pool.checkedout()
    finally:
        for eng in async_engines.values():
            await eng.dispose()


def test_audit_service_inside_an_orders_block_commits_in_the_audit_database(servers: Servers) -> None:
    """The audit write lands in the audit database and stays there when the orders block rolls back."""

    def make_audit() -> SqlAlchemyAuditUnitOfWork:
        return SqlAlchemyAuditUnitOfWork(servers.audit)

    @transactional(factory=make_audit)
    def audit(text: str, uow: AuditUnitOfWork = NEW_UOW) -> None:
        uow.notes.add(Note(text=text))

    orders = SqlAlchemyShopUnitOfWork(servers.orders)
    with pytest.raises(RuntimeError, match="payment refused"), orders:
        orders.items.add(Item("lamp"))
        audit("order attempted")
        raise RuntimeError("payment refused")
    assert [("order attempted",)] == rows(servers.audit, "SELECT text FROM uow_notes")
    assert [] == rows(servers.orders, "SELECT text FROM uow_notes")
    assert [] == rows(servers.orders, "SELECT name FROM uow_items")


def test_orders_service_inside_an_orders_block_still_joins_it(servers: Servers) -> None:
    """A service of the block's own kind joins it and commits once, with the block."""

    @transactional(factory=lambda: SqlAlchemyShopUnitOfWork(servers.orders))
    def add_item(name: str, uow: SqlAlchemyShopUnitOfWork = NEW_UOW) -> None:
        uow.items.add(Item(name))

    orders = SqlAlchemyShopUnitOfWork(servers.orders)
    with orders:
        add_item("lamp")
        assert [] == rows(servers.orders, "SELECT name FROM uow_items")
        orders.commit()
    assert (1, [("lamp",)]) == (orders.commits, rows(servers.orders, "SELECT name FROM uow_items"))


async def test_async_audit_service_inside_an_orders_block_commits_in_the_audit_database(servers: Servers) -> None:
    """The routing holds on asyncpg and aiomysql: the audit write commits on its own server."""

    def make_audit() -> AsyncSqlAlchemyAuditUnitOfWork:
        return AsyncSqlAlchemyAuditUnitOfWork(servers.audit_async)

    @transactional(factory=make_audit)
    async def audit(text: str, uow: AsyncAuditUnitOfWork = NEW_UOW) -> None:
        await uow.notes.add(Note(text=text))

    orders = AsyncSqlAlchemyShopUnitOfWork(servers.orders_async)
    with pytest.raises(RuntimeError, match="payment refused"):
        async with orders:
            await orders.items.add(Item("lamp"))
            await audit("order attempted")
            raise RuntimeError("payment refused")
    assert [("order attempted",)] == rows(servers.audit, "SELECT text FROM uow_notes")
    assert ([], []) == (
        rows(servers.orders, "SELECT text FROM uow_notes"),
        rows(servers.orders, "SELECT name FROM uow_items"),
    )


async def test_retry_does_not_repeat_a_mail_committed_in_a_child_task_on_the_other_database(servers: Servers) -> None:
    """An attempt whose gathered child task committed a mail on the other server is not retried."""
    attempts: list[int] = []

    def make_audit() -> AsyncSqlAlchemyAuditUnitOfWork:
        return AsyncSqlAlchemyAuditUnitOfWork(servers.audit_async)

    @transactional(factory=make_audit)
    async def send_mail(text: str, uow: AsyncAuditUnitOfWork = NEW_UOW) -> None:
        await uow.notes.add(Note(text=text))

    def make_orders() -> AsyncSqlAlchemyShopUnitOfWork:
        return AsyncSqlAlchemyShopUnitOfWork(servers.orders_async)

    @transactional(factory=make_orders, retries=Retry(retries=3, sleep=lambda delay: None))
    async def place_order(uow: AsyncSqlAlchemyShopUnitOfWork = NEW_UOW) -> None:
        attempts.append(1)
        await uow.items.add(Item("lamp"))
        await asyncio.gather(send_mail("order confirmation"))
        raise sa_exc.OperationalError("UPDATE stock", {}, DriverError("could not serialize access"))

    with pytest.raises(sa_exc.OperationalError):
        await place_order()
    assert 1 == len(attempts)
    assert [("order confirmation",)] == rows(servers.audit, "SELECT text FROM uow_notes")
    assert [] == rows(servers.orders, "SELECT name FROM uow_items")
