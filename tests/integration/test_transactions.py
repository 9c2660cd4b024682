"""Transaction rules that depend on the database: guards on the session, read-only mode, isolation levels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import uow
from tests.integration.conftest import rows
from tests.support.databases import Database, Provisioner
from tests.support.models import Note, Sku, metadata
from tests.support.uows import (
    AsyncShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    ShopUnitOfWork,
    SqlAlchemyShopUnitOfWork,
)
from uow import errors

SERVERS = ("postgresql", "mariadb")


class Boom(Exception):
    """Raised by service code in the tests."""


ISOLATION_QUERY = {
    "postgresql": "SHOW transaction_isolation",
    "mariadb": "SELECT @@session.tx_isolation",
    "sqlite": "PRAGMA read_uncommitted",
}
SHOWN = {
    ("postgresql", "SERIALIZABLE"): "serializable",
    ("postgresql", "READ COMMITTED"): "read committed",
    ("mariadb", "SERIALIZABLE"): "SERIALIZABLE",
    ("mariadb", "REPEATABLE READ"): "REPEATABLE-READ",
    ("sqlite", "SERIALIZABLE"): 0,
    ("sqlite", "READ UNCOMMITTED"): 1,
}
DEFAULT_LEVEL = {"postgresql": "READ COMMITTED", "mariadb": "REPEATABLE READ", "sqlite": "SERIALIZABLE"}
OTHER_LEVEL = {"postgresql": "SERIALIZABLE", "mariadb": "SERIALIZABLE", "sqlite": "READ UNCOMMITTED"}


@pytest.fixture(name="async_engine")
async def _async_engine(database: Database, engine: Engine) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(database.async_url)
    yield eng
    assert 0 == eng.pool.checkedout()
    await eng.dispose()


@pytest.fixture(name="small_engine")
def _small_engine(database: Database, engine: Engine, provisioner: Provisioner) -> Engine:
    """An engine with a single pooled connection, so consecutive units of work reuse it."""
    if database.backend == "sqlite":
        return engine
    return provisioner.track(create_engine(database.url, pool_size=1, max_overflow=0))


def skus(engine: Engine) -> list[str]:
    return sorted(str(code) for (code,) in rows(engine, "SELECT code FROM uow_skus"))


# -- the session cannot be committed or closed from a joined scope ---------------


def test_joined_scope_cannot_commit_close_or_roll_back_the_session(engine: Engine) -> None:
    """session.commit(), rollback() and close() raise JoinedScopeError in joined scopes and savepoints."""
    unit = SqlAlchemyShopUnitOfWork(engine)
    with unit:
        unit.skus.add(Sku("kept"))
        for scope in (unit.transaction(), unit.savepoint()):
            with scope:
                session = unit.session
                for method in (session.commit, session.rollback, session.close):
                    with pytest.raises(errors.JoinedScopeError, match="joined scope"):
                        method()
        assert [] == skus(engine)
        unit.commit()
    assert ["kept"] == skus(engine)
    session.close()  # once the unit of work is done with it, the session is the caller's again


async def test_async_joined_scope_cannot_commit_or_close_the_session(engine: Engine, async_engine: AsyncEngine) -> None:
    """AsyncSession.commit() and close() raise JoinedScopeError in a joined scope."""
    unit = AsyncSqlAlchemyShopUnitOfWork(async_engine)
    async with unit:
        await unit.skus.add(Sku("kept"))
        async with unit:
            with pytest.raises(errors.JoinedScopeError):
                await unit.session.commit()
            with pytest.raises(errors.JoinedScopeError):
                await unit.session.close()
        await unit.commit()
    assert ["kept"] == skus(engine)


def test_requires_new_cannot_close_the_suspended_session(engine: Engine) -> None:
    """Inside requires_new, the suspended outer session cannot be committed or closed either."""
    unit = SqlAlchemyShopUnitOfWork(engine)
    with unit:
        outer = unit.session
        with unit.transaction(propagation="requires_new"):
            assert unit.session is not outer
            with pytest.raises(errors.JoinedScopeError):
                outer.commit()
        assert unit.session is outer


def test_requires_new_refuses_a_pool_with_one_connection_per_thread() -> None:
    """On SQLite in memory, requires_new raises ConfigurationError: its commit would commit the outer work."""
    memory = create_engine("sqlite://")
    metadata.create_all(memory)
    unit = SqlAlchemyShopUnitOfWork(memory)
    with unit:
        unit.skus.add(Sku("outer"))
        unit.session.flush()
        with (
            pytest.raises(errors.ConfigurationError, match="SingletonThreadPool"),
            unit.transaction(propagation="requires_new"),
        ):
            pass  # pragma: no cover
    with memory.connect() as conn:
        assert [] == list(conn.execute(text("SELECT code FROM uow_skus")))
    memory.dispose()


def test_session_already_in_use_is_refused(engine: Engine) -> None:
    """A factory that hands out a session already in use (scoped_session) is refused before anything is lost."""
    scoped = scoped_session(sessionmaker(engine))
    unit = SqlAlchemyShopUnitOfWork(scoped)

    @uow.transactional(factory=lambda: SqlAlchemyShopUnitOfWork(scoped), propagation="requires_new")
    def audit(uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        uow.skus.add(Sku("audit"))  # pragma: no cover

    with pytest.raises(Boom), unit:
        unit.skus.add(Sku("outer"))
        unit.session.flush()
        with pytest.raises(errors.ConfigurationError, match="already in use"):
            audit()
        with (
            pytest.raises(errors.ConfigurationError, match="already in use"),
            unit.transaction(propagation="requires_new"),
        ):
            pass  # pragma: no cover
        raise Boom
    assert [] == skus(engine)
    scoped.remove()

    busy = Session(engine)
    busy.execute(text("SELECT 1"))
    with pytest.raises(errors.ConfigurationError, match="already in use"), SqlAlchemyShopUnitOfWork(lambda: busy):
        pass  # pragma: no cover
    assert busy.in_transaction()  # uow left the borrowed session alone
    busy.close()


def test_nested_transaction_from_a_factory_refuses_a_one_connection_pool() -> None:
    """A decorated requires_new call on SQLite in memory raises instead of committing the caller's work."""
    memory = create_engine("sqlite://")
    metadata.create_all(memory)

    @uow.transactional(factory=lambda: SqlAlchemyShopUnitOfWork(memory), propagation="requires_new")
    def audit(uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        uow.skus.add(Sku("audit"))  # pragma: no cover

    unit = SqlAlchemyShopUnitOfWork(memory)
    with pytest.raises(Boom), unit:
        unit.skus.add(Sku("outer"))
        unit.session.flush()
        with pytest.raises(errors.ConfigurationError, match="StaticPool|SingletonThreadPool"):
            audit()
        raise Boom
    with memory.connect() as conn:
        assert [] == list(conn.execute(text("SELECT code FROM uow_skus")))
    memory.dispose()


def test_commit_with_an_isolation_level_takes_no_connection_for_the_next_transaction(
    small_engine: Engine, database: Database
) -> None:
    """After a commit, the block holds no connection until it runs a statement again, isolation level or not."""
    unit = SqlAlchemyShopUnitOfWork(small_engine)
    ran: list[int] = []
    with unit.transaction(isolation_level=OTHER_LEVEL[database.backend]):
        unit.skus.add(Sku("a"))
        unit.on_commit(lambda: ran.append(small_engine.pool.checkedout()))
        unit.commit()
        assert 0 == small_engine.pool.checkedout()
    assert [0] == ran


@pytest.mark.parametrize("database", SERVERS, indirect=True)
def test_options_do_not_stay_on_a_session_handed_out_again(engine: Engine, database: Database) -> None:
    """A scoped_session reused by the next block keeps neither the read-only mode nor the isolation level."""
    scoped = scoped_session(sessionmaker(engine))
    unit = SqlAlchemyShopUnitOfWork(scoped)
    with unit.transaction(read_only=True, isolation_level="SERIALIZABLE"):
        assert 0 == unit.skus.count()
    with unit:
        assert SHOWN[database.backend, DEFAULT_LEVEL[database.backend]] == current_level(unit, database.backend)
        unit.skus.add(Sku("written"))
        unit.commit()
    scoped.remove()
    assert ["written"] == skus(engine)


def test_child_task_cannot_share_a_one_connection_pool() -> None:
    """A task started inside a block on SQLite in memory cannot open a transaction on the same connection."""
    memory = create_engine("sqlite://")
    metadata.create_all(memory)

    @uow.transactional(factory=lambda: SqlAlchemyShopUnitOfWork(memory))
    def audit(uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        uow.skus.add(Sku("audit"))  # pragma: no cover

    async def parent() -> None:
        unit = SqlAlchemyShopUnitOfWork(memory)
        with pytest.raises(Boom), unit:
            unit.skus.add(Sku("parent"))
            unit.session.flush()

            async def child() -> None:
                audit()

            with pytest.raises(errors.ConfigurationError, match="SingletonThreadPool"):
                await asyncio.create_task(child())
            raise Boom

    asyncio.run(parent())
    with memory.connect() as conn:
        assert [] == list(conn.execute(text("SELECT code FROM uow_skus")))
    memory.dispose()


def test_isolation_level_refuses_models_on_another_engine(engine: Engine, database: Database) -> None:
    """isolation_level= on a session whose models use several engines raises ConfigurationError."""
    other = database.engine()
    unit = SqlAlchemyShopUnitOfWork(sessionmaker(bind=engine, binds={Note: other}))
    with (
        pytest.raises(errors.ConfigurationError, match="one engine"),
        unit.transaction(isolation_level="SERIALIZABLE"),
    ):
        pass  # pragma: no cover
    other.dispose()


def test_hook_that_enters_the_same_unit_of_work_commits_on_its_own(engine: Engine) -> None:
    """A hook that runs `with uow:` on the unit of work that committed starts and commits a transaction of its own."""
    unit = SqlAlchemyShopUnitOfWork(engine)

    def record() -> None:
        with unit:
            unit.skus.add(Sku("hook"))
            unit.commit()

    @uow.transactional
    def place(uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        uow.skus.add(Sku("order"))
        uow.on_commit(record)

    place(uow=unit)
    assert ["hook", "order"] == skus(engine)
    assert 2 == unit.commits


# -- read-only ---------------------------------------------------------------------


def test_read_only_refuses_changed_objects(engine: Engine) -> None:
    """Changing a loaded object in a read-only transaction raises ReadOnlyError at the flush."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO uow_skus (code, description, stock) VALUES ('a', 'x', 1)"))
    unit = SqlAlchemyShopUnitOfWork(engine)
    with unit.transaction(read_only=True):
        sku = unit.skus.get("a")
        assert sku is not None
        sku.stock = 5
        with pytest.raises(errors.ReadOnlyError, match="1 changed"):
            unit.session.flush()
    assert [(1,)] == rows(engine, "SELECT stock FROM uow_skus")


def test_change_left_pending_in_a_read_only_scope_is_not_committed(engine: Engine) -> None:
    """An attribute changed in a read-only scope joined to a read-write block is refused when the scope ends."""
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO uow_skus (code, description, stock) VALUES ('a', 'x', 1)"))
    unit = SqlAlchemyShopUnitOfWork(engine)
    with pytest.raises(errors.RollbackOnlyError), unit:
        with pytest.raises(errors.ReadOnlyError, match="1 changed"), unit.transaction(read_only=True):
            sku = unit.skus.get("a")
            assert sku is not None
            sku.stock = 5
        unit.commit()
    assert [(1,)] == rows(engine, "SELECT stock FROM uow_skus")


def test_read_only_refuses_orm_write_statements(engine: Engine) -> None:
    """An ORM INSERT statement in a read-only transaction raises ReadOnlyError before it is sent."""
    unit = SqlAlchemyShopUnitOfWork(engine)
    with unit.transaction(read_only=True), pytest.raises(errors.ReadOnlyError, match="INSERT, UPDATE or DELETE"):
        unit.session.execute(insert(Sku), [{"code": "a", "description": "", "stock": 0}])
    assert [] == skus(engine)


@pytest.mark.parametrize("database", SERVERS, indirect=True)
def test_server_enforces_read_only(engine: Engine, database: Database) -> None:
    """On PostgreSQL and MariaDB the transaction itself is READ ONLY: even plain SQL cannot write."""
    unit = SqlAlchemyShopUnitOfWork(engine)
    with unit.transaction(read_only=True), pytest.raises(DBAPIError) as raised:
        unit.session.execute(text("INSERT INTO uow_skus (code, description, stock) VALUES ('a', '', 0)"))
    expected = "25006" if database.backend == "postgresql" else 1792
    assert expected in (getattr(raised.value.orig, "sqlstate", None), raised.value.orig.args[0])
    assert [] == skus(engine)


@pytest.mark.parametrize("database", SERVERS, indirect=True)
async def test_async_server_enforces_read_only(engine: Engine, async_engine: AsyncEngine) -> None:
    """The async drivers run read-only transactions as READ ONLY too."""
    unit = AsyncSqlAlchemyShopUnitOfWork(async_engine)
    async with unit.transaction(read_only=True):
        with pytest.raises(DBAPIError):
            await unit.session.execute(text("INSERT INTO uow_skus (code, description, stock) VALUES ('a', '', 0)"))
    assert [] == skus(engine)


def test_read_only_does_not_leak_into_the_next_transaction(small_engine: Engine, engine: Engine) -> None:
    """After a read-only transaction, the same pooled connection writes normally."""
    unit = SqlAlchemyShopUnitOfWork(small_engine)
    with unit.transaction(read_only=True):
        assert 0 == unit.skus.count()
    with unit:
        unit.session.execute(text("INSERT INTO uow_skus (code, description, stock) VALUES ('a', '', 0)"))
        unit.commit()
    assert ["a"] == skus(engine)


# -- isolation levels ---------------------------------------------------------------


def current_level(unit: SqlAlchemyShopUnitOfWork, backend: str) -> Any:
    return unit.session.execute(text(ISOLATION_QUERY[backend])).scalar_one()


def test_owner_sets_the_isolation_level_for_the_whole_block(small_engine: Engine, database: Database) -> None:
    """The owner's isolation level holds before and after a commit in the block, and not in the next block."""
    backend = database.backend
    level = OTHER_LEVEL[backend]
    unit = SqlAlchemyShopUnitOfWork(small_engine)
    with unit.transaction(isolation_level=level):
        assert SHOWN[backend, level] == current_level(unit, backend)
        unit.skus.add(Sku("a"))
        unit.commit()
        assert SHOWN[backend, level] == current_level(unit, backend)
    with unit:
        assert SHOWN[backend, DEFAULT_LEVEL[backend]] == current_level(unit, backend)


async def test_async_owner_sets_the_isolation_level(async_engine: AsyncEngine, database: Database) -> None:
    """The async owner's isolation level is the one the database reports."""
    backend = database.backend
    level = OTHER_LEVEL[backend]
    unit = AsyncSqlAlchemyShopUnitOfWork(async_engine)
    async with unit.transaction(isolation_level=level):
        shown = (await unit.session.execute(text(ISOLATION_QUERY[backend]))).scalar_one()
        assert SHOWN[backend, level] == shown


def test_constructor_options_reach_the_server(small_engine: Engine, engine: Engine, database: Database) -> None:
    """isolation_level= and read_only= given to the constructor apply to every owner block, and to the decorator's."""
    backend = database.backend
    level = OTHER_LEVEL[backend]
    unit = SqlAlchemyShopUnitOfWork(small_engine, isolation_level=level)
    with unit:
        assert SHOWN[backend, level] == current_level(unit, backend)
    with unit.transaction(isolation_level=DEFAULT_LEVEL[backend]):  # the block's own option wins
        assert SHOWN[backend, DEFAULT_LEVEL[backend]] == current_level(unit, backend)

    @uow.transactional(factory=lambda: SqlAlchemyShopUnitOfWork(small_engine, read_only=True))
    def add_sku(code: str, uow: SqlAlchemyShopUnitOfWork = uow.NEW_UOW) -> None:
        uow.skus.add(Sku(code))

    with pytest.raises(errors.ReadOnlyError):
        add_sku("refused")
    uow.transactional(factory=lambda: SqlAlchemyShopUnitOfWork(small_engine, read_only=True), read_only=False)(
        add_sku.__wrapped__  # type: ignore[attr-defined]
    )("allowed")
    assert ["allowed"] == skus(engine)


# -- the decorator on a database ----------------------------------------------------------


def test_decorated_service_owns_commits_and_joins(engine: Engine) -> None:
    """@transactional commits the unit of work it creates, and only joins one that is active."""

    @uow.transactional(factory=lambda: SqlAlchemyShopUnitOfWork(engine))
    def add(code: str, uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        uow.skus.add(Sku(code))

    add("owned")
    assert ["owned"] == skus(engine)
    outer = SqlAlchemyShopUnitOfWork(engine)
    with outer:
        add("joined")
        add("passed", uow=outer)
        assert ["owned"] == skus(engine)
    assert ["owned"] == skus(engine)


async def test_async_decorated_service_owns_and_rolls_back_on_error(engine: Engine, async_engine: AsyncEngine) -> None:
    """An async @transactional service commits on return and rolls back when it raises."""

    @uow.transactional(factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine))
    async def add(code: str, *, fail: bool = False, uow: AsyncShopUnitOfWork = uow.NEW_UOW) -> None:
        await uow.skus.add(Sku(code))
        if fail:
            raise LookupError(code)

    await add("kept")
    with pytest.raises(LookupError):
        await add("dropped", fail=True)
    assert ["kept"] == skus(engine)
