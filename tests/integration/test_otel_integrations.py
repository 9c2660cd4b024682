"""OpenTelemetry through the web integrations: each request's transaction span nests under its request span.

Each test builds a small application on a SQLite file in a temporary
directory, instruments it with OpenTelemetry's own instrumentation of the
framework, on the tracer provider of the ``otel`` fixture (which also
instruments uow), sends it one request, and asserts the exact span tree and
the transaction span's attributes. What a request committed is read back
with plain SQL on an engine of its own.
"""

# No `from __future__ import annotations` here: FastAPI and Litestar read the annotations of the endpoints,
# which are defined inside the functions that build each application.

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI, Request
from flask import Flask
from litestar import Litestar, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

import uow
import uow.fastapi
from tests.support.models import Sku, metadata
from tests.support.otel import Recorded, events
from tests.support.uows import AsyncSqlAlchemyShopUnitOfWork, ShopUnitOfWork, SqlAlchemyShopUnitOfWork
from uow.flask import UnitOfWorkExtension
from uow.litestar import UnitOfWorkPlugin
from uow.starlette import UnitOfWorkMiddleware

SYNC_UNIT = "SqlAlchemyShopUnitOfWork"
ASYNC_UNIT = "AsyncSqlAlchemyShopUnitOfWork"


class Boom(Exception):
    """Raised by a view to make the request fail."""


# -- the database: a SQLite file, read back on a connection of its own ----------------------------------


@pytest.fixture(name="database_file")
def _database_file(tmp_path: Path) -> Path:
    """A SQLite file with the test tables created, empty."""
    path = tmp_path / "shop.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()
    return path


@pytest.fixture(name="async_engine")
async def _async_engine(database_file: Path) -> AsyncIterator[AsyncEngine]:
    """An aiosqlite engine on the database file, disposed of after the test."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{database_file}")
    try:
        yield engine
    finally:
        await engine.dispose()


def committed_codes(database_file: Path) -> list[str]:
    """The codes of the committed SKUs, read with plain SQL on an engine of their own."""
    engine = create_engine(f"sqlite:///{database_file}")
    try:
        with engine.connect() as connection:
            return [str(code) for (code,) in connection.execute(text("SELECT code FROM uow_skus ORDER BY code"))]
    finally:
        engine.dispose()


# -- what the tests read from the spans ----------------------------------------------------------------


def attributes(span: ReadableSpan) -> dict[str, Any]:
    """The span's attributes, as a plain dict."""
    return dict(span.attributes or {})


def committed(unit: str) -> dict[str, Any]:
    """The attributes of the transaction span of a request that added one SKU and committed."""
    return {
        "uow.unit_of_work": unit,
        "uow.propagation": "required",
        "uow.read_only": False,
        "uow.attempt": 1,
        "uow.outcome": "committed",
        "uow.savepoints": 0,
        "uow.flushed.Sku": 1,
    }


def rolled_back(unit: str) -> dict[str, Any]:
    """The attributes of the transaction span of a request that added one SKU (never flushed) and failed."""
    return {
        "uow.unit_of_work": unit,
        "uow.propagation": "required",
        "uow.read_only": False,
        "uow.attempt": 1,
        "uow.outcome": "rolled_back",
        "uow.savepoints": 0,
    }


def status(span: ReadableSpan) -> tuple[StatusCode, str | None]:
    """The span's status code and description."""
    return span.status.status_code, span.status.description


def asgi_tree(path: str) -> list[tuple[str, str | None]]:
    """The spans of one POST to *path* through OpenTelemetry's ASGI middleware, in the order they end.

    The server span is named after the path (the middleware is outside the
    router, which alone knows the route). The transaction span ends first:
    uow ends the unit of work before it passes ``http.response.start`` on, so
    before the middleware's "http send" span of the response's start, and
    the one of its body, begin. The requests have no body to receive.
    """
    request = f"POST {path}"
    send = f"{request} http send"
    return [(ASYNC_UNIT, request), (send, request), (send, request), (request, None)]


def assert_no_span_current() -> None:
    """After a request, no span is left current in the test's context."""
    assert not trace.get_current_span().get_span_context().is_valid


def client(app: ASGIApp | Litestar) -> httpx.AsyncClient:
    """An HTTP client that calls *app* in this task; an exception that reaches the server becomes a 500."""
    # Litestar types the scope and the messages as typed dicts, where httpx expects mutable mappings.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://shop")


# -- Flask ---------------------------------------------------------------------------------------------------

#: The orders in which a Flask app may get uow's extension and OpenTelemetry's instrumentation.
INSTRUMENTED_FIRST = "instrument_app() then init_app()"
EXTENSION_FIRST = "init_app() then instrument_app()"


@pytest.fixture(name="flask_app", params=[INSTRUMENTED_FIRST, EXTENSION_FIRST])
def _flask_app(request: pytest.FixtureRequest, otel: Recorded, database_file: Path) -> Iterator[Flask]:
    """A Flask app with uow's extension and OpenTelemetry's instrumentation of Flask, in either order.

    ``EXTENSION_FIRST`` is how an app built by an app factory, as in
    docs/flask.md, gets instrumented: ``instrument_app()`` takes the app that
    the factory returns, ``ext.init_app(app)`` already called. The test's
    thread gets an empty OpenTelemetry context, restored after the test
    whatever a request left current in it.
    """
    engine = create_engine(f"sqlite:///{database_file}")
    ext: UnitOfWorkExtension[ShopUnitOfWork] = UnitOfWorkExtension(
        factory=SqlAlchemyShopUnitOfWork, commit="on_success"
    )
    app = Flask(__name__)

    @app.post("/skus/<code>")
    def add(code: str) -> tuple[str, int]:
        ext.uow.skus.add(Sku(code))
        return code, 201

    @app.post("/skus/<code>/fail")
    def fail(code: str) -> str:
        ext.uow.skus.add(Sku(code))
        raise Boom(code)

    instrumentor = FlaskInstrumentor()
    if request.param == INSTRUMENTED_FIRST:
        instrumentor.instrument_app(app, tracer_provider=otel.tracer_provider)  # type: ignore[no-untyped-call]
        ext.init_app(app, engine=engine)
    else:
        ext.init_app(app, engine=engine)
        instrumentor.instrument_app(app, tracer_provider=otel.tracer_provider)  # type: ignore[no-untyped-call]
    token = otel_context.attach(otel_context.Context())
    try:
        yield app
    finally:
        otel_context.detach(token)
        instrumentor.uninstrument_app(app)  # type: ignore[no-untyped-call]
        engine.dispose()


def test_flask_transaction_span_is_a_child_of_the_request_span(
    otel: Recorded, flask_app: Flask, database_file: Path
) -> None:
    """A Flask request that commits: its transaction span, committed, is a child of Flask's request span."""
    response = flask_app.test_client().post("/skus/a")
    assert 201 == response.status_code
    assert [(SYNC_UNIT, "POST /skus/<code>"), ("POST /skus/<code>", None)] == otel.tree()
    assert SpanKind.SERVER == otel.span("POST /skus/<code>").kind
    transaction = otel.span(SYNC_UNIT)
    assert committed(SYNC_UNIT) == attributes(transaction)
    assert ["uow.commit"] == events(transaction)
    assert_no_span_current()
    assert ["a"] == committed_codes(database_file)


def test_flask_failed_request_rolls_back_under_the_request_span(
    otel: Recorded, flask_app: Flask, database_file: Path
) -> None:
    """A Flask view that raises: its transaction span, rolled back, is still a child of the request span."""
    response = flask_app.test_client().post("/skus/a/fail")
    assert 500 == response.status_code
    assert [(SYNC_UNIT, "POST /skus/<code>/fail"), ("POST /skus/<code>/fail", None)] == otel.tree()
    transaction = otel.span(SYNC_UNIT)
    assert rolled_back(SYNC_UNIT) == attributes(transaction)
    assert (StatusCode.ERROR, "Boom: a") == status(transaction)
    assert_no_span_current()
    assert [] == committed_codes(database_file)


def test_flask_requests_of_one_thread_are_traces_of_their_own(
    otel: Recorded, flask_app: Flask, database_file: Path
) -> None:
    """Two requests in one thread, in either order of setup: two traces, each transaction under its own request."""
    client = flask_app.test_client()
    assert [201, 201] == [client.post(f"/skus/{code}").status_code for code in ("a", "b")]
    tree = [(SYNC_UNIT, "POST /skus/<code>"), ("POST /skus/<code>", None)]
    assert tree * 2 == otel.tree()
    assert 2 == len({span.context.trace_id for span in otel.spans()})
    assert_no_span_current()
    assert ["a", "b"] == committed_codes(database_file)


def test_flask_hooks_of_the_app_keep_their_order_against_the_extension(otel: Recorded, database_file: Path) -> None:
    """Hooks the app registered between init_app() and instrument_app() still run inside the request's unit of work."""
    engine = create_engine(f"sqlite:///{database_file}")
    ext: UnitOfWorkExtension[ShopUnitOfWork] = UnitOfWorkExtension(
        factory=SqlAlchemyShopUnitOfWork, commit="on_success"
    )
    app = Flask(__name__)
    ext.init_app(app, engine=engine)
    seen: list[str] = []

    @app.before_request
    def audit_before() -> None:
        seen.append(f"before: active={ext.uow.active}")

    @app.teardown_request
    def audit_teardown(exc: BaseException | None) -> None:
        seen.append(f"teardown: active={ext.uow.active}")  # runs before the extension's own teardown

    @app.post("/skus/<code>")
    def add(code: str) -> tuple[str, int]:
        ext.uow.skus.add(Sku(code))
        return code, 201

    instrumentor = FlaskInstrumentor()
    instrumentor.instrument_app(app, tracer_provider=otel.tracer_provider)  # type: ignore[no-untyped-call]
    token = otel_context.attach(otel_context.Context())
    try:
        assert 201 == app.test_client().post("/skus/a").status_code
    finally:
        otel_context.detach(token)
        instrumentor.uninstrument_app(app)  # type: ignore[no-untyped-call]
        engine.dispose()
    assert ["before: active=True", "teardown: active=False"] == seen
    assert [(SYNC_UNIT, "POST /skus/<code>"), ("POST /skus/<code>", None)] == otel.tree()
    assert ["a"] == committed_codes(database_file)


# -- Starlette ---------------------------------------------------------------------------------------------


def starlette_app(otel: Recorded, async_engine: AsyncEngine) -> ASGIApp:
    """A Starlette app with uow's middleware, wrapped in OpenTelemetry's ASGI middleware on the test's provider."""

    async def add(request: StarletteRequest) -> PlainTextResponse:
        code = request.path_params["code"]
        await uow.current(AsyncSqlAlchemyShopUnitOfWork).skus.add(Sku(code))
        return PlainTextResponse(code, status_code=201)

    async def fail(request: StarletteRequest) -> PlainTextResponse:
        unit = uow.current(AsyncSqlAlchemyShopUnitOfWork)
        await unit.skus.add(Sku(request.path_params["code"]))
        raise Boom(request.path_params["code"])

    app = Starlette(
        routes=[Route("/skus/{code}", add, methods=["POST"]), Route("/skus/{code}/fail", fail, methods=["POST"])],
        middleware=[
            Middleware(
                UnitOfWorkMiddleware, factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine), commit="on_success"
            )
        ],
    )
    return OpenTelemetryMiddleware(app, tracer_provider=otel.tracer_provider)


# -- FastAPI -----------------------------------------------------------------------------------------------


def fastapi_app(otel: Recorded, async_engine: AsyncEngine) -> ASGIApp:
    """A FastAPI app whose endpoints take uow's dependency, wrapped in OpenTelemetry's ASGI middleware."""

    def make_uow(request: Request) -> AsyncSqlAlchemyShopUnitOfWork:
        return AsyncSqlAlchemyShopUnitOfWork(async_engine)

    UnitOfWork = Annotated[AsyncSqlAlchemyShopUnitOfWork, uow.fastapi.depends(make_uow, commit="on_success")]
    app = FastAPI()

    @app.post("/skus/{code}", status_code=201)
    async def add(code: str, unit: UnitOfWork) -> str:
        await unit.skus.add(Sku(code))
        return code

    @app.post("/skus/{code}/fail")
    async def fail(code: str, unit: UnitOfWork) -> str:
        await unit.skus.add(Sku(code))
        raise Boom(code)

    return OpenTelemetryMiddleware(app, tracer_provider=otel.tracer_provider)


# -- Litestar ----------------------------------------------------------------------------------------------


def litestar_app(otel: Recorded, async_engine: AsyncEngine) -> Litestar:
    """A Litestar app with uow's plugin and Litestar's OpenTelemetry plugin, on the test's provider."""

    @post("/skus/{code:str}", status_code=201)
    async def add(code: FromPath[str], uow: NamedDependency[AsyncSqlAlchemyShopUnitOfWork]) -> str:
        await uow.skus.add(Sku(code))
        return code

    @post("/skus/{code:str}/fail")
    async def fail(code: FromPath[str], uow: NamedDependency[AsyncSqlAlchemyShopUnitOfWork]) -> str:
        await uow.skus.add(Sku(code))
        raise Boom(code)

    return Litestar(
        route_handlers=[add, fail],
        plugins=[
            UnitOfWorkPlugin(lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine), commit="on_success"),
            OpenTelemetryPlugin(OpenTelemetryConfig(tracer_provider=otel.tracer_provider)),
        ],
    )


#: Per ASGI framework: the fixture of its app, and the error status of a request's transaction whose endpoint
#: raised Boom. Litestar answers the exception with a 500 inside uow's middleware: the 500 ends the unit of work.
ASGI_APPS: dict[str, tuple[Callable[[Recorded, AsyncEngine], ASGIApp | Litestar], str]] = {
    "starlette": (starlette_app, "Boom: a"),
    "fastapi": (fastapi_app, "Boom: a"),
    "litestar": (litestar_app, "ErrorResponse: 500"),
}


@pytest.fixture(name="asgi_app", params=list(ASGI_APPS))
def _asgi_app(
    request: pytest.FixtureRequest, otel: Recorded, async_engine: AsyncEngine
) -> tuple[ASGIApp | Litestar, str]:
    """Each ASGI framework's app in turn, with the error status its failed request's transaction gets."""
    build, described = ASGI_APPS[request.param]
    return build(otel, async_engine), described


async def test_asgi_transaction_span_is_a_child_of_the_request_span(
    otel: Recorded, asgi_app: tuple[ASGIApp | Litestar, str], database_file: Path
) -> None:
    """A request that commits, on Starlette, FastAPI and Litestar: its transaction span is the server span's child."""
    async with client(asgi_app[0]) as http:
        response = await http.post("/skus/a")
    assert 201 == response.status_code
    assert asgi_tree("/skus/a") == otel.tree()
    assert SpanKind.SERVER == otel.span("POST /skus/a").kind
    transaction = otel.span(ASYNC_UNIT)
    assert committed(ASYNC_UNIT) == attributes(transaction)
    assert ["uow.commit"] == events(transaction)
    assert_no_span_current()
    assert ["a"] == committed_codes(database_file)


async def test_asgi_failed_request_rolls_back_under_the_request_span(
    otel: Recorded, asgi_app: tuple[ASGIApp | Litestar, str], database_file: Path
) -> None:
    """An endpoint that raises, on each ASGI framework: its rolled-back transaction span is the server span's child."""
    app, described = asgi_app
    async with client(app) as http:
        response = await http.post("/skus/a/fail")
    assert 500 == response.status_code
    assert asgi_tree("/skus/a/fail") == otel.tree()
    transaction = otel.span(ASYNC_UNIT)
    assert rolled_back(ASYNC_UNIT) == attributes(transaction)
    assert (StatusCode.ERROR, described) == status(transaction)
    assert_no_span_current()
    assert [] == committed_codes(database_file)
