"""The ASGI app that the real-server tests run, as ``tests.integration.asgi_apps:app``.

It is configured through the environment, as a deployed app is:
``UOW_TEST_ASGI_DATABASE_URL`` is the async URL of its database (asyncpg on
PostgreSQL, aiosqlite on SQLite). Its lifespan builds the engine, and
disposes of it at shutdown.

One server serves every way of using uow on ASGI, each mounted under a
prefix with the same endpoints:

- ``/mw/mapped`` and ``/mw/plain``: Starlette with ``UnitOfWorkMiddleware``;
- ``/fa/mapped`` and ``/fa/plain``: FastAPI with ``uow.fastapi.depends()``;
- ``/famw/mapped``: FastAPI with ``UnitOfWorkMiddleware``.

The ``mapped`` apps register an ``IntegrityError`` handler that answers 409;
the ``plain`` ones do not. The table's unique constraint on ``ref`` is
checked at COMMIT on PostgreSQL (``DEFERRABLE INITIALLY DEFERRED``); on
SQLite the INSERT runs in the commit's flush. Either way a duplicate ``ref``
fails when uow commits, after the endpoint returned.

The outermost layer records the status of every response the app started,
adds the client's port to it (``x-client-port``: which connection it came
on), and answers ``GET /stats`` with what it recorded, the requests still
running, and the connections checked out of the engine's pool.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations.

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

import attrs
from fastapi import BackgroundTasks, FastAPI, Response
from sqlalchemy import Column, Integer, MetaData, String, Table, UniqueConstraint
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import registry
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

import uow
import uow.fastapi
from tests.support.servers import Recorder
from uow.starlette import UnitOfWorkMiddleware

#: How the app's connections show in pg_stat_activity.
APPLICATION_NAME = "uow-asgi-server"

#: The prefixes the app mounts, and whether an IntegrityError handler maps a failed commit to 409 there.
MOUNTS = {"/mw/mapped": True, "/mw/plain": False, "/fa/mapped": True, "/fa/plain": False, "/famw/mapped": True}


@attrs.define(eq=False, slots=False)
class Entry:
    name: str
    ref: str
    id: int | None = None


metadata = MetaData()
entries = Table(
    "uow_asgi_entries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(80), nullable=False),
    Column("ref", String(80), nullable=False),
    UniqueConstraint("ref", name="uow_asgi_entries_ref", deferrable=True, initially="DEFERRED").ddl_if(
        dialect="postgresql"
    ),
    UniqueConstraint("ref", name="uow_asgi_entries_ref_now").ddl_if(dialect="sqlite"),
)
registry(metadata=metadata).map_imperatively(Entry, entries)


class EntriesUnitOfWork(uow.AsyncUnitOfWork):
    entries = uow.repository(Entry)


class SqlAlchemyEntriesUnitOfWork(uow.AsyncSqlAlchemyUnitOfWork, EntriesUnitOfWork):
    pass


class Boom(Exception):
    """Raised by an endpoint to make the request fail."""


class State:
    """The engine, built by the lifespan."""

    engine: AsyncEngine


def new_uow() -> SqlAlchemyEntriesUnitOfWork:
    return SqlAlchemyEntriesUnitOfWork(State.engine)


@uow.transactional(factory=new_uow)
async def add_later(name: str, uow: EntriesUnitOfWork = uow.NEW_UOW) -> None:
    """A background task: a unit of work of its own, committed when it returns."""
    await uow.entries.add(Entry(name, name))


async def conflict(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse({"message": "ref already taken"}, status_code=409)


async def chunks() -> AsyncIterator[bytes]:
    for chunk in (b"one ", b"two ", b"three"):
        await asyncio.sleep(0.01)
        yield chunk


# -- Starlette, with the middleware: the endpoints reach the request's unit of work through uow.current() --


async def mw_add(request: Request) -> JSONResponse:
    params = request.query_params
    name = params["name"]
    await uow.current(EntriesUnitOfWork).entries.add(Entry(name, params.get("ref", name)))
    if "fail" in params:
        raise Boom(name)
    if "conflict" in params:
        return JSONResponse({"message": "conflict"}, status_code=409)
    later = BackgroundTask(add_later, f"{name}-later") if "later" in params else None
    return JSONResponse({"name": name}, status_code=201, background=later)


async def mw_stream(request: Request) -> StreamingResponse:
    name = request.query_params["name"]
    await uow.current(EntriesUnitOfWork).entries.add(Entry(name, name))
    return StreamingResponse(chunks(), media_type="text/plain")


async def mw_file(request: Request) -> FileResponse:
    name = request.query_params["name"]
    await uow.current(EntriesUnitOfWork).entries.add(Entry(name, name))
    return FileResponse(__file__, media_type="text/plain")


async def mw_slow(request: Request) -> JSONResponse:
    name = request.query_params["name"]
    unit = uow.current(SqlAlchemyEntriesUnitOfWork)
    await unit.entries.add(Entry(name, name))
    await unit.session.flush()  # the connection is checked out, the row written, not committed
    await asyncio.sleep(1.0)  # long after the client's 0.05 s timeout, even when its event loop is busy
    return JSONResponse({"name": name}, status_code=201)


MW_ROUTES = [
    Route("/entries", mw_add, methods=["POST"]),
    Route("/stream", mw_stream, methods=["POST"]),
    Route("/file", mw_file, methods=["GET"]),
    Route("/slow", mw_slow, methods=["POST"]),
]


def starlette_app(mapped: bool) -> Starlette:
    return Starlette(
        routes=MW_ROUTES,
        middleware=[Middleware(UnitOfWorkMiddleware, factory=new_uow, commit="on_success")],
        exception_handlers={IntegrityError: conflict} if mapped else {},
    )


# -- FastAPI, with uow.fastapi.depends(): the endpoints take the request's unit of work --------------------


def make_uow() -> EntriesUnitOfWork:
    return new_uow()


UnitOfWork = Annotated[EntriesUnitOfWork, uow.fastapi.depends(make_uow, commit="on_success")]


def fastapi_app(mapped: bool) -> FastAPI:
    app = FastAPI()
    if mapped:
        app.add_exception_handler(IntegrityError, conflict)

    @app.post("/entries", status_code=201)
    async def add(
        name: str,
        uow: UnitOfWork,
        response: Response,
        tasks: BackgroundTasks,
        ref: str | None = None,
        fail: str | None = None,
        conflict: str | None = None,
        later: str | None = None,
    ) -> Any:
        await uow.entries.add(Entry(name, ref or name))
        if fail is not None:
            raise Boom(name)
        if conflict is not None:
            response.status_code = 409
            return {"message": "conflict"}
        if later is not None:
            tasks.add_task(add_later, f"{name}-later")
        return {"name": name}

    @app.post("/stream")
    async def stream(name: str, uow: UnitOfWork) -> StreamingResponse:
        await uow.entries.add(Entry(name, name))
        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/file")
    async def file(name: str, uow: UnitOfWork) -> FileResponse:
        await uow.entries.add(Entry(name, name))
        return FileResponse(__file__, media_type="text/plain")

    @app.post("/slow", status_code=201)
    async def slow(name: str, uow: UnitOfWork) -> Any:
        await uow.entries.add(Entry(name, name))
        await uow.session.flush()
        await asyncio.sleep(1.0)  # long after the client's 0.05 s timeout, even when its event loop is busy
        return {"name": name}

    return app


def fastapi_middleware_app(mapped: bool) -> FastAPI:
    app = FastAPI(exception_handlers={IntegrityError: conflict} if mapped else {})
    app.add_middleware(UnitOfWorkMiddleware, factory=new_uow, commit="on_success")
    for route in MW_ROUTES:
        app.add_route(route.path, route.endpoint, methods=list(route.methods or ()))
    return app


# -- the server's view: statuses, requests in flight, the pool -------------------------------------------------


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def stats(request: Request) -> JSONResponse:
    prefix = request.query_params.get("prefix", "")
    return JSONResponse(recorder.stats(prefix, State.engine.sync_engine.pool.checkedout()))  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    url = os.environ["UOW_TEST_ASGI_DATABASE_URL"]
    options: dict[str, Any] = {"pool_size": 5, "max_overflow": 5}
    if url.startswith("postgresql"):
        options["connect_args"] = {"server_settings": {"application_name": APPLICATION_NAME}}
    else:  # SQLite: one writer at a time, so a writer waits for the others (a slow request holds the lock)
        options["connect_args"] = {"timeout": 30}
    State.engine = create_async_engine(url, **options)
    try:
        yield
    finally:
        await State.engine.dispose()


def _mounted(prefix: str, mapped: bool) -> ASGIApp:
    if prefix.startswith("/mw/"):
        return starlette_app(mapped)
    if prefix.startswith("/fa/"):
        return fastapi_app(mapped)
    return fastapi_middleware_app(mapped)


root = Starlette(
    routes=[
        Route("/health", health),
        Route("/stats", stats),
        *(Mount(prefix, app=_mounted(prefix, mapped)) for prefix, mapped in MOUNTS.items()),
    ],
    lifespan=lifespan,
)
recorder = Recorder(root)
app = recorder
