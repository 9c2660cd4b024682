"""Fixtures for tests that run on real databases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.support.databases import Database, provision
from tests.support.models import TABLES, metadata

BACKENDS = ("sqlite", "postgresql", "mariadb")


class Provisioner:
    """Creates each backend's database for this run on first use, and drops them all at the end."""

    def __init__(self, tmp_dir: Path) -> None:
        self._tmp_dir = tmp_dir
        self._databases: dict[str, Database] = {}
        self._teardowns: list[Iterator[Database]] = []
        self._schema_engines: dict[str, Engine] = {}
        #: Every engine a test made; each must have no connection checked out after a test.
        self.engines: list[Engine] = []

    def database(self, backend: str) -> Database:
        if backend not in self._databases:
            gen = provision(backend, self._tmp_dir)
            self._databases[backend] = next(gen)
            self._teardowns.append(gen)
        return self._databases[backend]

    def schema_engine(self, backend: str) -> Engine:
        eng = self._schema_engines.get(backend)
        if eng is None:
            eng = self._schema_engines[backend] = self.track(self.database(backend).engine())
            metadata.create_all(eng)
        return eng

    def track(self, eng: Engine) -> Engine:
        self.engines.append(eng)
        return eng

    def close(self) -> None:
        for eng in self.engines:
            eng.dispose()
        for gen in self._teardowns:
            for _ in gen:  # runs the code after the yield, which drops the database
                pass


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
    """After each test, every engine's pool has all its connections back."""
    yield
    if "provisioner" in request.fixturenames:
        prov: Provisioner = request.getfixturevalue("provisioner")
        leaked = {str(eng.url): eng.pool.checkedout() for eng in prov.engines if eng.pool.checkedout()}
        assert {} == leaked


def rows(eng: Engine, sql: str) -> list[tuple[object, ...]]:
    """Rows read through a separate connection, with plain SQL."""
    with eng.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql))]
