"""The Litestar plugin on real databases: in process, and on uvicorn with concurrent clients.

Most in-process tests send their requests with httpx's ASGI client, which
runs the application in the test's task and event loop, where the test's
async engine lives; Litestar's test clients run it in an event loop of their
own, in another thread, which is how the lifespan test uses them.

The last tests start uvicorn on 127.0.0.1 and a free port, running
``tests.integration.litestar_apps`` over the run's PostgreSQL database, and
drive it with concurrent httpx clients: commits, commits that PostgreSQL
refuses at COMMIT, handlers that raise or answer 409, streams (compressed
and not), files, background tasks, and clients that leave early. What they
check in the database, they read with raw SQL on a connection of their own.
"""

# No `from __future__ import annotations` here: Litestar reads the handlers' annotations.

import asyncio
import collections
import contextlib
import contextvars
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from litestar import Litestar, Request, Response, WebSocket, asgi, get, post, websocket
from litestar.background_tasks import BackgroundTask
from litestar.config.compression import CompressionConfig
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException
from litestar.response import File, Stream
from litestar.testing import AsyncTestClient
from litestar.types import Message, Receive, Scope, Send
from sqlalchemy import Column, Engine, ForeignKey, Integer, MetaData, Table, event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import uow
from tests.integration import litestar_apps
from tests.integration.conftest import rows
from tests.support.databases import Database, Provisioner
from tests.support.models import Item, Note, skus
from tests.support.servers import (
    GONE,
    Answer,
    AsgiServer,
    app_connections,
    asgi_server,
    mixed_requests,
    run_clients,
    server_env,
    stored_names,
    successes,
)
from tests.support.uows import (
    AsyncAuditUnitOfWork,
    AsyncFakeAuditUnitOfWork,
    AsyncFakeShopUnitOfWork,
    AsyncShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
)
from uow import NEW_UOW, errors, transactional
from uow.litestar import CommitPolicy, UnitOfWorkPlugin

#: The backends every test here runs on.
ON_DATABASES = pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)

#: How long a test waits for the application to reach a point: a hang guard, never asserted.
TIMEOUT = 60.0

#: What a handler declares to be given the request's unit of work.
ShopUnitOfWork = NamedDependency[AsyncShopUnitOfWork]


class Boom(Exception):
    """Raised by a handler to make the request fail."""


# -- a table whose foreign key is checked at COMMIT: a commit that really fails --

refs_metadata = MetaData()
refs = Table(
    "uow_litestar_refs",
    refs_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sku", ForeignKey(skus.c.code, deferrable=True, initially="DEFERRED"), nullable=False),
)


@pytest.fixture(name="async_engine")
async def _async_engine(database: Database, engine: Engine, provisioner: Provisioner) -> AsyncIterator[AsyncEngine]:
    """An async engine on the run's database, the tables emptied, and a table of references checked at COMMIT."""
    refs_metadata.create_all(engine)
    eng = create_async_engine(database.async_url)
    if eng.dialect.name == "sqlite":

        @event.listens_for(eng.sync_engine, "connect")
        def foreign_keys_on(dbapi_connection: Any, record: object) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    provisioner.track(eng.sync_engine)
    try:
        yield eng
    finally:
        await eng.dispose()
        refs_metadata.drop_all(engine)


# -- helpers --------------------------------------------------------------------


def checked_out(eng: AsyncEngine) -> int:
    """How many connections of *eng* are out of its pool."""
    return eng.sync_engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]


def item_names(eng: Engine) -> list[str]:
    """The names of the committed items, sorted, read through a separate connection."""
    return [str(name) for (name,) in rows(eng, "SELECT name FROM uow_items ORDER BY name")]


def client(app: Litestar) -> httpx.AsyncClient:
    """An HTTP client that calls *app* in this task; an error that reaches the server becomes a 500 response."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://shop")


def current_or_none() -> object:
    """The unit of work active in this task, or None."""
    try:
        return uow.current()
    except errors.InactiveUnitOfWorkError:
        return None


@transactional
async def add_note(text: str, uow: AsyncShopUnitOfWork = NEW_UOW) -> AsyncShopUnitOfWork:
    """A service that needs an active unit of work: it has no factory."""
    await uow.notes.add(Note(text=text))
    return uow


def conflict(request: Request, error: Exception) -> Response[dict[str, str]]:
    """The application's handler of IntegrityError."""
    return Response({"message": "conflict"}, status_code=409)


# -- the application under test --------------------------------------------------


class Shop:
    """A Litestar application over *eng*, with the plugin, and what its code saw."""

    def __init__(
        self, eng: AsyncEngine, commit: CommitPolicy, *, mapped: bool = False, compressed: bool = False
    ) -> None:
        self.engine = eng
        #: The request's unit of work, as each request's handler was given it.
        self.units: list[AsyncShopUnitOfWork] = []
        #: For each background task: its unit of work, and what uow.current() returned in it.
        self.background: list[tuple[AsyncShopUnitOfWork, object]] = []
        #: What happened, in order: each COMMIT the engine sent, each response start as the server saw it.
        self.events: list[str] = []
        #: The task of each request's handler, and the task that started each response.
        self.handler_tasks: list[object] = []
        self.start_tasks: list[object] = []
        #: The exceptions that the application's after_exception hook saw.
        self.exceptions: list[BaseException] = []
        #: Set when a request that waits forever has used its unit of work.
        self.waiting = asyncio.Event()
        self.factory_calls = 0
        self.add_later = transactional(factory=self.new_uow)(self._add_later)

        @event.listens_for(eng.sync_engine, "commit")
        def committing(conn: object) -> None:
            self.events.append("COMMIT")

        self.app = Litestar(
            route_handlers=self.handlers(),
            plugins=[UnitOfWorkPlugin(self.make_uow, commit=commit)],
            exception_handlers={IntegrityError: conflict} if mapped else {},
            compression_config=CompressionConfig(backend="gzip", minimum_size=1) if compressed else None,
            before_send=[self.record_start],
            after_exception=[self.record_exception],
            dependencies={"service": Provide(self.service)},
            logging_config=None,  # Litestar's would replace the root logger's handlers, pytest's among them
        )

    def new_uow(self) -> AsyncSqlAlchemyShopUnitOfWork:
        return AsyncSqlAlchemyShopUnitOfWork(self.engine)

    def make_uow(self) -> AsyncSqlAlchemyShopUnitOfWork:
        self.factory_calls += 1
        return self.new_uow()

    async def _add_later(self, name: str, uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        self.background.append((uow, current_or_none()))
        await uow.items.add(Item(name))

    async def record_start(self, message: Message, scope: Scope) -> None:
        if message["type"] == "http.response.start":
            self.events.append(f"response {message['status']}")
            self.start_tasks.append(asyncio.current_task())

    async def record_exception(self, error: BaseException, scope: Scope) -> None:
        self.exceptions.append(error)

    async def service(self, uow: ShopUnitOfWork) -> AsyncShopUnitOfWork:
        """A dependency of the application's that takes the request's unit of work in turn."""
        return uow

    async def use(self, request: Request[Any, Any, Any], unit: AsyncShopUnitOfWork) -> dict[str, Any]:
        """Do what the query parameters say with the request's unit of work."""
        params = request.query_params
        self.units.append(unit)
        self.handler_tasks.append(asyncio.current_task())
        await unit.items.add(Item(params["name"]))
        joined = await add_note(params["name"])
        if "dangling" in params:
            await unit.session.execute(refs.insert().values(sku="missing"))
        if "commit" in params:
            await unit.commit()
        if "raise" in params:
            raise Boom(params["name"])
        if "http_error" in params:
            raise HTTPException(status_code=409, detail="taken")
        if "rollback_only" in params:
            unit.set_rollback_only()
        return {"joined": joined is unit, "current": uow.current() is unit, "active": unit.active}

    def handlers(self) -> list[Any]:
        shop = self

        @post("/items")
        async def add_item(request: Request[Any, Any, Any], uow: ShopUnitOfWork) -> Response[dict[str, Any]]:
            body = await shop.use(request, uow)
            later = request.query_params.get("later")
            status = int(request.query_params.get("status", "201"))
            return Response(
                body, status_code=status, background=BackgroundTask(shop.add_later, later) if later else None
            )

        @post("/current")
        async def add_current(request: Request[Any, Any, Any]) -> dict[str, Any]:
            return await shop.use(request, uow.current(AsyncShopUnitOfWork))

        @post("/service")
        async def through_service(uow: ShopUnitOfWork, service: NamedDependency[AsyncShopUnitOfWork]) -> bool:
            return service is uow

        @post("/wait")
        async def wait(uow: ShopUnitOfWork) -> None:
            shop.units.append(uow)
            await uow.items.add(Item("waiting"))
            await uow.session.flush()  # the connection is checked out, the row written but not committed
            shop.waiting.set()
            await asyncio.Event().wait()

        @post("/stream")
        async def stream(request: Request[Any, Any, Any], uow: ShopUnitOfWork) -> Stream:
            await shop.use(request, uow)

            async def chunks() -> AsyncIterator[bytes]:
                yield b"one "
                yield b"two"

            later = request.query_params.get("later")
            return Stream(chunks(), background=BackgroundTask(shop.add_later, later) if later else None)

        @get("/file")
        async def file(request: Request[Any, Any, Any], uow: ShopUnitOfWork) -> File:
            await shop.use(request, uow)
            return File(path=__file__, filename="test_litestar.py")

        @websocket("/ws")
        async def socket(socket: WebSocket[Any, Any, Any]) -> None:
            await socket.accept()
            await socket.send_text(repr(current_or_none()))
            await socket.close()

        @asgi("/handed", copy_scope=True)
        async def handed(scope: Scope, receive: Receive, send: Send) -> None:
            """Adds an item, then has a task that does not copy the request's context send the response."""
            await uow.current(AsyncShopUnitOfWork).items.add(Item("handed over"))

            async def respond() -> None:
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"sent", "more_body": False})

            await contextvars.Context().run(asyncio.ensure_future, respond())

        return [add_item, add_current, through_service, wait, stream, file, socket, handed]


# -- the request's unit of work ----------------------------------------------------


@ON_DATABASES
async def test_each_request_gets_a_unit_of_work_of_its_own_given_and_current(async_engine: AsyncEngine) -> None:
    """The handler is given the request's unit of work, which is current; a @transactional service joins it."""
    shop = Shop(async_engine, "explicit")

    async with client(shop.app) as http:
        first = await http.post("/items", params={"name": "first"})
        second = await http.post("/current", params={"name": "second"})
        service = await http.post("/service")

    assert (201, {"joined": True, "current": True, "active": True}) == (first.status_code, first.json())
    assert (201, {"joined": True, "current": True, "active": True}) == (second.status_code, second.json())
    assert (201, True) == (service.status_code, service.json())
    assert 2 == len({id(unit) for unit in shop.units})
    assert [False, False] == [unit.active for unit in shop.units]
    assert 3 == shop.factory_calls


@ON_DATABASES
async def test_explicit_policy_keeps_what_the_handler_committed_and_rolls_back_the_rest(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """commit="explicit": a handler that commits keeps its rows; one that does not leaves none, even with a 201."""
    shop = Shop(async_engine, "explicit")

    async with client(shop.app) as http:
        committed = await http.post("/items", params={"name": "committed", "commit": ""})
        forgotten = await http.post("/items", params={"name": "forgotten"})

    assert (201, 201) == (committed.status_code, forgotten.status_code)
    assert ["committed"] == item_names(engine)
    assert [("committed",)] == rows(engine, "SELECT text FROM uow_notes")
    assert (0, True) == (shop.units[1].commits, shop.units[1].rolled_back)


@ON_DATABASES
@pytest.mark.parametrize(
    ("status", "kept"), [(200, True), (201, True), (303, True), (400, False), (404, False), (500, False)]
)
async def test_on_success_policy_commits_below_400_and_rolls_back_an_error_status(
    async_engine: AsyncEngine, engine: Engine, status: int, kept: bool
) -> None:
    """commit="on_success": a response returned with a status below 400 commits; from 400 on, it rolls back."""
    shop = Shop(async_engine, "on_success")

    async with client(shop.app) as http:
        response = await http.post("/items", params={"name": "lamp", "status": str(status)})

    assert status == response.status_code
    assert (["lamp"] if kept else []) == item_names(engine)
    assert (kept, not kept) == (shop.units[0].committed, shop.units[0].rolled_back)


@ON_DATABASES
@pytest.mark.parametrize("commit", ["explicit", "on_success"])
@pytest.mark.parametrize(("raising", "status"), [("raise", 500), ("http_error", 409)])
async def test_a_handler_that_raises_commits_nothing(
    async_engine: AsyncEngine, engine: Engine, commit: CommitPolicy, raising: str, status: int
) -> None:
    """An exception from the handler, answered by Litestar with a 500 or its HTTPException's 409, rolls back."""
    shop = Shop(async_engine, commit)

    async with client(shop.app) as http:
        response = await http.post("/items", params={"name": "lamp", raising: ""})

    assert status == response.status_code
    assert [] == item_names(engine)
    assert [] == rows(engine, "SELECT text FROM uow_notes")
    assert (False, True) == (shop.units[0].active, shop.units[0].rolled_back)


@ON_DATABASES
async def test_set_rollback_only_rolls_back_quietly_under_on_success(async_engine: AsyncEngine, engine: Engine) -> None:
    """A handler that calls set_rollback_only() gets its 201, and nothing is committed."""
    shop = Shop(async_engine, "on_success")

    async with client(shop.app) as http:
        response = await http.post("/items", params={"name": "lamp", "rollback_only": ""})

    assert 201 == response.status_code
    assert [] == item_names(engine)


@ON_DATABASES
async def test_the_commit_happens_before_the_response_starts(async_engine: AsyncEngine, engine: Engine) -> None:
    """The server sees the COMMIT before the http.response.start message."""
    shop = Shop(async_engine, "on_success")

    async with client(shop.app) as http:
        response = await http.post("/items", params={"name": "lamp"})

    assert 201 == response.status_code
    assert ["COMMIT", "response 201"] == shop.events
    assert ["lamp"] == item_names(engine)


# -- a commit that fails -------------------------------------------------------------


@ON_DATABASES
@pytest.mark.parametrize(("mapped", "status"), [(True, 409), (False, 500)])
async def test_a_commit_that_fails_is_answered_by_the_application_and_commits_nothing(
    async_engine: AsyncEngine, engine: Engine, caplog: pytest.LogCaptureFixture, mapped: bool, status: int
) -> None:
    """A COMMIT that the database refuses: the IntegrityError handler's 409, or a logged 500; never a 2xx."""
    shop = Shop(async_engine, "on_success", mapped=mapped)

    with caplog.at_level(logging.ERROR, logger="uow"):
        async with client(shop.app) as http:
            response = await http.post("/items", params={"name": "lamp", "dangling": "", "later": "later"})

    assert status == response.status_code
    assert [f"response {status}"] == [event for event in shop.events if event.startswith("response")]
    assert [] == item_names(engine)
    assert [] == rows(engine, "SELECT sku FROM uow_litestar_refs")
    assert [] == shop.background  # the response's background task did not run
    assert [IntegrityError] == [type(error) for error in shop.exceptions]
    assert (0, True) == (shop.units[0].commits, shop.units[0].rolled_back)
    assert 0 == checked_out(async_engine)
    logged = [record for record in caplog.records if "failed to commit" in record.getMessage()]
    assert ([] if mapped else [IntegrityError]) == [type(record.exc_info[1]) for record in logged if record.exc_info]


@ON_DATABASES
async def test_a_commit_the_handler_makes_itself_fails_in_the_handler(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """commit="explicit" and `await uow.commit()` in the handler: its failure is the handler's, answered 409."""
    shop = Shop(async_engine, "explicit", mapped=True)

    async with client(shop.app) as http:
        response = await http.post("/items", params={"name": "lamp", "dangling": "", "commit": ""})

    assert 409 == response.status_code
    assert [] == item_names(engine)
    assert 0 == checked_out(async_engine)


# -- streams and files ---------------------------------------------------------------


@ON_DATABASES
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
async def test_a_stream_commits_before_it_starts(async_engine: AsyncEngine, engine: Engine, compressed: bool) -> None:
    """A Stream commits before its start; compressed, its start comes from the stream's task, and still does."""
    shop = Shop(async_engine, "on_success", compressed=compressed)

    async with client(shop.app) as http:
        response = await http.post("/stream", params={"name": "streamed"}, headers={"accept-encoding": "gzip"})

    assert (201, "one two") == (response.status_code, response.text)
    assert ("gzip" if compressed else None) == response.headers.get("content-encoding")
    assert ["COMMIT", "response 201"] == shop.events
    assert compressed == (shop.start_tasks != shop.handler_tasks)  # compressed, the stream's task starts it
    assert ["streamed"] == item_names(engine)
    assert (1, False) == (shop.units[0].commits, shop.units[0].active)


@ON_DATABASES
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
async def test_a_stream_whose_commit_fails_is_answered_409_and_runs_no_background_task(
    async_engine: AsyncEngine, engine: Engine, compressed: bool
) -> None:
    """A Stream whose COMMIT fails never starts: the IntegrityError handler answers, no background task runs."""
    shop = Shop(async_engine, "on_success", mapped=True, compressed=compressed)

    async with client(shop.app) as http:
        response = await http.post("/stream", params={"name": "streamed", "dangling": "", "later": "later"})

    assert (409, {"message": "conflict"}) == (response.status_code, response.json())
    assert [] == item_names(engine)
    assert [] == shop.background
    assert 0 == checked_out(async_engine)


@ON_DATABASES
async def test_a_file_commits_before_it_starts(async_engine: AsyncEngine, engine: Engine) -> None:
    """A File response commits before its start, and its body is whole."""
    shop = Shop(async_engine, "on_success")

    async with client(shop.app) as http:
        response = await http.get("/file", params={"name": "filed"})

    assert (200, True) == (response.status_code, '"""The Litestar plugin' in response.text)
    assert ["COMMIT", "response 200"] == shop.events
    assert ["filed"] == item_names(engine)


@ON_DATABASES
async def test_a_response_sent_by_a_task_the_request_did_not_start_is_refused_under_on_success(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """A task outside the request starts the response: on_success cannot commit first, refuses it, commits nothing."""
    shop = Shop(async_engine, "on_success")
    transport = httpx.ASGITransport(app=shop.app)  # raises the application's errors

    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - Litestar's wrapper; the cause is checked below
            await http.post("/handed")

    causes = []
    error: BaseException | None = raised.value
    while error is not None:
        causes.append(type(error))
        error = error.__cause__
    assert errors.OwnershipError in causes
    assert [] == item_names(engine)
    assert 0 == checked_out(async_engine)


@ON_DATABASES
async def test_a_response_sent_by_a_task_the_request_did_not_start_goes_through_under_explicit(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """Under explicit, nothing is to commit: the response goes on, and what was not committed is rolled back."""
    shop = Shop(async_engine, "explicit")

    async with client(shop.app) as http:
        response = await http.post("/handed")

    assert (200, "sent") == (response.status_code, response.text)
    assert [] == item_names(engine)
    assert 0 == checked_out(async_engine)


# -- background tasks, lifespan, websockets -------------------------------------------


@ON_DATABASES
@pytest.mark.parametrize("path", ["/items", "/stream"])
async def test_a_background_task_gets_a_unit_of_work_of_its_own_that_commits_on_its_own(
    async_engine: AsyncEngine, engine: Engine, path: str
) -> None:
    """A @transactional background task builds its own unit of work, not the request's, and commits it."""
    shop = Shop(async_engine, "explicit")

    async with client(shop.app) as http:
        response = await http.post(path, params={"name": "uncommitted", "later": "later"})

    assert 201 == response.status_code
    [(background_unit, current_in_background)] = shop.background
    assert background_unit is not shop.units[0]
    assert current_in_background is background_unit
    assert (1, False) == (background_unit.commits, background_unit.active)
    assert ["later"] == item_names(engine)  # the request's uncommitted item is gone, the background's stays


@ON_DATABASES
async def test_startup_hooks_get_units_of_work_of_their_own_on_litestars_test_client(
    database: Database, engine: Engine, provisioner: Provisioner
) -> None:
    """With AsyncTestClient (the app in its own event loop), a startup hook's @transactional code commits its own."""
    state: dict[str, AsyncEngine] = {}
    startup_units: list[tuple[AsyncShopUnitOfWork, object]] = []

    def new_uow() -> AsyncSqlAlchemyShopUnitOfWork:
        return AsyncSqlAlchemyShopUnitOfWork(state["engine"])

    @transactional(factory=new_uow)
    async def add(name: str, uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        startup_units.append((uow, current_or_none()))
        await uow.items.add(Item(name))

    async def start() -> None:
        state["engine"] = create_async_engine(database.async_url)
        provisioner.track(state["engine"].sync_engine)
        await add("at startup")

    async def stop() -> None:
        await state["engine"].dispose()

    @post("/items")
    async def add_item(request: Request[Any, Any, Any], uow: ShopUnitOfWork) -> None:
        await uow.items.add(Item(request.query_params["name"]))

    app = Litestar(
        [add_item],
        plugins=[UnitOfWorkPlugin(new_uow, commit="on_success")],
        on_startup=[start],
        on_shutdown=[stop],
        logging_config=None,
    )
    async with AsyncTestClient(app) as http:
        response = await http.post("/items", params={"name": "request"})
        left_out = checked_out(state["engine"])

    assert (201, 0) == (response.status_code, left_out)
    [(unit, current)] = startup_units
    assert (True, 1) == (current is unit, unit.commits)
    assert ["at startup", "request"] == item_names(engine)


@ON_DATABASES
async def test_a_websocket_passes_through_without_a_unit_of_work(async_engine: AsyncEngine) -> None:
    """The plugin gives no unit of work to a WebSocket connection."""
    shop = Shop(async_engine, "on_success")
    incoming = iter([{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}])
    sent: list[Message] = []

    async def receive() -> Any:
        return next(incoming)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "headers": [], "query_string": b""}
    await shop.app({**scope, "asgi": {"version": "3.0"}, "root_path": ""}, receive, send)  # type: ignore[arg-type]

    assert ["websocket.accept", "websocket.send", "websocket.close"] == [message["type"] for message in sent]
    assert "None" == sent[1]["text"]  # type: ignore[typeddict-item]
    assert 0 == shop.factory_calls


# -- cancellation --------------------------------------------------------------------------


@ON_DATABASES
async def test_a_cancelled_request_rolls_back_and_returns_its_connection(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """A request cancelled while its handler holds a connection (a client gone, a timeout) leaves nothing behind."""
    shop = Shop(async_engine, "on_success")

    async with client(shop.app) as http:
        request = asyncio.ensure_future(http.post("/wait"))
        await asyncio.wait_for(shop.waiting.wait(), TIMEOUT)
        assert 1 == checked_out(async_engine)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request

    assert (False, True) == (shop.units[0].active, shop.units[0].rolled_back)
    assert [] == item_names(engine)
    assert 0 == checked_out(async_engine)


# -- misuse ----------------------------------------------------------------------------------


def test_a_sync_handler_that_takes_the_unit_of_work_is_refused_when_the_app_is_built() -> None:
    """A `def` handler that asks for the request's async unit of work: ConfigurationError from Litestar(...)."""

    @post("/sync", sync_to_thread=True)
    def in_a_thread(uow: ShopUnitOfWork) -> None: ...

    @post("/sync", sync_to_thread=False)
    def in_the_loop(uow: ShopUnitOfWork) -> None: ...

    for handler in (in_a_thread, in_the_loop):
        with pytest.raises(errors.ConfigurationError, match=r"is a sync handler.*Declare the handler `async def`"):
            Litestar([handler], plugins=[UnitOfWorkPlugin(AsyncFakeShopUnitOfWork)], logging_config=None)


async def test_a_sync_handler_that_reaches_it_through_a_dependency_is_refused_at_the_request() -> None:
    """A `def` handler whose dependency takes the unit of work: the request fails with ConfigurationError."""
    seen: list[BaseException] = []

    async def record(error: BaseException, scope: Scope) -> None:
        seen.append(error)

    async def service(uow: ShopUnitOfWork) -> str:
        return "service"

    @post("/sync", sync_to_thread=True)
    def sync_handler(service: NamedDependency[str]) -> None: ...

    app = Litestar(
        [sync_handler],
        plugins=[UnitOfWorkPlugin(AsyncFakeShopUnitOfWork)],
        dependencies={"service": Provide(service)},
        after_exception=[record],
        logging_config=None,
    )
    async with client(app) as http:
        response = await http.post("/sync")

    assert 500 == response.status_code
    assert [errors.ConfigurationError] == [type(error) for error in seen]
    assert "is a sync handler" in str(seen[0])


async def test_a_factory_that_returns_a_sync_or_an_active_unit_of_work_is_refused() -> None:
    """A factory of a sync unit of work is refused by its annotation at once, otherwise at the request."""
    from tests.support.uows import FakeShopUnitOfWork

    def sync_factory() -> FakeShopUnitOfWork:
        return FakeShopUnitOfWork()

    with pytest.raises(errors.ConfigurationError, match="sync FakeShopUnitOfWork"):
        UnitOfWorkPlugin(sync_factory)  # type: ignore[arg-type]

    seen: list[BaseException] = []

    async def record(error: BaseException, scope: Scope) -> None:
        seen.append(error)

    @post("/items")
    async def add_item() -> None: ...

    for factory in (lambda: FakeShopUnitOfWork(), lambda: "a string"):
        plugin = UnitOfWorkPlugin(factory)  # type: ignore[arg-type]
        app = Litestar([add_item], plugins=[plugin], after_exception=[record], logging_config=None)
        async with client(app) as http:
            assert 500 == (await http.post("/items")).status_code

    assert [errors.ConfigurationError, errors.ConfigurationError] == [type(error) for error in seen]
    assert "returned the sync FakeShopUnitOfWork" in str(seen[0])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"factory": "sqlite://"}, "takes a factory"),
        ({"factory": AsyncFakeShopUnitOfWork, "commit": "always"}, "commit must be one of"),
        ({"factory": AsyncFakeShopUnitOfWork, "dependency_key": "my uow"}, "dependency_key must name"),
    ],
)
def test_a_plugin_built_wrongly_is_refused(arguments: dict[str, Any], message: str) -> None:
    """A factory that is not callable, an unknown policy, a key that no parameter can have: ConfigurationError."""
    with pytest.raises(errors.ConfigurationError, match=message):
        UnitOfWorkPlugin(**arguments)


async def test_the_fake_gets_the_same_policy_and_a_custom_dependency_key() -> None:
    """A factory of the fake, and dependency_key="shop": the handler's `shop` parameter, committed on success."""
    fake = AsyncFakeShopUnitOfWork()

    @post("/items")
    async def add_item(shop: NamedDependency[AsyncShopUnitOfWork]) -> None:
        await shop.items.add(Item("fake lamp"))

    plugin = UnitOfWorkPlugin(lambda: fake, commit="on_success", dependency_key="shop")
    app = Litestar([add_item], plugins=[plugin], logging_config=None)
    async with client(app) as http:
        response = await http.post("/items")

    assert (201, True, False) == (response.status_code, fake.committed, fake.active)


async def test_a_swallowed_failure_of_a_joined_service_is_a_500_and_commits_nothing() -> None:
    """The handler catches the error of a @transactional service that joined: RollbackOnlyError, a 500, no commit."""
    fake = AsyncFakeShopUnitOfWork()
    seen: list[BaseException] = []

    async def record(error: BaseException, scope: Scope) -> None:
        seen.append(error)

    @transactional
    async def failing(uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        await uow.items.add(Item("half done"))
        raise Boom

    @post("/items")
    async def add_item() -> None:
        with contextlib.suppress(Boom):  # the request's unit of work is poisoned all the same
            await failing()

    plugin = UnitOfWorkPlugin(lambda: fake, commit="on_success")
    app = Litestar([add_item], plugins=[plugin], after_exception=[record], logging_config=None)
    async with client(app) as http:
        response = await http.post("/items")

    assert (500, False, True) == (response.status_code, fake.committed, fake.rolled_back)
    assert [errors.RollbackOnlyError] == [type(error) for error in seen]


async def test_two_plugins_give_a_request_a_unit_of_work_of_each_and_commit_both() -> None:
    """Two plugins under two keys: the handler gets both units of work, both current; both commit, in order."""
    shop, audit = AsyncFakeShopUnitOfWork(), AsyncFakeAuditUnitOfWork()
    seen: list[bool] = []
    commits: list[str] = []

    @post("/items")
    async def add_item(
        shop: NamedDependency[AsyncShopUnitOfWork], audit: NamedDependency[AsyncAuditUnitOfWork]
    ) -> None:
        seen.extend([uow.current(AsyncShopUnitOfWork) is shop, uow.current(AsyncAuditUnitOfWork) is audit])
        await shop.items.add(Item("lamp"))
        await audit.notes.add(Note(text="lamp added"))
        shop.on_commit(lambda: commits.append("shop"))
        audit.on_commit(lambda: commits.append("audit"))

    plugins = [
        UnitOfWorkPlugin(lambda: shop, commit="on_success", dependency_key="shop"),
        UnitOfWorkPlugin(lambda: audit, commit="on_success", dependency_key="audit"),
    ]
    app = Litestar([add_item], plugins=plugins, logging_config=None)
    async with client(app) as http:
        response = await http.post("/items")

    assert (201, [True, True]) == (response.status_code, seen)
    assert ["shop", "audit"] == commits  # the plugin listed first commits first


def test_importing_uow_does_not_import_litestar() -> None:
    """Litestar is an optional extra: `import uow` leaves it unimported."""
    code = "import sys, uow; print('litestar' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert "False" == result.stdout.strip()


# -- on a real server: uvicorn, PostgreSQL, concurrent clients ------------------------------------------------


def uvicorn_command(port: int) -> list[str]:
    app = "tests.integration.litestar_apps:create_app"
    return [sys.executable, "-m", "uvicorn", "--factory", "--host=127.0.0.1", f"--port={port}", "--no-access-log", app]


@pytest.fixture(scope="module")
def server(provisioner: Provisioner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsgiServer]:
    """uvicorn running the app over the run's PostgreSQL database, with the app's table and its one "taken" ref."""
    database = provisioner.database("postgresql")
    engine = provisioner.track(database.engine(pool_size=1, max_overflow=0))
    env = server_env(UOW_TEST_LITESTAR_DATABASE_URL=database.async_url.render_as_string(hide_password=False))
    with asgi_server(
        "uvicorn",
        "postgresql",
        uvicorn_command,
        env=env,
        log=tmp_path_factory.mktemp("uvicorn-litestar") / "server.log",
        engine=engine,
        metadata=litestar_apps.metadata,
        entries=litestar_apps.entries,
    ) as server:
        yield server


def stored(server: AsgiServer, prefix: str) -> set[str]:
    """The names of the committed entries under *prefix*, read with raw SQL on the test's own connection."""
    return stored_names(server.engine, "uow_litestar_entries", prefix)


#: What each kind of request expects, by whether the router maps a failed commit to 409.
EXPECTED: dict[str, tuple[int | str, int | str]] = {
    # kind: (status where mapped, status where not)
    "commit": (201, 201),
    "duplicate": (409, 500),  # the ref is taken: the COMMIT fails
    "conflict": (409, 409),  # the handler answers 409 without raising: rolled back
    "raise": (500, 500),
    "later": (201, 201),  # and a background task commits "<name>-later"
    "stream": (201, 201),  # started by the request's task
    "stream-gzip": (201, 201),  # compressed: started by the stream's task
    "file": (200, 200),
    "gone": (GONE, GONE),  # the client leaves before the answer
    "stream-gone": (201, 201),  # the client leaves after the first chunk
}


async def send(client: httpx.AsyncClient, kind: str, mount: str, name: str) -> Answer:
    """One request of *kind*, as a client of that kind behaves; returns what the client got."""
    params = {"name": name}
    identity = {"Accept-Encoding": "identity"}
    if kind in ("commit", "duplicate", "conflict", "raise", "later"):
        extra = {"duplicate": {"ref": "taken"}, "conflict": {"conflict": ""}, "raise": {"fail": ""}}
        extra["later"] = {"later": ""}
        response = await client.post(f"{mount}/entries", params=params | extra.get(kind, {}))
        return Answer(kind, mount, name, response.status_code, response.headers.get("x-client-port", ""))
    if kind in ("stream", "stream-gzip", "file"):
        headers = {"Accept-Encoding": "gzip"} if kind == "stream-gzip" else identity
        method, path = ("GET", "/file") if kind == "file" else ("POST", "/stream")
        response = await client.request(method, f"{mount}{path}", params=params, headers=headers)
        compressed = response.headers.get("content-encoding") == "gzip"
        whole = response.text == "one two three" if kind != "file" else '"""The Litestar app' in response.text
        assert (whole, kind == "stream-gzip") == (True, compressed), f"{kind} {name}: {response.status_code}"
        return Answer(kind, mount, name, response.status_code, response.headers.get("x-client-port", ""))
    if kind == "stream-gone":
        async with client.stream("POST", f"{mount}/stream", params=params, headers=identity) as response:
            async for _ in response.aiter_raw():
                break  # the first chunk, then the client goes
            return Answer(kind, mount, name, response.status_code, response.headers.get("x-client-port", ""))
    assert "gone" == kind
    try:
        early = await client.post(f"{mount}/slow", params=params, timeout=0.05)
    except httpx.TimeoutException:
        return Answer(kind, mount, name, GONE, "")
    pytest.fail(f"the client of {name} was answered before it left: {early.status_code} {early.text[:300]}")


async def test_on_uvicorn_concurrent_clients_get_the_status_of_their_commit_and_no_connection_stays_out(
    server: AsgiServer,
) -> None:
    """Mixed requests from 30 clients on uvicorn: a row for each 2xx the app started, none for a failure, none out."""
    prefix = "load-"
    kinds, mounts = list(EXPECTED), list(litestar_apps.MOUNTS)
    count, clients = 300, 30
    requests = mixed_requests(kinds, mounts, count, prefix)

    answers = await run_clients(server.url, requests, clients, send)
    stats = server.settled(prefix)
    rows_stored = stored(server, prefix)
    connections = app_connections(server.engine, litestar_apps.APPLICATION_NAME)
    statuses = collections.Counter(answer.status for answer in answers)
    later = {f"{a.name}-later" for a in answers if a.kind == "later" and a.status == 201}
    succeeded = successes(stats)
    left = [a for a in answers if a.status == GONE]
    print(
        f"\nlitestar on uvicorn, postgresql: {len(answers)} requests from {clients} clients, "
        f"statuses {dict(sorted(statuses.items(), key=str))}, "
        f"rows {len(rows_stored)} (2xx started by the app {len(succeeded)}, background {len(later)}), "
        f"checked out {stats['checked_out']}, app connections {connections}; "
        f"of {len(left)} clients that left, answered 2xx after they left: {sum(a.name in succeeded for a in left)}"
    )

    assert [] == [a for a in answers if EXPECTED[a.kind][0 if litestar_apps.MOUNTS[a.mount] else 1] != a.status]
    assert succeeded | later == rows_stored
    assert not {a.name for a in answers if isinstance(a.status, int) and a.status >= 400} & rows_stored
    assert (0, 0) == (stats["checked_out"], stats["in_flight"])
    assert set(connections) <= {"idle"}
    assert "Exception in ASGI application" not in server.log.read_text()  # no error reached the server


async def test_on_uvicorn_a_failed_commit_costs_the_client_no_connection(server: AsgiServer) -> None:
    """A COMMIT that fails is answered 409, or 500 where unmapped, on a connection that stays open for the next."""
    prefix = "keep-"
    async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_connections=1)) as http:
        answers = []
        for number, mount in enumerate(litestar_apps.MOUNTS):
            for kind in ("duplicate", "raise", "stream-gzip", "commit"):
                answers.append(await send(http, kind, mount, f"{prefix}{kind}-{number}"))

    expected = [
        EXPECTED[kind][0 if mapped else 1]
        for mapped in litestar_apps.MOUNTS.values()
        for kind in ("duplicate", "raise", "stream-gzip", "commit")
    ]
    assert expected == [answer.status for answer in answers]
    assert 1 == len({answer.port for answer in answers})
    assert {a.name for a in answers if a.kind in ("commit", "stream-gzip")} == stored(server, prefix)
    assert 0 == server.settled(prefix)["checked_out"]
