"""Where the allocation service keeps its data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, make_url

__all__ = ["database_url", "default_database_url", "engine_options", "make_engine"]

#: Backends whose connections :func:`make_engine` sets to READ COMMITTED.
_SERVER_BACKENDS = frozenset({"postgresql", "mysql", "mariadb"})


def default_database_url() -> str:
    """An SQLite file in the temporary directory."""
    return f"sqlite:///{Path(tempfile.gettempdir()) / 'allocation.sqlite3'}"


def database_url(explicit: str | None = None) -> str:
    """The database URL: *explicit* if given, else ``$DATABASE_URL``, else :func:`default_database_url`."""
    return explicit or os.environ.get("DATABASE_URL") or default_database_url()


def make_engine(url: str | URL) -> Engine:
    """An engine for *url*.

    On PostgreSQL and MariaDB/MySQL the connections run at READ COMMITTED,
    so that the version counter of a product is what settles two concurrent
    changes to it: the UPDATE of the loser waits for the winner, then matches
    no row and fails with ``StaleDataError``. (At REPEATABLE READ, PostgreSQL,
    and MariaDB with ``innodb_snapshot_isolation``, refuse such an UPDATE
    with a serialization error of their own instead.)
    """
    return create_engine(url, **engine_options(url))


def engine_options(url: str | URL) -> dict[str, Any]:
    """The ``create_engine()`` options of :func:`make_engine`: READ COMMITTED on PostgreSQL and MariaDB/MySQL."""
    if make_url(url).get_backend_name() in _SERVER_BACKENDS:
        return {"isolation_level": "READ COMMITTED"}
    return {}
