"""Fixtures for the reliability suite: soak, faults, concurrency at scale, misuse.

The suite runs on PostgreSQL (and, where a test says so, the other backends) in
this run's own database, like the integration tests. Every test is marked
``reliability``, so ``pytest -m "not reliability"`` leaves it out locally.
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import Engine, exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.support.databases import Database, Provisioner, check_nothing_left
from tests.support.models import TABLES


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder ``reliability``."""
    for item in items:
        if "tests/reliability/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def provisioner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioner]:
    """The run's databases and engines."""
    prov = Provisioner(tmp_path_factory.mktemp("reliability"))
    yield prov
    prov.close()


@pytest.fixture
def pg_database(provisioner: Provisioner) -> Database:
    """This run's PostgreSQL database, with the test tables created."""
    provisioner.schema_engine("postgresql")
    return provisioner.database("postgresql")


def _emptied(eng: Engine) -> Engine:
    with eng.begin() as conn:
        for table in TABLES:
            conn.execute(table.delete())
    return eng


@pytest.fixture
def pg_engine(pg_database: Database, provisioner: Provisioner) -> Engine:
    """A fresh sync PostgreSQL engine of this test alone, on emptied tables; its pool is checked after the test."""
    _emptied(provisioner.schema_engine("postgresql"))
    return provisioner.track(pg_database.engine())


@pytest.fixture
async def pg_async_engine(pg_database: Database, provisioner: Provisioner) -> AsyncIterator[AsyncEngine]:
    """A fresh asyncpg engine of this test alone, on emptied tables; it must have every connection back at the end."""
    _emptied(provisioner.schema_engine("postgresql"))
    eng = create_async_engine(pg_database.async_url)
    yield eng
    assert 0 == eng.pool.checkedout()
    await eng.dispose()


@pytest.fixture(autouse=True)
def _nothing_leaked(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: no unit of work is current, no pool has a connection out, no SQLAlchemy warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    check_nothing_left(request)
    assert [] == [str(w.message) for w in caught if issubclass(w.category, exc.SAWarning)]
