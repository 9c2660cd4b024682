"""uow's pytest plugin on real databases: per-test rollback isolation, sync and async, run through pytester."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from tests.integration.conftest import rows
from tests.support.databases import Database

pytest_plugins = ["pytester"]

#: The inner runs use pytest's strict asyncio mode, so the plugin's async fixtures must declare themselves.
INI = """
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
asyncio_default_test_loop_scope = function
filterwarnings = error
"""

#: The inner suite's engines: the project's conftest overrides the plugin's engine fixtures.
CONFTEST = """
import os

import pytest
import pytest_asyncio
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import create_async_engine


@pytest.fixture(scope="session")
def uow_engine():
    engine = create_engine(os.environ["UOW_PLUGIN_TEST_URL"])
    yield engine
    engine.dispose()


@pytest_asyncio.fixture
async def uow_async_engine():
    engine = create_async_engine(os.environ["UOW_PLUGIN_TEST_ASYNC_URL"])
    yield engine
    await engine.dispose()
"""

#: The same engines with SQLAlchemy's documented SQLite recipe: the driver sends no BEGIN, an event listener does.
SQLITE_RECIPE_CONFTEST = """
import os

import pytest
import pytest_asyncio
from sqlalchemy import create_engine, event
from sqlalchemy.ext.asyncio import create_async_engine


def begin_ourselves(engine):
    @event.listens_for(engine, "connect")
    def do_connect(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def do_begin(connection):
        connection.exec_driver_sql("BEGIN")


@pytest.fixture(scope="session")
def uow_engine():
    engine = create_engine(os.environ["UOW_PLUGIN_TEST_URL"])
    begin_ourselves(engine)
    yield engine
    engine.dispose()


@pytest_asyncio.fixture
async def uow_async_engine():
    engine = create_async_engine(os.environ["UOW_PLUGIN_TEST_ASYNC_URL"])
    begin_ourselves(engine.sync_engine)
    yield engine
    await engine.dispose()
"""

SYNC_TESTS = '''
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests.support.models import Item, Sku
from tests.support.uows import SqlAlchemyShopUnitOfWork
from uow import errors


def stock(uow, name, qty):
    with uow:
        uow.items.add(Item(name, qty))
        uow.commit()


def import_skus(uow, codes):
    skipped = []
    with uow:
        for code in codes:
            try:
                with uow.savepoint():
                    uow.skus.add(Sku(code, "imported"))
            except IntegrityError:
                skipped.append(code)
        uow.commit()
    return skipped


def committed(engine, sql):
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql))]


def test_a_service_commits_and_sees_its_rows(uow_session_factory, uow_engine):
    """A committing service sees its rows, a second unit of work too, another connection not."""
    shop = SqlAlchemyShopUnitOfWork(uow_session_factory)
    stock(shop, "lamp", 3)
    assert (1, True) == (shop.commits, shop.committed)
    with shop:
        assert [("lamp", 3)] == [(item.name, item.qty) for item in shop.items.list()]
    second = SqlAlchemyShopUnitOfWork(uow_session_factory)
    with second:
        assert ["lamp"] == [item.name for item in second.items.list()]
    assert [] == committed(uow_engine, "SELECT name FROM uow_items")


def test_b_the_next_test_finds_nothing(uow_session_factory, uow_engine):
    """The previous test's rows are gone."""
    shop = SqlAlchemyShopUnitOfWork(uow_session_factory)
    with shop:
        assert 0 == shop.items.count()
    assert [] == committed(uow_engine, "SELECT name FROM uow_items")


def test_c_savepoints_and_rollbacks_of_the_code_still_work(uow_session_factory, uow_connection):
    """Savepoints, rollback() and a failing block of the code under test behave as on a database."""
    shop = SqlAlchemyShopUnitOfWork(uow_session_factory)
    assert [] == import_skus(shop, ["LAMP"])
    assert ["LAMP"] == import_skus(shop, ["DESK", "LAMP", "RUG"])
    with shop:
        shop.items.add(Item("chair", 1))
        shop.items.count()
        shop.rollback()
        shop.items.add(Item("stool", 1))
        shop.commit()
    with pytest.raises(ValueError):
        with shop:
            shop.items.add(Item("table", 1))
            shop.items.count()
            raise ValueError
    with shop:
        assert ["DESK", "LAMP", "RUG"] == sorted(sku.code for sku in shop.skus.list())
        assert ["stool"] == [item.name for item in shop.items.list()]
    assert [("stool",)] == list(uow_connection.execute(text("SELECT name FROM uow_items")))


def test_d_a_failed_commit_leaves_the_test_transaction_usable(uow_session_factory):
    """A commit that fails rolls back to the session's savepoint, and the test goes on."""
    shop = SqlAlchemyShopUnitOfWork(uow_session_factory)
    import_skus(shop, ["LAMP"])
    with shop:
        shop.skus.add(Sku("LAMP", "again"))
        with pytest.raises(IntegrityError):
            shop.commit()
        shop.skus.add(Sku("DESK", "after the failure"))
        shop.commit()
    with shop:
        assert ["DESK", "LAMP"] == sorted(sku.code for sku in shop.skus.list())


def test_e_requires_new_is_refused(uow_session_factory):
    """A requires_new block cannot run on the test's one connection, and says so."""
    shop = SqlAlchemyShopUnitOfWork(uow_session_factory)
    with shop:
        shop.items.add(Item("outer", 1))
        shop.items.count()
        with pytest.raises(errors.ConfigurationError, match="two sessions of uow_session_factory"):
            with shop.transaction(propagation="requires_new"):
                shop.items.count()
        shop.commit()
    with shop:
        assert ["outer"] == [item.name for item in shop.items.list()]


def test_f_a_second_unit_of_work_inside_a_first_is_refused(uow_session_factory):
    """A second unit of work inside a first one cannot run on the test's one connection, and says so."""
    first = SqlAlchemyShopUnitOfWork(uow_session_factory)
    second = SqlAlchemyShopUnitOfWork(uow_session_factory)
    with first:
        first.items.count()
        with pytest.raises(errors.ConfigurationError, match="second unit of work"):
            with second:
                second.items.count()
    stock(second, "after", 1)
    with first:
        assert ["after"] == [item.name for item in first.items.list()]


def test_g_hooks_and_commits_can_be_checked(uow_session_factory, uow_capture_on_commit, mocker):
    """The capture and a pytest-mock spy work on a unit of work of the isolated connection."""
    shop = SqlAlchemyShopUnitOfWork(uow_session_factory)
    commit = mocker.spy(shop, "commit")
    sent = []

    def place(uow):
        with uow:
            uow.items.add(Item("lamp", 1))
            uow.on_commit(lambda: sent.append("mail"))
            uow.commit()

    with uow_capture_on_commit(shop) as hooks:
        place(shop)

    commit.assert_called_once_with()
    assert (1, []) == (len(hooks), sent)
    hooks[0]()
    assert ["mail"] == sent
'''

ASYNC_TESTS = '''
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests.support.models import Item, Sku
from tests.support.uows import AsyncSqlAlchemyShopUnitOfWork
from uow import errors


async def stock(uow, name, qty):
    async with uow:
        await uow.items.add(Item(name, qty))
        await uow.commit()


async def committed(engine, sql):
    async with engine.connect() as connection:
        return [tuple(row) for row in await connection.execute(text(sql))]


@pytest.mark.asyncio
async def test_a_a_service_commits_and_sees_its_rows(uow_async_session_factory, uow_async_engine):
    """A committing service sees its rows, a second unit of work too, another connection not."""
    shop = AsyncSqlAlchemyShopUnitOfWork(uow_async_session_factory)
    await stock(shop, "lamp", 3)
    async with shop:
        assert [("lamp", 3)] == [(item.name, item.qty) for item in await shop.items.list()]
    second = AsyncSqlAlchemyShopUnitOfWork(uow_async_session_factory)
    async with second:
        assert ["lamp"] == [item.name for item in await second.items.list()]
    assert 1 == shop.commits
    assert [] == await committed(uow_async_engine, "SELECT name FROM uow_items")


@pytest.mark.asyncio
async def test_b_the_next_test_finds_nothing(uow_async_session_factory, uow_async_engine):
    """The previous test's rows are gone."""
    shop = AsyncSqlAlchemyShopUnitOfWork(uow_async_session_factory)
    async with shop:
        assert 0 == await shop.items.count()
    assert [] == await committed(uow_async_engine, "SELECT name FROM uow_items")


@pytest.mark.asyncio
async def test_c_savepoints_and_rollbacks_of_the_code_still_work(uow_async_session_factory, uow_async_connection):
    """Savepoints, rollback() and a failed commit of the code under test behave as on a database."""
    shop = AsyncSqlAlchemyShopUnitOfWork(uow_async_session_factory)
    async with shop:
        await shop.skus.add(Sku("LAMP", "first"))
        await shop.commit()
    async with shop:
        with pytest.raises(IntegrityError):
            async with shop.savepoint():
                await shop.skus.add(Sku("LAMP", "again"))
        await shop.skus.add(Sku("RUG", "kept"))
        await shop.items.add(Item("chair", 1))
        await shop.items.count()
        await shop.rollback()
        await shop.items.add(Item("stool", 1))
        await shop.commit()
    async with shop:
        await shop.skus.add(Sku("LAMP", "at commit"))
        with pytest.raises(IntegrityError):
            await shop.commit()
    async with shop:
        assert ["LAMP"] == [sku.code for sku in await shop.skus.list()]
        assert ["stool"] == [item.name for item in await shop.items.list()]
    result = await uow_async_connection.execute(text("SELECT name FROM uow_items"))
    assert [("stool",)] == [tuple(row) for row in result]


@pytest.mark.asyncio
async def test_d_requires_new_is_refused(uow_async_session_factory):
    """A requires_new block cannot run on the test's one connection, and says so."""
    shop = AsyncSqlAlchemyShopUnitOfWork(uow_async_session_factory)
    async with shop:
        await shop.items.count()
        with pytest.raises(errors.ConfigurationError, match="two sessions of uow_async_session_factory"):
            async with shop.transaction(propagation="requires_new"):
                await shop.items.count()
'''

ENDS_THE_TRANSACTION = '''
def test_rolls_back_the_connection_itself(uow_connection):
    """Ends the fixture's transaction behind its back."""
    uow_connection.rollback()
'''

ASYNC_ENDS_THE_TRANSACTION = '''
import pytest


@pytest.mark.asyncio
async def test_rolls_back_the_connection_itself(uow_async_connection):
    """Ends the fixture's transaction behind its back."""
    await uow_async_connection.rollback()
'''


@pytest.fixture(name="inner")
def _inner(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, database: Database
) -> pytest.Pytester:
    """A pytester project whose engines point at this run's database, with the plugin loaded explicitly."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTHONPATH", str(request.config.rootpath))
    monkeypatch.setenv("UOW_PLUGIN_TEST_URL", database.url.render_as_string(hide_password=False))
    monkeypatch.setenv("UOW_PLUGIN_TEST_ASYNC_URL", database.async_url.render_as_string(hide_password=False))
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run the inner suite in a new process, with pytest-asyncio, pytest-mock and uow's plugin named explicitly.

    A new process, because the async drivers' dialect modules register SQL functions when imported, and
    importing them again in this process warns; explicit plugins with autoloading off, because pytest refuses
    a plugin that both its entry point and ``-p`` load.
    """
    return pytester.runpytest_subprocess(
        "-p", "pytest_asyncio.plugin", "-p", "pytest_mock", "-p", "uow.pytest_plugin", *args
    )


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_each_test_sees_its_commits_and_leaves_nothing(inner: pytest.Pytester, engine: Engine) -> None:
    """Code under test commits, sees its rows, keeps its savepoints and rollbacks; nothing is left after each test."""
    inner.makepyfile(test_isolated=SYNC_TESTS)

    result = run(inner)

    result.assert_outcomes(passed=7)
    assert [] == rows(engine, "SELECT name FROM uow_items")
    assert [] == rows(engine, "SELECT code FROM uow_skus")


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_each_async_test_sees_its_commits_and_leaves_nothing(inner: pytest.Pytester, engine: Engine) -> None:
    """The async fixtures isolate async code the same way, in pytest-asyncio's strict mode."""
    inner.makepyfile(test_isolated_async=ASYNC_TESTS)

    result = run(inner)

    result.assert_outcomes(passed=4)
    assert [] == rows(engine, "SELECT name FROM uow_items")
    assert [] == rows(engine, "SELECT code FROM uow_skus")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_the_async_fixtures_work_in_auto_mode(inner: pytest.Pytester, engine: Engine) -> None:
    """In pytest-asyncio's auto mode too, async tests get the async fixtures and leave nothing."""
    inner.makeini(INI.replace("asyncio_mode = strict", "asyncio_mode = auto"))
    inner.makepyfile(test_isolated_async=ASYNC_TESTS)

    result = run(inner)

    result.assert_outcomes(passed=4)
    assert [] == rows(engine, "SELECT name FROM uow_items")


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_a_sqlite_engine_that_sends_begin_itself_is_isolated_too(inner: pytest.Pytester, engine: Engine) -> None:
    """On an engine with SQLAlchemy's BEGIN recipe for SQLite, the fixtures send no BEGIN of their own, and isolate."""
    inner.makeconftest(SQLITE_RECIPE_CONFTEST)
    inner.makepyfile(test_isolated=SYNC_TESTS, test_isolated_async=ASYNC_TESTS)

    result = run(inner)

    result.assert_outcomes(passed=11)
    assert [] == rows(engine, "SELECT name FROM uow_items")
    assert [] == rows(engine, "SELECT code FROM uow_skus")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("source", [ENDS_THE_TRANSACTION, ASYNC_ENDS_THE_TRANSACTION], ids=["sync", "async"])
def test_a_test_that_ends_the_outer_transaction_errors(inner: pytest.Pytester, engine: Engine, source: str) -> None:
    """Committing or rolling back the fixture's connection itself fails the test at teardown, saying why."""
    inner.makepyfile(test_ends=source)

    result = run(inner)

    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*was ended by the test or the code under test*"])
    assert [] == rows(engine, "SELECT name FROM uow_items")
