"""The Flask app that the real-server tests run under gunicorn, as ``tests.integration.flask_apps:create_app()``.

It is configured through the environment, as a deployed app is:

- ``UOW_TEST_FLASK_DATABASE_URL``: the database, on PostgreSQL;
- ``UOW_TEST_FLASK_EVENTS``: a directory where each process appends the
  pool's ``connect`` and ``close`` events to a file named after its pid.

Its table has a unique constraint checked at COMMIT (``DEFERRABLE INITIALLY
DEFERRED``): a duplicate ``ref`` is accepted by the INSERT and refused by
the COMMIT itself, which the extension makes after the view returned.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
from flask import Blueprint, Flask, abort, request, stream_with_context
from sqlalchemy import Engine, MetaData, event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import registry

import uow
from tests.support.servers import entries_table
from uow.flask import UnitOfWorkExtension

#: How the app's connections show in pg_stat_activity.
APPLICATION_NAME = "uow-flask-gunicorn"


@attrs.define(eq=False, slots=False)
class Entry:
    name: str
    ref: str
    id: int | None = None


metadata = MetaData()
entries = entries_table("uow_flask_entries", metadata)
registry(metadata=metadata).map_imperatively(Entry, entries)


class EntriesUnitOfWork(uow.SqlAlchemyUnitOfWork):
    entries = uow.repository(Entry)


class Boom(Exception):
    """Raised by a view to make it fail."""


ext: UnitOfWorkExtension[EntriesUnitOfWork] = UnitOfWorkExtension(factory=EntriesUnitOfWork, commit="on_success")

#: Routes whose failed commits an error handler maps to 409.
mapped = Blueprint("mapped", __name__, url_prefix="/mapped")


@mapped.errorhandler(IntegrityError)
def conflict(error: IntegrityError) -> tuple[dict[str, str], int]:
    return {"message": "ref already taken"}, 409


def add_entry(name: str) -> tuple[str, int]:
    ext.uow.entries.add(Entry(name, request.args.get("ref", name)))
    return name, 201


@mapped.post("/entries/<name>")
def add_mapped(name: str) -> tuple[str, int]:
    return add_entry(name)


def create_app() -> Flask:
    """The app, its engine built by the extension from the configuration, checked at startup."""
    app = Flask(__name__)
    app.config["UOW_DATABASE_URL"] = os.environ["UOW_TEST_FLASK_DATABASE_URL"]
    app.config["UOW_ENGINE_OPTIONS"] = {
        "pool_size": 4,  # one connection per thread of a worker
        "max_overflow": 0,
        "connect_args": {"application_name": APPLICATION_NAME},
    }
    ext.init_app(app)
    app.register_blueprint(mapped)
    with app.app_context():
        record_pool_events(ext.engine, Path(os.environ["UOW_TEST_FLASK_EVENTS"]))
        # Apps check their database at startup: under a preloading server, the master keeps this connection.
        with ext.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/port")
    def port() -> str:
        """The client's port: the same on two requests means one kept-alive connection."""
        return str(request.environ["REMOTE_PORT"])

    @app.get("/stats")
    def stats() -> dict[str, int]:
        return {"pid": os.getpid(), "checked_out": ext.engine.pool.checkedout()}

    @app.post("/entries/<name>")
    def add(name: str) -> tuple[str, int]:
        return add_entry(name)

    @app.post("/entries/<name>/fail")
    def fail(name: str) -> str:
        add_entry(name)
        raise Boom(name)

    @app.post("/entries/<name>/refuse")
    def refuse(name: str) -> str:
        add_entry(name)
        abort(422)

    @app.post("/entries/<name>/slow")
    def slow(name: str) -> tuple[str, int]:
        time.sleep(0.3)  # the client has gone by now
        return add_entry(name)

    @app.post("/entries/<name>/stream")
    def stream(name: str) -> object:
        add_entry(name)
        count = ext.uow.entries.count()  # read in the view: the body streams after the request ended

        def body() -> Iterator[str]:
            yield f"{name}\n"
            yield f"{count}\n"

        return stream_with_context(body())

    @app.post("/entries/<name>/slow-stream")
    def slow_stream(name: str) -> object:
        add_entry(name)

        def body() -> Iterator[str]:
            for number in range(10):
                yield f"{number:0100}\n"
                time.sleep(0.05)

        return body()

    @app.get("/misuse-stream")
    def misuse_stream() -> object:
        def body() -> Iterator[str]:
            yield "start\n"
            yield f"{ext.uow.entries.count()}\n"  # too late: the request's unit of work has ended

        return stream_with_context(body())

    return app


def record_pool_events(engine: Engine, directory: Path) -> None:
    """Append each connection the pool opens and closes, in this process, to a file named after the pid."""

    def write(line: str) -> None:
        with (directory / f"{os.getpid()}.events").open("a") as file:
            file.write(f"{line}\n")

    event.listen(engine, "connect", lambda *args: write("connect"))
    event.listen(engine, "close", lambda *args: write("close"))
    event.listen(engine, "close_detached", lambda *args: write("close"))
