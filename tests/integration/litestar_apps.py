"""The Litestar app that the real-server tests run: ``uvicorn --factory tests.integration.litestar_apps:create_app``.

It is configured through the environment, as a deployed app is:
``UOW_TEST_LITESTAR_DATABASE_URL`` is the async URL of its PostgreSQL
database (asyncpg). Its startup hook builds the engine, and its shutdown hook
disposes of it.

The app has :class:`uow.litestar.UnitOfWorkPlugin` with
``commit="on_success"``, and the same handlers under two routers:

- ``/mapped``, whose ``IntegrityError`` handler answers 409;
- ``/plain``, which has none: Litestar answers a failed commit with a 500.

The table's unique constraint on ``ref`` is checked at COMMIT
(``DEFERRABLE INITIALLY DEFERRED``): a duplicate ``ref`` fails when uow
commits, after the handler returned. The app compresses with gzip: a client
that accepts it gets a ``Stream`` whose start Litestar's compression holds
back until the stream's own task sends its first part.

The outermost layer records the status of every response the app started,
adds the client's port to it (``x-client-port``: which connection it came
on), and ``GET /stats`` answers with what it recorded, the requests still
running, and the connections checked out of the engine's pool.
"""

# No `from __future__ import annotations` here: Litestar reads the handlers' annotations.

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import attrs
from litestar import Litestar, Request, Response, Router, get, post
from litestar.background_tasks import BackgroundTask
from litestar.config.compression import CompressionConfig
from litestar.di import NamedDependency
from litestar.response import File, Stream
from litestar.types import ASGIApp
from sqlalchemy import MetaData
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import registry

import uow
from tests.support.servers import Recorder, entries_table
from uow.litestar import UnitOfWorkPlugin

#: How the app's connections show in pg_stat_activity.
APPLICATION_NAME = "uow-litestar-server"

#: The routers, and whether an IntegrityError handler maps a failed commit to 409 there.
MOUNTS = {"/mapped": True, "/plain": False}


@attrs.define(eq=False, slots=False)
class Entry:
    name: str
    ref: str
    id: int | None = None


metadata = MetaData()
entries = entries_table("uow_litestar_entries", metadata)
registry(metadata=metadata).map_imperatively(Entry, entries)


class EntriesUnitOfWork(uow.AsyncUnitOfWork):
    entries = uow.repository(Entry)


class SqlAlchemyEntriesUnitOfWork(uow.AsyncSqlAlchemyUnitOfWork, EntriesUnitOfWork):
    pass


#: What a handler declares to be given the request's unit of work.
UnitOfWork = NamedDependency[EntriesUnitOfWork]


class Boom(Exception):
    """Raised by a handler to make the request fail."""


class State:
    """The engine, built at startup, and the outermost layer of the app."""

    engine: AsyncEngine
    recorder: "Recorder"


def new_uow() -> SqlAlchemyEntriesUnitOfWork:
    return SqlAlchemyEntriesUnitOfWork(State.engine)


@uow.transactional(factory=new_uow)
async def add_later(name: str, uow: EntriesUnitOfWork = uow.NEW_UOW) -> None:
    """A background task: a unit of work of its own, committed when it returns."""
    await uow.entries.add(Entry(name, name))


def conflict(request: Request[Any, Any, Any], error: IntegrityError) -> Response[dict[str, str]]:
    return Response({"message": "ref already taken"}, status_code=409)


async def chunks() -> AsyncIterator[bytes]:
    for chunk in (b"one ", b"two ", b"three"):
        await asyncio.sleep(0.01)
        yield chunk


# -- the handlers: the same under each router ---------------------------------------------------------


@post("/entries")
async def add(request: Request[Any, Any, Any], uow: UnitOfWork) -> Response[dict[str, str]]:
    params = request.query_params
    name = params["name"]
    await uow.entries.add(Entry(name, params.get("ref", name)))
    if "fail" in params:
        raise Boom(name)
    if "conflict" in params:
        return Response({"message": "conflict"}, status_code=409)
    later = BackgroundTask(add_later, f"{name}-later") if "later" in params else None
    return Response({"name": name}, status_code=201, background=later)


@post("/stream")
async def stream(request: Request[Any, Any, Any]) -> Stream:
    name = request.query_params["name"]
    await uow.current(EntriesUnitOfWork).entries.add(Entry(name, name))  # the request's, current here
    return Stream(chunks(), media_type="text/plain")


@get("/file")
async def file(request: Request[Any, Any, Any], uow: UnitOfWork) -> File:
    name = request.query_params["name"]
    await uow.entries.add(Entry(name, name))
    return File(path=__file__, filename="litestar_apps.py", content_disposition_type="inline")


@post("/slow")
async def slow(request: Request[Any, Any, Any], uow: UnitOfWork) -> Response[dict[str, str]]:
    name = request.query_params["name"]
    await uow.entries.add(Entry(name, name))
    await uow.session.flush()  # type: ignore[attr-defined]  # the connection is checked out, the row written
    await asyncio.sleep(1.0)  # long after the client's 0.05 s timeout, even when its event loop is busy
    return Response({"name": name}, status_code=201)


HANDLERS = [add, stream, file, slow]


# -- the server's view: statuses, requests in flight, the pool -------------------------------------------------


@get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@get("/stats")
async def stats(request: Request[Any, Any, Any]) -> dict[str, Any]:
    prefix = request.query_params.get("prefix", "")
    return State.recorder.stats(prefix, State.engine.sync_engine.pool.checkedout())  # type: ignore[attr-defined]


async def start() -> None:
    State.engine = create_async_engine(
        os.environ["UOW_TEST_LITESTAR_DATABASE_URL"],
        pool_size=5,
        max_overflow=5,
        connect_args={"server_settings": {"application_name": APPLICATION_NAME}},
    )


async def stop() -> None:
    await State.engine.dispose()


def create_app() -> ASGIApp:
    """The app, built when the server starts (importing this module builds none, nor configures logging)."""
    routers = [
        Router(prefix, route_handlers=HANDLERS, exception_handlers={IntegrityError: conflict} if mapped else {})
        for prefix, mapped in MOUNTS.items()
    ]
    litestar_app = Litestar(
        route_handlers=[health, stats, *routers],
        plugins=[UnitOfWorkPlugin(new_uow, commit="on_success")],
        compression_config=CompressionConfig(backend="gzip"),
        on_startup=[start],
        on_shutdown=[stop],
    )
    State.recorder = Recorder(litestar_app)
    return State.recorder
