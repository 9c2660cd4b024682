"""Real database servers for the integration tests: one database per test run.

Each run creates its own database on PostgreSQL and MariaDB (and its own
SQLite file) and drops it at the end, so runs never collide and leave nothing
behind. Where a server cannot be reached, the tests that need it skip with the
reason on a developer machine and fail in CI (``CI=true``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from sqlalchemy import URL, Engine, create_engine, make_url, text

import uow
from uow import errors

from .models import metadata

IN_CI = os.environ.get("CI", "").lower() == "true"

POSTGRES_ADMIN_URL = os.environ.get("UOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_ADMIN_URL = os.environ.get("UOW_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")

ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "mysql": "mysql+aiomysql", "sqlite": "sqlite+aiosqlite"}


@attrs.frozen
class Database:
    """A database created for this test run."""

    backend: str
    url: URL

    @property
    def async_url(self) -> URL:
        return self.url.set(drivername=ASYNC_DRIVERS[self.url.get_backend_name()])

    def engine(self, **kwargs: object) -> Engine:
        return create_engine(self.url, **kwargs)  # type: ignore[arg-type]


def unreachable(backend: str, url: str, error: BaseException) -> None:
    """Skip on a developer machine, fail in CI: a missing server is never a silent skip there."""
    shown = make_url(url).render_as_string(hide_password=True)
    reason = f"{backend} is not reachable at {shown} ({type(error).__name__}: {error}); start it or set the URL"
    if IN_CI:
        pytest.fail(f"CI needs every database server: {reason}", pytrace=False)
    pytest.skip(reason)


def run_name() -> str:
    return f"uow_test_{os.getpid()}_{secrets.token_hex(4)}"


def provision(backend: str, tmp_dir: Path) -> Iterator[Database]:
    """Create a database for this run on *backend*, yield it, drop it."""
    name = run_name()
    if backend == "sqlite":
        yield Database("sqlite", make_url(f"sqlite:///{tmp_dir / (name + '.sqlite3')}"))
        return
    admin_url = POSTGRES_ADMIN_URL if backend == "postgresql" else MARIADB_ADMIN_URL
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        try:
            with admin.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name}"))
        except Exception as error:
            unreachable(backend, admin_url, error)
        try:
            yield Database(backend, make_url(admin_url).set(database=name))
        finally:
            with admin.connect() as conn:
                drop = f"DROP DATABASE {name} WITH (FORCE)" if backend == "postgresql" else f"DROP DATABASE {name}"
                conn.execute(text(drop))
    finally:
        admin.dispose()


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


def check_nothing_left(request: pytest.FixtureRequest) -> None:
    """After a test: no unit of work is current, and every engine the test made has all its connections back."""
    with pytest.raises(errors.InactiveUnitOfWorkError):
        uow.current()
    if "provisioner" in request.fixturenames:
        prov: Provisioner = request.getfixturevalue("provisioner")
        leaked = {str(eng.url): eng.pool.checkedout() for eng in prov.engines if eng.pool.checkedout()}
        assert {} == leaked
