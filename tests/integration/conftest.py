"""Fixtures for tests that run on real databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

import uow
from tests.support.databases import Database, Provisioner
from tests.support.models import TABLES
from uow import errors

BACKENDS = ("sqlite", "postgresql", "mariadb")


@pytest.fixture(scope="session")
def provisioner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioner]:
    """The run's databases and engines."""
    prov = Provisioner(tmp_path_factory.mktemp("databases"))
    yield prov
    prov.close()


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, provisioner: Provisioner) -> Database:
    """This run's database on each backend in turn."""
    return provisioner.database(request.param)


@pytest.fixture
def engine(database: Database, provisioner: Provisioner) -> Engine:
    """A sync engine on the run's database, with the test tables created and emptied."""
    eng = provisioner.schema_engine(database.backend)
    with eng.begin() as conn:
        for table in TABLES:
            conn.execute(table.delete())
    return eng


@pytest.fixture(autouse=True)
def _no_connection_left_checked_out(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, no unit of work is active and every engine's pool has all its connections back."""
    yield
    with pytest.raises(errors.InactiveUnitOfWorkError):
        uow.current()
    if "provisioner" in request.fixturenames:
        prov: Provisioner = request.getfixturevalue("provisioner")
        leaked = {str(eng.url): eng.pool.checkedout() for eng in prov.engines if eng.pool.checkedout()}
        assert {} == leaked


def rows(eng: Engine, sql: str) -> list[tuple[object, ...]]:
    """Rows read through a separate connection, with plain SQL."""
    with eng.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql))]
