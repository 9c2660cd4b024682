"""The contract suite on SQLite, PostgreSQL and MariaDB, sync and async."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import sessionmaker

from tests.support.contract import Contract
from tests.support.databases import Database
from tests.support.harness import Shop, sql_messages, sql_reader
from tests.support.outbox import InboxContract, OutboxContract
from tests.support.queries import QueryContract
from tests.support.scopes import AsyncScopeContract, ScopeContract
from tests.support.transactions import TransactionContract
from tests.support.uows import AsyncSqlAlchemyShopUnitOfWork, SqlAlchemyShopUnitOfWork


@pytest.fixture(name="shop", params=["sync", "async"])
async def _shop(request: pytest.FixtureRequest, database: Database, engine: Engine) -> AsyncIterator[Shop]:
    name = f"{database.backend}-{request.param}"
    if request.param == "sync":
        yield Shop(
            name,
            lambda **kw: SqlAlchemyShopUnitOfWork(engine, **kw),
            sql_reader(engine),
            is_async=False,
            messages=sql_messages(engine),
        )
        return
    async_engine = create_async_engine(database.async_url)
    try:
        yield Shop(
            name,
            lambda **kw: AsyncSqlAlchemyShopUnitOfWork(async_engine, **kw),
            sql_reader(engine),
            True,
            messages=sql_messages(engine),
        )
        assert 0 == async_engine.pool.checkedout()
    finally:
        await async_engine.dispose()


@pytest.fixture(name="async_shop")
async def _async_shop(database: Database, engine: Engine) -> AsyncIterator[Shop]:
    async_engine = create_async_engine(database.async_url)
    try:
        yield Shop(
            f"{database.backend}-async",
            lambda **kw: AsyncSqlAlchemyShopUnitOfWork(async_engine, **kw),
            sql_reader(engine),
            is_async=True,
            messages=sql_messages(engine),
        )
        assert 0 == async_engine.pool.checkedout()
    finally:
        await async_engine.dispose()


class TestDatabases(Contract):
    """SQLAlchemy units of work keep the contract on every backend."""


def test_user_session_factory_is_used_as_given(engine: Engine) -> None:
    """A sessionmaker passed in keeps its own settings, such as expire_on_commit=True."""
    factory = sessionmaker(engine)
    uow = SqlAlchemyShopUnitOfWork(factory)
    assert factory is uow.session_factory
    with uow:
        assert uow.session.expire_on_commit


def test_engine_gets_a_factory_that_keeps_objects_readable(engine: Engine) -> None:
    """A unit of work built from an Engine makes sessions with expire_on_commit=False."""
    uow = SqlAlchemyShopUnitOfWork(engine)
    with uow:
        assert not uow.session.expire_on_commit


class TestDatabaseTransactions(TransactionContract):
    """SQLAlchemy units of work follow the transaction rules on every backend."""


class TestDatabaseScopes(ScopeContract):
    """SQLAlchemy units of work leave their own blocks' scopes, and one thread or task at a time enters them."""


class TestAsyncDatabaseScopes(AsyncScopeContract):
    """Timeouts work around the commit, rollback and blocks of async SQLAlchemy units of work."""


class TestDatabaseQueries(QueryContract):
    """SQLAlchemy repositories answer queries on every backend."""


class TestDatabaseOutbox(OutboxContract):
    """SQLAlchemy units of work write their messages to the outbox table in their commits."""


class TestDatabaseInbox(InboxContract):
    """SQLAlchemy units of work record handled messages in the inbox table."""
