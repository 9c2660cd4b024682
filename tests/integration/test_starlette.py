"""The Starlette middleware on real databases, through httpx's ASGI client: commits, failures, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import Column, Engine, ForeignKey, Integer, MetaData, Table, event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

import uow
from tests.integration.conftest import rows
from tests.support.databases import Database, Provisioner
from tests.support.models import Item, Note, skus
from tests.support.uows import (
    AsyncFakeShopUnitOfWork,
    AsyncShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    FakeShopUnitOfWork,
)
from uow import NEW_UOW, errors, transactional
from uow.starlette import CommitPolicy, UnitOfWorkMiddleware

#: The backends every test here runs on.
ON_DATABASES = pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)

#: How long a test waits for the application to reach a point: a hang guard, never asserted.
TIMEOUT = 60.0


class Boom(Exception):
    """Raised by an endpoint to make the request fail."""


# -- a table whose foreign key is checked at COMMIT: a commit that really fails --

refs_metadata = MetaData()
refs = Table(
    "uow_web_refs",
    refs_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sku", ForeignKey(skus.c.code, deferrable=True, initially="DEFERRED"), nullable=False),
)


def enforce_foreign_keys(eng: Engine) -> None:
    """Make SQLite check foreign keys on *eng*'s connections; the other databases always do."""
    if eng.dialect.name != "sqlite":
        return

    @event.listens_for(eng, "connect")
    def foreign_keys_on(dbapi_connection: Any, record: object) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


@pytest.fixture(name="refs_table")
def _refs_table(engine: Engine) -> Iterator[Table]:
    """The table of deferred references, created empty for the test and dropped after it."""
    refs_metadata.create_all(engine)
    try:
        yield refs
    finally:
        refs_metadata.drop_all(engine)


@pytest.fixture(name="async_engine")
async def _async_engine(
    database: Database, engine: Engine, refs_table: Table, provisioner: Provisioner
) -> AsyncIterator[AsyncEngine]:
    """An async engine (aiosqlite, asyncpg) on the run's database, with the tables emptied and foreign keys on."""
    eng = create_async_engine(database.async_url)
    enforce_foreign_keys(eng.sync_engine)
    provisioner.track(eng.sync_engine)
    try:
        yield eng
    finally:
        await eng.dispose()


# -- helpers --------------------------------------------------------------------


def checked_out(eng: AsyncEngine | Engine) -> int:
    """How many connections of *eng* are out of its pool."""
    sync = eng.sync_engine if isinstance(eng, AsyncEngine) else eng
    return sync.pool.checkedout()  # type: ignore[attr-defined]


def item_names(eng: Engine) -> list[str]:
    """The names of the committed items, sorted, read through a separate connection."""
    return [str(name) for (name,) in rows(eng, "SELECT name FROM uow_items ORDER BY name")]


def client(app: ASGIApp) -> httpx.AsyncClient:
    """An HTTP client that calls *app* in this task; an application's error becomes a 500 response."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://shop")


def recording_order(app: ASGIApp, events: list[str]) -> ASGIApp:
    """*app*, recording in *events* when each response starts, as the server sees it."""

    async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                events.append(f"response {message['status']}")
            await send(message)

        await app(scope, receive, recording_send)

    return recorded


def recording_commits(eng: AsyncEngine, events: list[str]) -> None:
    """Record in *events* each COMMIT that *eng* sends."""

    @event.listens_for(eng.sync_engine, "commit")
    def committing(conn: object) -> None:
        events.append("COMMIT")


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run *app*'s startup and shutdown through the ASGI lifespan protocol, in a task of its own, as a server does."""
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))  # type: ignore[arg-type]
    await to_app.put({"type": "lifespan.startup"})
    assert {"type": "lifespan.startup.complete"} == await asyncio.wait_for(from_app.get(), TIMEOUT)
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        assert {"type": "lifespan.shutdown.complete"} == await asyncio.wait_for(from_app.get(), TIMEOUT)
        await asyncio.wait_for(task, TIMEOUT)


# -- the application under test --------------------------------------------------


@transactional
async def add_note(text: str, uow: AsyncShopUnitOfWork = NEW_UOW) -> AsyncShopUnitOfWork:
    """A service that needs an active unit of work: it has no factory."""
    await uow.notes.add(Note(text=text))
    return uow


class Shop:
    """A Starlette application over *engine*, with the middleware, and what its code saw."""

    def __init__(self, eng: AsyncEngine, commit: CommitPolicy, *, mapped: bool = False) -> None:
        self.engine = eng
        #: The request's unit of work, as each request's endpoint saw it.
        self.units: list[AsyncShopUnitOfWork] = []
        #: For each background task: its unit of work, and what uow.current() returned in it.
        self.background: list[tuple[AsyncShopUnitOfWork, object]] = []
        #: Set when a request that waits forever has used its unit of work.
        self.waiting = asyncio.Event()
        self.factory_calls = 0
        routes = [
            Route("/items", self.add_item, methods=["POST"]),
            Route("/wait", self.wait, methods=["POST"]),
            Route("/stream", self.stream, methods=["POST"]),
            WebSocketRoute("/ws", self.websocket),
        ]
        self.app = Starlette(
            routes=routes,
            middleware=[Middleware(UnitOfWorkMiddleware, factory=self.make_uow, commit=commit)],
            lifespan=self.lifespan,
            exception_handlers={IntegrityError: conflict} if mapped else {},
        )
        self.add_later = transactional(factory=self.new_uow)(self._add_later)

    def new_uow(self) -> AsyncSqlAlchemyShopUnitOfWork:
        return AsyncSqlAlchemyShopUnitOfWork(self.engine)

    def make_uow(self) -> AsyncSqlAlchemyShopUnitOfWork:
        self.factory_calls += 1
        return self.new_uow()

    async def _add_later(self, name: str, uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        self.background.append((uow, _current_or_none()))
        await uow.items.add(Item(name))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.add_later("at startup")
        yield
        await self.add_later("at shutdown")

    async def add_item(self, request: Request) -> Response:
        """Add an item named ?name=..., and do what the other query parameters say."""
        params = request.query_params
        unit = uow.current(AsyncShopUnitOfWork)
        self.units.append(unit)
        await unit.items.add(Item(params["name"]))
        joined = await add_note(params["name"])
        if "dangling" in params:
            await unit.session.execute(refs.insert().values(sku="missing"))
        if "commit" in params:
            await unit.commit()
        if "raise" in params:
            raise Boom(params["name"])
        if "rollback_only" in params:
            unit.set_rollback_only()
        later = BackgroundTask(self.add_later, params["later"]) if "later" in params else None
        body = {"joined": joined is unit, "active": unit.active}
        return JSONResponse(body, status_code=int(params.get("status", "200")), background=later)

    async def wait(self, request: Request) -> Response:
        unit = uow.current(AsyncShopUnitOfWork)
        self.units.append(unit)
        await unit.items.add(Item("waiting"))
        await unit.session.flush()  # the connection is checked out, the row written but not committed
        self.waiting.set()
        await asyncio.Event().wait()
        raise AssertionError("never reached")  # pragma: no cover

    async def stream(self, request: Request) -> Response:
        params = request.query_params
        unit = uow.current(AsyncShopUnitOfWork)
        self.units.append(unit)
        await unit.items.add(Item(params["name"]))
        if "dangling" in params:
            await unit.session.execute(refs.insert().values(sku="missing"))
        if "commit" in params:
            await unit.commit()

        async def chunks() -> AsyncIterator[bytes]:
            yield b"one "
            yield b"two"

        later = BackgroundTask(self.add_later, params["later"]) if "later" in params else None
        return StreamingResponse(chunks(), background=later)

    async def websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(repr(_current_or_none()))
        await websocket.close()


async def conflict(request: Request, error: Exception) -> Response:
    """The application's handler of IntegrityError."""
    return JSONResponse({"message": "conflict"}, status_code=409)


def _current_or_none() -> object:
    """The unit of work active in this task, or None."""
    try:
        return uow.current()
    except errors.InactiveUnitOfWorkError:
        return None


# -- the request's unit of work ----------------------------------------------------


@ON_DATABASES
async def test_each_request_gets_a_unit_of_work_of_its_own_current_for_the_endpoint(async_engine: AsyncEngine) -> None:
    """The endpoint finds the request's unit of work through uow.current(); a @transactional service joins it."""
    shop = Shop(async_engine, "explicit")

    async with client(shop.app) as http:
        first = await http.post("/items", params={"name": "first"})
        second = await http.post("/items", params={"name": "second"})

    assert (200, {"joined": True, "active": True}) == (first.status_code, first.json())
    assert (200, {"joined": True, "active": True}) == (second.status_code, second.json())
    assert 2 == len({id(unit) for unit in shop.units})
    assert [False, False] == [unit.active for unit in shop.units]
    assert 2 == shop.factory_calls


@ON_DATABASES
async def test_explicit_policy_keeps_what_the_endpoint_committed_and_rolls_back_the_rest(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """commit="explicit": an endpoint that commits keeps its rows; one that does not leaves none, even with a 200."""
    shop = Shop(async_engine, "explicit")

    async with client(shop.app) as http:
        committed = await http.post("/items", params={"name": "committed", "commit": ""})
        forgotten = await http.post("/items", params={"name": "forgotten"})

    assert (200, 200) == (committed.status_code, forgotten.status_code)
    assert ["committed"] == item_names(engine)
    assert [("committed",)] == rows(engine, "SELECT text FROM uow_notes")
    assert (1, True) == (shop.units[0].commits, shop.units[0].committed)
    assert (0, True) == (shop.units[1].commits, shop.units[1].rolled_back)


@ON_DATABASES
@pytest.mark.parametrize(
    ("status", "kept"), [(200, True), (201, True), (303, True), (400, False), (404, False), (500, False)]
)
async def test_on_success_policy_commits_a_2xx_or_3xx_response_and_rolls_back_an_error_status(
    async_engine: AsyncEngine, engine: Engine, status: int, kept: bool
) -> None:
    """commit="on_success": the request's work is committed with a status below 400, rolled back from 400 on."""
    shop = Shop(async_engine, "on_success")

    async with client(shop.app) as http:
        response = await http.post("/items", params={"name": "lamp", "status": str(status)})

    assert status == response.status_code
    assert (["lamp"] if kept else []) == item_names(engine)
    assert (kept, not kept) == (shop.units[0].committed, shop.units[0].rolled_back)


@ON_DATABASES
@pytest.mark.parametrize("commit", ["explicit", "on_success"])
async def test_an_endpoint_that_raises_gives_a_500_and_commits_nothing(
    async_engine: AsyncEngine, engine: Engine, commit: CommitPolicy
) -> None:
    """An exception from the endpoint rolls the request's work back, whatever the policy; the client gets a 500."""
    shop = Shop(async_engine, commit)

    async with client(shop.app) as http:
        response = await http.post("/items", params={"name": "lamp", "raise": ""})

    assert 500 == response.status_code
    assert [] == item_names(engine)
    assert [] == rows(engine, "SELECT text FROM uow_notes")
    assert (False, True) == (shop.units[0].active, shop.units[0].rolled_back)


@ON_DATABASES
async def test_set_rollback_only_rolls_back_quietly_under_on_success(async_engine: AsyncEngine, engine: Engine) -> None:
    """An endpoint that calls set_rollback_only() gets its 200, and nothing is committed."""
    shop = Shop(async_engine, "on_success")

    async with client(shop.app) as http:
        response = await http.post("/items", params={"name": "lamp", "rollback_only": ""})

    assert 200 == response.status_code
    assert [] == item_names(engine)


@ON_DATABASES
@pytest.mark.parametrize("commit", ["explicit", "on_success"])
async def test_a_commit_that_fails_gives_a_500_and_commits_nothing(
    async_engine: AsyncEngine, engine: Engine, commit: CommitPolicy
) -> None:
    """A COMMIT that the database refuses (a deferred foreign key) reaches the client as a 500, never a 200."""
    shop = Shop(async_engine, commit)
    params = {"name": "lamp", "dangling": ""} | ({"commit": ""} if commit == "explicit" else {})

    async with client(shop.app) as http:
        response = await http.post("/items", params=params)

    assert 500 == response.status_code
    assert [] == item_names(engine)
    assert [] == rows(engine, "SELECT sku FROM uow_web_refs")
    assert (0, True) == (shop.units[0].commits, shop.units[0].rolled_back)
    assert 0 == checked_out(async_engine)


@ON_DATABASES
async def test_the_commit_happens_before_the_response_starts(async_engine: AsyncEngine, engine: Engine) -> None:
    """The server sees the COMMIT before the http.response.start message."""
    events: list[str] = []
    shop = Shop(async_engine, "on_success")
    recording_commits(async_engine, events)

    async with client(recording_order(shop.app, events)) as http:
        response = await http.post("/items", params={"name": "lamp"})

    assert 200 == response.status_code
    assert ["COMMIT", "response 200"] == events
    assert ["lamp"] == item_names(engine)


# -- background tasks, lifespan, websockets ------------------------------------------


@ON_DATABASES
async def test_a_background_task_gets_a_unit_of_work_of_its_own_that_commits_on_its_own(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """A @transactional background task builds its own unit of work, not the request's, and commits it."""
    shop = Shop(async_engine, "explicit")

    async with client(shop.app) as http:
        response = await http.post("/items", params={"name": "uncommitted", "later": "later"})

    assert 200 == response.status_code
    [(background_unit, current_in_background)] = shop.background
    assert background_unit is not shop.units[0]
    assert current_in_background is background_unit
    assert (1, False) == (background_unit.commits, background_unit.active)
    assert ["later"] == item_names(engine)  # the request's uncommitted item is gone, the background's stays


@ON_DATABASES
async def test_lifespan_hooks_get_units_of_work_of_their_own_and_none_from_the_middleware(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """Startup and shutdown run without the middleware's unit of work; their @transactional code commits its own."""
    shop = Shop(async_engine, "explicit")

    async with lifespan(shop.app), client(shop.app) as http:
        response = await http.post("/items", params={"name": "request", "commit": ""})

    assert 200 == response.status_code
    assert 1 == shop.factory_calls
    assert [True, True] == [current is unit for unit, current in shop.background]
    assert [1, 1] == [unit.commits for unit, _ in shop.background]
    assert shop.units[0] not in [unit for unit, _ in shop.background]
    assert ["at shutdown", "at startup", "request"] == item_names(engine)


@ON_DATABASES
async def test_a_websocket_passes_through_without_a_unit_of_work(async_engine: AsyncEngine) -> None:
    """The middleware gives no unit of work to a WebSocket connection."""
    shop = Shop(async_engine, "on_success")
    incoming = iter([{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}])
    sent: list[Message] = []

    async def receive() -> Message:
        return next(incoming)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b"", "asgi": {"version": "3.0"}}
    await shop.app(scope, receive, send)

    assert ["websocket.accept", "websocket.send", "websocket.close"] == [message["type"] for message in sent]
    assert "None" == sent[1]["text"]
    assert 0 == shop.factory_calls


# -- responses sent by another task ----------------------------------------------------


@ON_DATABASES
async def test_a_streaming_response_sent_by_another_task_commits_before_it_starts(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """Starlette streams from a task of its own here (ASGI < 2.4): the request's task commits before it starts."""
    events: list[str] = []
    shop = Shop(async_engine, "on_success")
    recording_commits(async_engine, events)

    async with client(recording_order(shop.app, events)) as http:
        response = await http.post("/stream", params={"name": "streamed"})

    assert (200, "one two") == (response.status_code, response.text)
    assert ["COMMIT", "response 200"] == events
    assert ["streamed"] == item_names(engine)
    assert (1, False) == (shop.units[0].commits, shop.units[0].active)


def handing_send_to(task_factory: Callable[[Any], Any]) -> ASGIApp:
    """An application that adds an item, then has a task made by *task_factory* send its 200 response."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await uow.current(AsyncShopUnitOfWork).items.add(Item("handed over"))

        async def respond() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"sent"})

        await task_factory(respond())

    return app


class Server:
    """A server's side of one request, for an application called directly: what it receives and what was sent."""

    def __init__(self, messages: list[tuple[float, Message]], fake: AsyncFakeShopUnitOfWork) -> None:
        self.messages = messages  # each after a delay, in seconds
        self.fake = fake
        self.received: list[str] = []
        #: The messages sent, each with whether the unit of work had committed when it was.
        self.sent: list[tuple[str, bool]] = []

    async def receive(self) -> Message:
        delay, message = self.messages.pop(0)
        await asyncio.sleep(delay)
        self.received.append(message["type"])
        return message

    async def send(self, message: Message) -> None:
        self.sent.append((message["type"], self.fake.committed))

    async def call(self, app: ASGIApp) -> None:
        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
        await app(scope, self.receive, self.send)


async def test_a_response_started_while_the_body_is_read_commits_once_the_body_part_arrives() -> None:
    """Another task starts the response while the request's task waits for the body: it commits when the body comes."""
    fake = AsyncFakeShopUnitOfWork()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await uow.current(AsyncShopUnitOfWork).items.add(Item("lamp"))

        async def respond() -> None:
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send({"type": "http.response.body", "body": b"created"})

        responding = asyncio.ensure_future(respond())
        await receive()  # the body, which the client sends a little later
        await responding

    server = Server([(0.05, {"type": "http.request", "body": b"", "more_body": False})], fake)
    await server.call(UnitOfWorkMiddleware(app, factory=lambda: fake, commit="on_success"))

    assert [("http.response.start", True), ("http.response.body", True)] == server.sent
    assert (1, False) == (fake.commits, fake.active)


async def test_a_receive_that_the_request_task_gave_up_on_is_taken_over_by_its_next_receive() -> None:
    """A wait for the client that is cancelled leaves the server's receive() running; the next receive() gets it."""
    fake = AsyncFakeShopUnitOfWork()
    got: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await uow.current(AsyncShopUnitOfWork).items.add(Item("lamp"))
        got.append((await receive())["type"])
        with anyio.move_on_after(0.01):  # gives up on the client before it speaks
            got.append((await receive())["type"])
        got.append((await receive())["type"])
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"created"})

    server = Server(
        [(0, {"type": "http.request", "body": b"", "more_body": False}), (0.05, {"type": "http.disconnect"})], fake
    )
    await server.call(UnitOfWorkMiddleware(app, factory=lambda: fake, commit="on_success"))

    assert ["http.request", "http.disconnect"] == got
    assert ["http.request", "http.disconnect"] == server.received
    assert [("http.response.start", True), ("http.response.body", True)] == server.sent


@ON_DATABASES
@pytest.mark.parametrize(
    ("task_factory", "why"),
    [
        (asyncio.ensure_future, "while the request's task, which alone may use its unit of work, is not waiting"),
        (lambda coro: contextvars.Context().run(asyncio.ensure_future, coro), "a task that the request did not start"),
    ],
    ids=["request-task-not-waiting", "task-of-another-context"],
)
async def test_a_response_that_the_request_task_cannot_commit_for_is_refused_under_on_success(
    async_engine: AsyncEngine, engine: Engine, task_factory: Callable[[Any], Any], why: str
) -> None:
    """Another task starts the response while the request's task cannot end the unit of work: 500, nothing kept."""
    caught: list[BaseException] = []
    app = UnitOfWorkMiddleware(
        handing_send_to(task_factory), factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine), commit="on_success"
    )

    async def catching(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await app(scope, receive, send)
        except BaseException as error:
            caught.append(error)
            raise

    async with client(catching) as http:
        response = await http.post("/")

    assert 500 == response.status_code
    [refused] = _leaves(caught)
    assert isinstance(refused, errors.OwnershipError)
    assert why in str(refused)
    assert [] == item_names(engine)
    assert 0 == checked_out(async_engine)


@ON_DATABASES
async def test_a_streaming_response_sent_by_another_task_passes_under_explicit(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """With commit="explicit", a streaming response goes through, and what the endpoint committed stays."""
    shop = Shop(async_engine, "explicit")

    async with client(shop.app) as http:
        committed = await http.post("/stream", params={"name": "committed", "commit": ""})
        forgotten = await http.post("/stream", params={"name": "forgotten"})

    assert [(200, "one two"), (200, "one two")] == [(r.status_code, r.text) for r in (committed, forgotten)]
    assert ["committed"] == item_names(engine)
    assert [False, False] == [unit.active for unit in shop.units]


@ON_DATABASES
async def test_a_background_task_of_a_streaming_response_gets_a_transaction_of_its_own(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """A background task after a response sent by another task never joins the request's transaction."""

    @transactional(factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine))
    async def record(name: str, uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        await uow.items.add(Item(name))

    async def endpoint(request: Request) -> StreamingResponse:
        await uow.current(AsyncShopUnitOfWork).items.add(Item("not committed"))

        async def body() -> AsyncIterator[bytes]:
            yield b"streamed"

        return StreamingResponse(body(), background=BackgroundTask(record, "from the background"))

    app = Starlette(
        routes=[Route("/stream", endpoint, methods=["POST"])],
        middleware=[Middleware(UnitOfWorkMiddleware, factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine))],
    )
    async with client(app) as http:
        response = await http.post("/stream")

    assert (200, "streamed") == (response.status_code, response.text)
    assert ["from the background"] == item_names(engine)


def _leaves(caught: list[BaseException]) -> list[BaseException]:
    """The exceptions in *caught*, exception groups opened."""
    found: list[BaseException] = []
    for error in caught:
        inner = getattr(error, "exceptions", None)  # an exception group
        if inner is not None:
            found.extend(_leaves(list(inner)))
        else:
            found.append(error)
    return found


@ON_DATABASES
async def test_a_response_that_the_request_task_cannot_commit_for_goes_through_under_explicit(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """With commit="explicit" there is nothing to commit first: the response goes through, the work is rolled back."""
    app = UnitOfWorkMiddleware(
        handing_send_to(lambda coro: contextvars.Context().run(asyncio.ensure_future, coro)),
        factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine),
    )

    async with strict_client(app) as http:
        response = await http.post("/")

    assert (200, "sent") == (response.status_code, response.text)
    assert [] == item_names(engine)
    assert 0 == checked_out(async_engine)


# -- a commit that fails, answered by the application ------------------------------------------


def strict_client(app: ASGIApp) -> httpx.AsyncClient:
    """An HTTP client that fails the test if an exception leaves *app*, as it would reach the server."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop")


@ON_DATABASES
@pytest.mark.parametrize("path", ["/items", "/stream"])
async def test_a_failed_commit_is_answered_by_the_applications_exception_handler(
    async_engine: AsyncEngine, engine: Engine, path: str
) -> None:
    """An IntegrityError at COMMIT gets the app's handler's 409, plain or streaming; no background task runs."""
    shop = Shop(async_engine, "on_success", mapped=True)

    async with strict_client(shop.app) as http:
        response = await http.post(path, params={"name": "lamp", "dangling": "", "later": "later"})

    assert (409, {"message": "conflict"}) == (response.status_code, response.json())
    assert ([], []) == (item_names(engine), shop.background)
    assert (False, True) == (shop.units[0].active, shop.units[0].rolled_back)
    assert 0 == checked_out(async_engine)


@ON_DATABASES
@pytest.mark.parametrize("path", ["/items", "/stream"])
async def test_a_failed_commit_without_a_handler_is_answered_500_and_logged_not_raised(
    async_engine: AsyncEngine, engine: Engine, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With no handler for the error, the app's HTTPException handler answers 500; uow logs the error."""
    shop = Shop(async_engine, "on_success")

    with caplog.at_level(logging.ERROR, logger="uow"):
        async with strict_client(shop.app) as http:
            response = await http.post(path, params={"name": "lamp", "dangling": "", "later": "later"})

    assert (500, "Internal Server Error") == (response.status_code, response.text)
    assert [IntegrityError] == [type(record.exc_info[1]) for record in caplog.records if record.exc_info]
    assert ([], []) == (item_names(engine), shop.background)


@ON_DATABASES
async def test_a_failed_commit_under_a_bare_asgi_app_is_answered_500(
    async_engine: AsyncEngine, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Inside the middleware a bare ASGI app has no exception handlers: the middleware answers a plain 500."""

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        unit = uow.current(AsyncSqlAlchemyShopUnitOfWork)
        await unit.items.add(Item("lamp"))
        await unit.session.execute(refs.insert().values(sku="missing"))
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"created"})

    app = UnitOfWorkMiddleware(bare, factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine), commit="on_success")
    with caplog.at_level(logging.ERROR, logger="uow"):
        async with strict_client(app) as http:
            response = await http.post("/")

    assert (500, "Internal Server Error") == (response.status_code, response.text)
    assert 1 == len([record for record in caplog.records if record.exc_info])
    assert [] == item_names(engine)


# -- cancellation and load ---------------------------------------------------------------


@ON_DATABASES
@pytest.mark.parametrize("commit", ["explicit", "on_success"])
async def test_a_request_cancelled_mid_handling_rolls_back_and_returns_its_connection(
    async_engine: AsyncEngine, engine: Engine, commit: CommitPolicy
) -> None:
    """Cancelling the request's task while the endpoint waits: nothing committed, no connection checked out."""
    shop = Shop(async_engine, commit)

    async with client(shop.app) as http:
        request = asyncio.create_task(http.post("/wait"))
        await asyncio.wait_for(shop.waiting.wait(), TIMEOUT)
        assert 1 == checked_out(async_engine)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request

    assert 0 == checked_out(async_engine)
    assert (False, True) == (shop.units[0].active, shop.units[0].rolled_back)
    assert [] == item_names(engine)


#: What request number n does, by n % 6, and the status it gets.
MIXED = [
    ({}, 200),
    ({"status": "409"}, 409),
    ({"raise": ""}, 500),
    ({"dangling": ""}, 500),
    ({"later": "later"}, 200),
    ({"rollback_only": ""}, 200),
]


async def send_mixed_requests(
    app: Any, mixed: list[tuple[dict[str, str], int]], units: list[Any], async_engine: AsyncEngine, engine: Engine
) -> None:
    """Send 500 requests, 20 at a time, request n doing what *mixed* says at n % len(mixed) under commit="on_success".

    Each request gets the status *mixed* gives, exactly the successful requests' rows are committed (the first
    and fifth kinds, the fifth adding a "later" row too), no connection stays checked out, and none of *units*
    is still active.
    """

    async def one(http: httpx.AsyncClient, n: int) -> int:
        params, _ = mixed[n % len(mixed)]
        response = await http.post("/items", params={"name": f"{n:03}"} | params)
        return response.status_code

    async with client(app) as http:
        statuses: list[int] = []
        for start in range(0, 500, 20):
            statuses += await asyncio.gather(*(one(http, n) for n in range(start, start + 20)))

    assert [mixed[n % len(mixed)][1] for n in range(500)] == statuses
    kept = [f"{n:03}" for n in range(500) if n % len(mixed) in (0, 4)]
    later = ["later" for n in range(500) if n % len(mixed) == 4]
    assert sorted(kept + later) == item_names(engine)
    assert 0 == checked_out(async_engine)
    assert [] == [unit for unit in units if unit.active]


@ON_DATABASES
async def test_500_requests_with_errors_mixed_in_leave_no_connection_checked_out(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """500 concurrent requests, a third of them failing, commit exactly the successes and return every connection."""
    shop = Shop(async_engine, "on_success")
    await send_mixed_requests(shop.app, MIXED, shop.units, async_engine, engine)


# -- misuse ----------------------------------------------------------------------------


def test_an_unknown_commit_policy_is_refused_when_the_middleware_is_built() -> None:
    """commit= takes "explicit" or "on_success"; anything else raises ConfigurationError at once."""
    with pytest.raises(errors.ConfigurationError, match="commit must be one of 'explicit', 'on_success'"):
        UnitOfWorkMiddleware(Starlette(), factory=AsyncFakeShopUnitOfWork, commit="always")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (FakeShopUnitOfWork, "returned the sync FakeShopUnitOfWork"),
        (lambda: "a session", "returned 'a session', not a unit of work"),
    ],
)
async def test_a_factory_that_returns_no_async_unit_of_work_is_refused(
    factory: Callable[[], Any], message: str
) -> None:
    """The first request tells what the factory returned and what it must return instead."""
    app = Starlette(routes=[], middleware=[Middleware(UnitOfWorkMiddleware, factory=factory)])

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as http:
        with pytest.raises(errors.ConfigurationError, match=message):
            await http.get("/")


async def test_a_factory_that_returns_an_active_unit_of_work_is_refused() -> None:
    """A unit of work that is already active cannot become the request's: ConfigurationError."""
    fake = AsyncFakeShopUnitOfWork()
    app = Starlette(routes=[], middleware=[Middleware(UnitOfWorkMiddleware, factory=lambda: fake)])

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as http, fake:
        with pytest.raises(errors.ConfigurationError, match="already active"):
            await http.get("/")
    assert not fake.active


async def test_the_middleware_runs_with_the_fake() -> None:
    """With an in-memory fake from the factory, the endpoint's work is committed on success, as on a database."""
    fake = AsyncFakeShopUnitOfWork()

    async def add(request: Request) -> Response:
        await uow.current(AsyncShopUnitOfWork).items.add(Item("lamp"))
        return Response(status_code=201)

    app = Starlette(
        routes=[Route("/", add, methods=["POST"])],
        middleware=[Middleware(UnitOfWorkMiddleware, factory=lambda: fake, commit="on_success")],
    )
    async with client(app) as http:
        response = await http.post("/")

    assert (201, True, False) == (response.status_code, fake.committed, fake.active)
    async with fake:
        assert ["lamp"] == [item.name for item in await fake.items.list()]
