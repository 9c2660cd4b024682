"""Databases for the allocation integration tests.

Each test run creates a database of its own on PostgreSQL and on MariaDB
(and an SQLite file) the first time a test needs it, and drops it at the end
of the run. Each test gets the allocation tables created afresh, and an
engine that must have every connection back in its pool when the test ends.

A server that cannot be reached skips its tests, with the reason, except in
CI (``CI=true``), where it fails them: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from sqlalchemy import URL, Engine, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool

from allocation import config, orm

#: Where each server's databases are created; the environment can point elsewhere.
POSTGRESQL_ADMIN_URL = os.environ.get("UOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_ADMIN_URL = os.environ.get("UOW_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")

Rows = Callable[..., list[tuple[Any, ...]]]


def _unreachable(backend: str, admin_url: str, error: DBAPIError) -> NoReturn:
    shown = make_url(admin_url).render_as_string(hide_password=True)
    cause = " ".join(str(error.orig).split())
    reason = f"the {backend} server at {shown} is not reachable ({type(error.orig).__name__}: {cause})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI runs every backend, but {reason}", pytrace=False)
    pytest.skip(reason)


def _server_database(backend: str, admin_url: str) -> Iterator[URL]:
    """Create a database for this run on the server at *admin_url*, yield its URL, then drop it."""
    name = f"alloc_{os.getpid()}_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
    except DBAPIError as error:
        _unreachable(backend, admin_url, error)
    finally:
        admin.dispose()
    try:
        yield make_url(admin_url).set(database=name)
    finally:
        drop = f"DROP DATABASE IF EXISTS {name}" + (" WITH (FORCE)" if backend == "postgresql" else "")
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                connection.execute(text(drop))
        finally:
            admin.dispose()


@pytest.fixture(scope="session")
def sqlite_database_url(tmp_path_factory: pytest.TempPathFactory) -> URL:
    path: Path = tmp_path_factory.mktemp("allocation") / "allocation.sqlite3"
    return make_url(f"sqlite:///{path}")


@pytest.fixture(scope="session")
def postgresql_database_url() -> Iterator[URL]:
    yield from _server_database("postgresql", POSTGRESQL_ADMIN_URL)


@pytest.fixture(scope="session")
def mariadb_database_url() -> Iterator[URL]:
    yield from _server_database("mariadb", MARIADB_ADMIN_URL)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.integration),
        pytest.param("mariadb", marks=pytest.mark.integration),
    ]
)
def database_url(request: pytest.FixtureRequest) -> URL:
    """The URL of this run's database on each backend in turn (a ``URL``, whose repr hides any password).

    A test that needs only some backends parametrizes it indirectly:
    ``@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)``.
    """
    url: URL = request.getfixturevalue(f"{request.param}_database_url")
    return url


def checked_out(engine: Engine) -> int:
    """How many connections of *engine* are checked out of its pool."""
    pool = engine.pool
    assert isinstance(pool, QueuePool), pool
    return pool.checkedout()


def _dispose(engine: Engine) -> int:
    """Dispose *engine* and return how many connections were still checked out."""
    try:
        return checked_out(engine)
    finally:
        engine.dispose()


@pytest.fixture
def engine(database_url: URL) -> Iterator[Engine]:
    """The engine that the code under test uses, on freshly created allocation tables."""
    orm.start_mappers()
    eng = config.make_engine(database_url)
    try:
        orm.metadata.drop_all(eng)
        orm.metadata.create_all(eng)
        yield eng
    finally:
        leaked = checked_out(eng)
        try:
            if not leaked:  # dropping tables under an open transaction could wait forever
                orm.metadata.drop_all(eng)
        finally:
            eng.dispose()
    assert leaked == 0, f"{leaked} connection(s) of the engine under test were still checked out"


@pytest.fixture
def rows(engine: Engine) -> Iterator[Rows]:
    """Run plain SQL through a separate engine and return the rows as tuples."""
    reader = create_engine(engine.url)

    def query(sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with reader.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params)]

    yield query
    leaked = _dispose(reader)
    assert leaked == 0, f"{leaked} connection(s) of the reading engine were still checked out"
