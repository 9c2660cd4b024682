"""Databases for the allocation integration tests.

Each test run creates a database of its own on PostgreSQL and on MariaDB
(and an SQLite file) the first time a test needs it, and drops it at the end
of the run. Each test gets the allocation tables created afresh, and an
engine that must have every connection back in its pool when the test ends.

A server that cannot be reached skips its tests, with the reason, except in
CI (``CI=true``), where it fails them: CI must never pass by skipping.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import URL, Connection, Engine, create_engine, event, text
from sqlalchemy.pool import QueuePool

from allocation import config, orm
from tests.support.databases import Provisioner

Rows = Callable[..., list[tuple[Any, ...]]]

#: Which batch each order line is allocated to, read with plain SQL.
ALLOCATIONS = (
    "SELECT b.reference, o.orderid, o.qty FROM allocations a "
    "JOIN batches b ON b.id = a.batch_id JOIN order_lines o ON o.id = a.orderline_id "
    "ORDER BY b.reference, o.orderid"
)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def database_url(request: pytest.FixtureRequest, provisioner: Provisioner) -> URL:
    """The URL of this run's database on each backend in turn (a ``URL``, whose repr hides any password).

    A test that needs only some backends parametrizes it indirectly:
    ``@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)``.
    """
    return provisioner.database(request.param).url


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


class _Recorder(logging.Handler):
    def __init__(self, entries: list[str]) -> None:
        super().__init__(logging.INFO)
        self.entries = entries

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(record.getMessage())


@contextlib.contextmanager
def timeline_of(engine: Engine) -> Iterator[list[str]]:
    """What happens, in order: "COMMIT" for each commit on *engine*, and what the allocation logger logs."""
    entries: list[str] = []

    def commit(connection: Connection) -> None:
        entries.append("COMMIT")

    logger = logging.getLogger("allocation")
    recorder, level = _Recorder(entries), logger.level
    event.listen(engine, "commit", commit)
    logger.addHandler(recorder)
    logger.setLevel(logging.INFO)
    try:
        yield entries
    finally:
        logger.setLevel(level)
        logger.removeHandler(recorder)
        event.remove(engine, "commit", commit)
