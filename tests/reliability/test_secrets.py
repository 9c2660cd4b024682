"""Secrets: the password of a database URL never shows in what uow prints, logs or raises.

Every engine here is built from a URL that holds a distinctive password
(PostgreSQL trusts local connections, so it is never checked, and the
engines connect). The tests then look for that password in the ``repr()``
and ``str()`` of every public uow object built on such an engine, in every
record the ``uow`` loggers emit at DEBUG level during a run that commits,
rolls back, retries and runs a failing hook, and in the message, the repr
and the whole formatted traceback of every uow error such an engine lets
a test provoke, a refused connection included. One test proves that the
search finds the password where it is, so that none of them passes for
want of looking.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Annotated, Any

import attrs
import httpx
import pytest
from fastapi import FastAPI
from flask import Flask
from sqlalchemy import URL, Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import uow
import uow.fastapi
from tests.support.databases import Database, Provisioner
from tests.support.models import Item, Sku
from tests.support.uows import (
    AsyncShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    ShopUnitOfWork,
    SqlAlchemyShopUnitOfWork,
)
from uow import errors
from uow.flask import UnitOfWorkExtension
from uow.starlette import UnitOfWorkMiddleware

#: The password every URL of this module holds; it must never be shown.
PASSWORD = "S3cretPassw0rd"

#: How long a thread may take before the test gives up on it: a hang guard, never asserted.
TIMEOUT = 30.0

#: A port nothing listens on, for a connection that is refused.
CLOSED_PORT = 1


class Boom(Exception):
    """Raised by service code inside a block."""


class SerializationFailure(Exception):
    """Stands for a driver's error; psycopg's carry the SQLSTATE like this."""

    sqlstate = "40001"


def shown(*texts: str) -> list[str]:
    """The texts among *texts* that show the password."""
    return [text for text in texts if PASSWORD in text]


def faces(obj: object) -> list[str]:
    """What a user may see of *obj*: its repr, its str, and the reprs of its attributes."""
    texts = [repr(obj), str(obj)]
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict):
        texts += [repr(value) for value in attributes.values()]
    return texts


def error_texts(error: BaseException) -> list[str]:
    """What a user may see of *error*: its message, its repr and its whole formatted traceback, causes included."""
    return [str(error), repr(error), "".join(traceback.format_exception(error))]


@attrs.frozen
class Secrets:
    """Engines and URLs of this test, all holding the password."""

    #: The URL as an object, which SQLAlchemy prints with the password hidden, and as the string a config holds.
    url: URL
    url_string: str
    async_url_string: str
    engine: Engine
    async_engine: AsyncEngine


@pytest.fixture
async def secrets(pg_engine: Engine, pg_database: Database, provisioner: Provisioner) -> AsyncIterator[Secrets]:
    """Engines on this run's PostgreSQL database, on emptied tables, built from URLs that hold the password."""
    url = pg_database.url.set(password=PASSWORD)
    async_url = pg_database.async_url.set(password=PASSWORD)
    async_engine = create_async_engine(async_url)
    yield Secrets(
        url=url,
        url_string=url.render_as_string(hide_password=False),
        async_url_string=async_url.render_as_string(hide_password=False),
        engine=provisioner.track(create_engine(url)),
        async_engine=async_engine,
    )
    assert 0 == async_engine.pool.checkedout()
    await async_engine.dispose()


@pytest.fixture
def uow_records() -> Iterator[list[logging.LogRecord]]:
    """Every record of the ``uow`` loggers, at DEBUG level, while the test runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("uow")
    handler = Keep(logging.DEBUG)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def formatted(records: list[logging.LogRecord]) -> list[str]:
    """The records as a handler would write them, tracebacks included, with the fields uow passes in ``extra``."""
    formatter = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    fields = [{key: value for key, value in vars(record).items() if key.startswith("uow_")} for record in records]
    return [f"{formatter.format(record)} {extra!r}" for record, extra in zip(records, fields, strict=True)]


def events_logged(records: list[logging.LogRecord]) -> set[str]:
    """The ``uow_event`` fields of the structured records: what the search above read."""
    return {str(getattr(record, "uow_event", "")) for record in records} - {""}


def flask_app(url: str | URL, **config: object) -> tuple[Flask, UnitOfWorkExtension[SqlAlchemyShopUnitOfWork]]:
    """A Flask app whose extension builds its engine from *url*, and a view that commits a Sku."""
    ext: UnitOfWorkExtension[SqlAlchemyShopUnitOfWork] = UnitOfWorkExtension(
        factory=SqlAlchemyShopUnitOfWork, commit="on_success"
    )
    app = Flask("secrets")
    app.config["UOW_DATABASE_URL"] = url
    app.config.update(config)
    ext.init_app(app)

    @app.post("/skus/<code>")
    def add_sku(code: str) -> dict[str, str]:
        ext.uow.skus.add(Sku(code))
        return {"added": code}

    return app, ext


def dispose_flask(app: Flask, ext: UnitOfWorkExtension[Any]) -> None:
    with app.app_context():
        ext.engine.dispose()


@contextlib.contextmanager
def running_flask_app(url: str | URL) -> Iterator[tuple[Flask, UnitOfWorkExtension[SqlAlchemyShopUnitOfWork]]]:
    """The app and extension of flask_app(), its engine disposed of at the end of the block."""
    app, ext = flask_app(url)
    try:
        yield app, ext
    finally:
        dispose_flask(app, ext)


def make_request_uow(request: Request) -> AsyncSqlAlchemyShopUnitOfWork:
    """The FastAPI factory: a unit of work over the app's engine."""
    return AsyncSqlAlchemyShopUnitOfWork(request.app.state.engine)


DEPENDENCY = uow.fastapi.depends(make_request_uow, commit="on_success")
RequestUnit = Annotated[AsyncShopUnitOfWork, DEPENDENCY]


# -- the check itself -------------------------------------------------------------


def test_the_search_finds_a_password_in_plain_sight(pg_database: Database) -> None:
    """The search finds the password where a URL shows it, and not where SQLAlchemy hides it."""
    url = pg_database.url.set(password=PASSWORD)
    plain = url.render_as_string(hide_password=False)
    error = ConnectionError(f"cannot reach {plain}")
    assert [plain] == shown(plain, str(url), repr(url))
    assert 3 == len(shown(*error_texts(error)))
    assert 1 == len(shown(*formatted([logging.LogRecord("uow", logging.INFO, __file__, 1, "%s", (plain,), None)])))


# -- reprs --------------------------------------------------------------------------


def test_sync_unit_of_work_repository_and_blocks_hide_the_password(secrets: Secrets) -> None:
    """repr() and str() of a SqlAlchemyUnitOfWork, idle and active, its repository and its blocks hide it."""
    unit = SqlAlchemyShopUnitOfWork(secrets.engine)
    seen = [*faces(unit)]
    transaction = unit.transaction(propagation="required", isolation_level="REPEATABLE READ")
    savepoint = unit.savepoint()
    seen += faces(transaction) + faces(savepoint)
    with transaction:
        repo = unit.skus
        repo.add(Sku("LAMP"))
        with savepoint:
            seen += faces(unit) + faces(repo) + faces(transaction) + faces(savepoint)
        unit.commit()
    seen += faces(unit) + faces(repo)
    assert [] == shown(*seen)
    assert 1 == unit.commits


async def test_async_unit_of_work_repository_and_blocks_hide_the_password(secrets: Secrets) -> None:
    """repr() and str() of an AsyncSqlAlchemyUnitOfWork, idle and active, its repository and its blocks hide it."""
    unit = AsyncSqlAlchemyShopUnitOfWork(secrets.async_engine)
    seen = [*faces(unit)]
    transaction = unit.transaction(read_only=False)
    savepoint = unit.savepoint()
    seen += faces(transaction) + faces(savepoint)
    async with transaction:
        repo = unit.skus
        await repo.add(Sku("LAMP"))
        async with savepoint:
            seen += faces(unit) + faces(repo) + faces(transaction) + faces(savepoint)
        await unit.commit()
    seen += faces(unit) + faces(repo)
    assert [] == shown(*seen)
    assert 1 == unit.commits


def test_transactional_decorators_and_decorated_functions_hide_the_password(secrets: Secrets) -> None:
    """The Transactional objects, configured with factories over the engine, and the functions they decorate hide it."""
    factory = functools.partial(SqlAlchemyShopUnitOfWork, secrets.engine)
    tx = uow.transactional(factory=factory)
    retrying = tx(retries=uow.Retry(retries=2, sleep=lambda _: None), isolation_level="READ COMMITTED")

    @retrying
    def add_sku(code: str, uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        uow.skus.add(Sku(code))

    @tx
    async def count_skus(uow: AsyncShopUnitOfWork = uow.NEW_UOW) -> int:
        return await uow.skus.count()

    add_sku("LAMP")
    assert [] == shown(*faces(tx), *faces(retrying), *faces(add_sku), *faces(count_skus), *faces(uow.NEW_UOW))


def test_flask_extension_hides_the_password(secrets: Secrets) -> None:
    """The Flask extension configured with UOW_DATABASE_URL holding the password, and its engine, hide it."""
    with running_flask_app(secrets.url_string) as (app, ext):
        response = app.test_client().post("/skus/LAMP")
        assert 200 == response.status_code
        with app.app_context():
            seen = faces(ext) + faces(ext.engine) + faces(app.extensions["uow"]) + faces(ext.uow)
        assert [] == shown(*seen, response.get_data(as_text=True))


async def test_fastapi_dependency_and_starlette_middleware_hide_the_password(secrets: Secrets) -> None:
    """uow.fastapi.depends() and UnitOfWorkMiddleware over the engine, and requests through them, hide it."""
    api = FastAPI()
    api.state.engine = secrets.async_engine

    @api.post("/skus/{code}")
    async def add_sku(code: str, unit: RequestUnit) -> dict[str, str]:
        await unit.skus.add(Sku(code))
        return {"added": code, "unit": repr(unit)}

    factory = functools.partial(AsyncSqlAlchemyShopUnitOfWork, secrets.async_engine)

    async def count(request: Request) -> JSONResponse:
        unit = uow.current(AsyncShopUnitOfWork)
        return JSONResponse({"count": await unit.skus.count(), "unit": repr(unit)})

    declared = Middleware(UnitOfWorkMiddleware, factory=factory, commit="on_success")
    site = Starlette(routes=[Route("/skus", count)], middleware=[declared])
    middleware = UnitOfWorkMiddleware(site, factory=factory)

    answers = []
    for app, method, path in ((api, "POST", "/skus/LAMP"), (site, "GET", "/skus")):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as client:
            answers.append(await client.request(method, path))
    assert [200, 200] == [answer.status_code for answer in answers]
    seen = faces(DEPENDENCY) + faces(DEPENDENCY.dependency) + faces(declared) + faces(middleware) + faces(factory)
    assert [] == shown(*seen, *(answer.text for answer in answers))


# -- logs -----------------------------------------------------------------------------


def failing_hook() -> None:
    raise ConnectionError("the mail server is down")


def test_sync_run_logs_no_password(secrets: Secrets, uow_records: list[logging.LogRecord]) -> None:
    """A sync run that commits, rolls back, retries twice and runs a failing robust hook logs no password."""
    unit = SqlAlchemyShopUnitOfWork(secrets.engine)
    with unit:
        unit.skus.add(Sku("LAMP"))
        unit.on_commit(failing_hook, robust=True)
        unit.commit()
    with pytest.raises(Boom), unit:
        unit.skus.add(Sku("DESK"))
        raise Boom
    attempts = []

    @uow.transactional(
        factory=lambda: SqlAlchemyShopUnitOfWork(secrets.engine), retries=uow.Retry(retries=2, sleep=lambda _: None)
    )
    def add_rug(uow: ShopUnitOfWork = uow.NEW_UOW) -> None:
        attempts.append(len(attempts))
        uow.skus.add(Sku(f"RUG-{len(attempts)}"))
        if len(attempts) < 3:
            raise OperationalError("UPDATE uow_skus ...", {}, SerializationFailure("could not serialize access"))

    add_rug()
    with running_flask_app(secrets.url_string) as (app, _):
        assert 200 == app.test_client().post("/skus/VASE").status_code
    messages = [record.getMessage() for record in uow_records]
    assert 2 == sum(" retry " in message for message in messages)
    assert 1 == sum("on_commit hook" in message for message in messages)
    assert {"begin", "commit", "rollback", "retry"} == events_logged(uow_records)
    assert [] == shown(*formatted(uow_records))


async def test_async_run_logs_no_password(secrets: Secrets, uow_records: list[logging.LogRecord]) -> None:
    """An async run that commits, rolls back, retries twice and runs a failing robust hook logs no password."""
    unit = AsyncSqlAlchemyShopUnitOfWork(secrets.async_engine)
    async with unit:
        await unit.skus.add(Sku("LAMP"))
        unit.on_commit(failing_hook, robust=True)
        await unit.commit()
    with pytest.raises(Boom):
        async with unit:
            await unit.skus.add(Sku("DESK"))
            raise Boom
    attempts = []

    async def no_pause(_: float) -> None:
        """Retries do not wait here."""

    @uow.transactional(
        factory=lambda: AsyncSqlAlchemyShopUnitOfWork(secrets.async_engine),
        retries=uow.Retry(retries=2, sleep=no_pause),
    )
    async def add_rug(uow: AsyncShopUnitOfWork = uow.NEW_UOW) -> None:
        attempts.append(len(attempts))
        await uow.skus.add(Sku(f"RUG-{len(attempts)}"))
        if len(attempts) < 3:
            raise OperationalError("UPDATE uow_skus ...", {}, SerializationFailure("could not serialize access"))

    await add_rug()
    messages = [record.getMessage() for record in uow_records]
    assert 2 == sum(" retry " in message for message in messages)
    assert 1 == sum("on_commit hook" in message for message in messages)
    assert {"begin", "commit", "rollback", "retry"} == events_logged(uow_records)
    assert [] == shown(*formatted(uow_records))


# -- errors ---------------------------------------------------------------------------

Provoke = Callable[[Secrets], Awaitable[BaseException]]
CASES: dict[str, tuple[type[BaseException], Provoke]] = {}


def case(name: str, expected: type[BaseException]) -> Callable[[Provoke], Provoke]:
    """Register a way to provoke an *expected* error with the engines of this module."""

    def register(provoke: Provoke) -> Provoke:
        CASES[name] = (expected, provoke)
        return provoke

    return register


def raising_calls(expected: type[BaseException], *calls: tuple[str, Callable[[Secrets], object]]) -> None:
    """Register each named call as a case: the *expected* error is what it raises, or what it returns when awaited."""
    for name, call in calls:
        CASES[name] = (expected, functools.partial(raised_by, expected, call))


async def raised_by(expected: type[BaseException], call: Callable[[Secrets], object], s: Secrets) -> BaseException:
    """The *expected* error that *call* raises given *s*, or that what it returns raises when awaited."""
    with pytest.raises(expected) as raised:
        outcome = call(s)
        if inspect.isawaitable(outcome):
            await outcome
    return raised.value


def raising_in_async_block(
    name: str,
    expected: type[BaseException],
    action: Callable[[AsyncShopUnitOfWork], Awaitable[object]],
    before: Callable[[AsyncShopUnitOfWork], object] = lambda unit: None,
) -> None:
    """Register a case whose *expected* error is what *action* raises, awaited in a block of an async unit of work.

    The block first calls *before*, which must not raise.
    """

    async def provoke(s: Secrets) -> BaseException:
        unit = AsyncSqlAlchemyShopUnitOfWork(s.async_engine)
        async with unit:
            before(unit)
            with pytest.raises(expected) as raised:
                await action(unit)
        return raised.value

    CASES[name] = (expected, provoke)


def enter(block: AbstractContextManager[object]) -> None:
    """Enter *block* and leave it at once."""
    with block:
        pass


async def aenter(block: AbstractAsyncContextManager[object]) -> None:
    """Enter the async *block* and leave it at once."""
    async with block:
        pass


raising_calls(
    errors.InactiveUnitOfWorkError,
    (
        "inactive: repository outside a block",
        lambda s: SqlAlchemyShopUnitOfWork(s.engine).skus.count(),
    ),
    (
        "inactive: mandatory on an idle async unit of work",
        lambda s: aenter(AsyncSqlAlchemyShopUnitOfWork(s.async_engine).transaction(propagation="mandatory")),
    ),
)


@case("inactive: Flask ext.uow outside an application context", errors.InactiveUnitOfWorkError)
async def _(s: Secrets) -> BaseException:
    with running_flask_app(s.url_string) as (_, ext), pytest.raises(errors.InactiveUnitOfWorkError) as raised:
        ext.uow  # the access is what raises
    return raised.value


@case("active: propagation never inside a block", errors.ActiveUnitOfWorkError)
async def _(s: Secrets) -> BaseException:
    unit = SqlAlchemyShopUnitOfWork(s.engine)
    with unit, pytest.raises(errors.ActiveUnitOfWorkError) as raised, unit.transaction(propagation="never"):
        pass
    return raised.value


raising_calls(
    errors.ConfigurationError,
    (
        "configuration: unknown propagation",
        lambda s: enter(SqlAlchemyShopUnitOfWork(s.engine).transaction(propagation="sometimes")),  # type: ignore[arg-type]
    ),
    (
        "configuration: unknown isolation level",
        lambda s: aenter(AsyncSqlAlchemyShopUnitOfWork(s.async_engine).transaction(isolation_level="SNAPSHOT")),
    ),
    (
        "configuration: sync unit of work given the async engine",
        lambda s: SqlAlchemyShopUnitOfWork(s.async_engine),  # type: ignore[arg-type]
    ),
    (
        "configuration: async unit of work given the sync engine",
        lambda s: AsyncSqlAlchemyShopUnitOfWork(s.engine),  # type: ignore[arg-type]
    ),
    (
        "configuration: unit of work given the URL object",
        lambda s: SqlAlchemyShopUnitOfWork(s.url),  # type: ignore[arg-type]
    ),
    (
        "configuration: unit of work given the URL string",
        lambda s: SqlAlchemyShopUnitOfWork(s.url_string),  # type: ignore[arg-type]
    ),
    (
        "configuration: async unit of work given the URL string",
        lambda s: AsyncSqlAlchemyShopUnitOfWork(s.async_url_string),  # type: ignore[arg-type]
    ),
    (
        "configuration: transactional factory given the URL string",
        lambda s: uow.transactional(factory=s.url_string),  # type: ignore[arg-type]
    ),
    (
        "configuration: transactional applied to the URL string",
        lambda s: uow.transactional(s.url_string),
    ),
)


@case("configuration: decorated function given the URL string as its unit of work", errors.ConfigurationError)
async def _(s: Secrets) -> BaseException:
    @uow.transactional
    def count_skus(uow: ShopUnitOfWork = uow.NEW_UOW) -> int:
        return uow.skus.count()

    with pytest.raises(errors.ConfigurationError) as raised:
        count_skus(uow=s.url_string)
    return raised.value


raising_calls(
    errors.ConfigurationError,
    (
        "configuration: transactional given a bad retries",
        lambda s: uow.transactional(factory=functools.partial(SqlAlchemyShopUnitOfWork, s.engine), retries=-1),
    ),
)


@case("configuration: Flask init_app twice", errors.ConfigurationError)
async def _(s: Secrets) -> BaseException:
    with running_flask_app(s.url_string) as (app, ext), pytest.raises(errors.ConfigurationError) as raised:
        ext.init_app(app)
    return raised.value


raising_calls(
    errors.ConfigurationError,
    (
        "configuration: Flask bad UOW_ENGINE_OPTIONS",
        lambda s: flask_app(s.url_string, UOW_ENGINE_OPTIONS={"pool_sizes": 3}),
    ),
    (
        "configuration: Flask UOW_DATABASE_URL that does not parse",
        lambda s: flask_app(s.url_string.replace("://", ":/")),
    ),
    (
        "configuration: Flask factory given the URL string",
        lambda s: UnitOfWorkExtension(factory=s.url_string),  # type: ignore[arg-type]
    ),
)


@case("configuration: Flask factory of an async unit of work", errors.ConfigurationError)
async def _(s: Secrets) -> BaseException:
    ext = UnitOfWorkExtension(factory=lambda _: AsyncSqlAlchemyShopUnitOfWork(s.async_engine))  # type: ignore[arg-type, return-value]
    app = Flask("secrets")
    app.config["UOW_DATABASE_URL"] = s.url_string
    ext.init_app(app)
    try:
        with app.app_context(), pytest.raises(errors.ConfigurationError) as raised:
            ext.uow  # the access is what raises
    finally:
        dispose_flask(app, ext)
    return raised.value


raising_calls(
    errors.ConfigurationError,
    (
        "configuration: FastAPI depends given the URL string",
        lambda s: uow.fastapi.depends(s.async_url_string),  # type: ignore[arg-type]
    ),
    (
        "configuration: Starlette middleware given the URL string",
        lambda s: UnitOfWorkMiddleware(Starlette(), factory=s.async_url_string),  # type: ignore[arg-type]
    ),
)


@case("ownership: used from another thread", errors.OwnershipError)
async def _(s: Secrets) -> BaseException:
    unit = SqlAlchemyShopUnitOfWork(s.engine)
    caught: list[BaseException] = []

    def elsewhere() -> None:
        try:
            unit.skus.count()
        except errors.OwnershipError as error:
            caught.append(error)

    with unit:
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(TIMEOUT)
    assert 1 == len(caught)
    return caught[0]


@case("joined scope: session.commit()", errors.JoinedScopeError)
async def _(s: Secrets) -> BaseException:
    unit = SqlAlchemyShopUnitOfWork(s.engine)
    with unit, unit, pytest.raises(errors.JoinedScopeError) as raised:
        unit.session.commit()
    return raised.value


@case("joined scope: rollback() in a savepoint", errors.JoinedScopeError)
async def _(s: Secrets) -> BaseException:
    unit = AsyncSqlAlchemyShopUnitOfWork(s.async_engine)
    async with unit, unit.savepoint():
        with pytest.raises(errors.JoinedScopeError) as raised:
            await unit.rollback()
    return raised.value


@case("rollback-only: a joined scope raised", errors.RollbackOnlyError)
async def _(s: Secrets) -> BaseException:
    unit = SqlAlchemyShopUnitOfWork(s.engine)
    with pytest.raises(errors.RollbackOnlyError) as raised, unit:
        unit.skus.add(Sku("LAMP"))
        with pytest.raises(Boom), unit:
            raise Boom("the joined scope failed")
    return raised.value


raising_in_async_block(
    "rollback-only: commit after set_rollback_only()",
    errors.RollbackOnlyError,
    lambda unit: unit.commit(),
    before=lambda unit: unit.set_rollback_only(),
)


@case("read-only: a write in a read-only transaction", errors.ReadOnlyError)
async def _(s: Secrets) -> BaseException:
    unit = SqlAlchemyShopUnitOfWork(s.engine)
    with unit.transaction(read_only=True):
        unit.skus.add(Sku("LAMP"))
        with pytest.raises(errors.ReadOnlyError) as raised:
            unit.skus.count()
    return raised.value


@case("unknown field: a filter on no column", errors.UnknownFieldError)
async def _(s: Secrets) -> BaseException:
    unit = SqlAlchemyShopUnitOfWork(s.engine)
    with unit, pytest.raises(errors.UnknownFieldError) as raised:
        unit.skus.get_by(colour="red")
    return raised.value


raising_in_async_block(
    "model type: an Item given to the Sku repository",
    errors.ModelTypeError,
    lambda unit: unit.skus.add(Item("lamp")),  # type: ignore[arg-type]
)


@case("multiple results: get_by() matching two rows", errors.MultipleResultsError)
async def _(s: Secrets) -> BaseException:
    unit = SqlAlchemyShopUnitOfWork(s.engine)
    with unit:
        unit.skus.add_all([Sku("LAMP", "same"), Sku("DESK", "same")])
        with pytest.raises(errors.MultipleResultsError) as raised:
            unit.skus.get_by(description="same")
    return raised.value


raising_in_async_block(
    "query: order_by a column of another model",
    errors.QueryError,
    lambda unit: unit.skus.list(order_by=Item.name),
)


async def _publish_unwritable(unit: AsyncShopUnitOfWork) -> None:
    unit.publish("orders", object())


raising_in_async_block("outbox: a payload the serializer cannot write", errors.OutboxError, _publish_unwritable)


@case("concurrency: update of a row another transaction deleted", errors.ConcurrencyError)
async def _(s: Secrets) -> BaseException:
    unit = SqlAlchemyShopUnitOfWork(s.engine)
    with unit:
        unit.skus.add(Sku("GONE"))
        unit.commit()
    with pytest.raises(errors.ConcurrencyError) as raised, unit:
        unit.skus.get("GONE").stock = 5
        with s.engine.begin() as other:
            other.execute(text("DELETE FROM uow_skus WHERE code = 'GONE'"))
        unit.commit()
    return raised.value


raising_in_async_block(
    "not in repository: remove() of an object never loaded",
    errors.NotInRepositoryError,
    lambda unit: unit.skus.remove(Sku("LAMP")),
)


@case("connection refused: sync unit of work", OperationalError)
async def _(s: Secrets) -> BaseException:
    engine = create_engine(s.url.set(port=CLOSED_PORT))
    try:
        with pytest.raises(OperationalError) as raised, SqlAlchemyShopUnitOfWork(engine) as unit:
            unit.skus.count()
    finally:
        engine.dispose()
    return raised.value


@case("connection refused: async unit of work", OSError)
async def _(s: Secrets) -> BaseException:
    engine = create_async_engine(s.async_url_string.replace(":5432/", f":{CLOSED_PORT}/"))
    try:
        with pytest.raises(OSError, match="Connect call failed|refused") as raised:
            async with AsyncSqlAlchemyShopUnitOfWork(engine) as unit:
                await unit.skus.count()
    finally:
        await engine.dispose()
    return raised.value


@case("connection refused: @transactional with retries", OperationalError)
async def _(s: Secrets) -> BaseException:
    engine = create_engine(s.url.set(port=CLOSED_PORT))

    @uow.transactional(factory=lambda: SqlAlchemyShopUnitOfWork(engine), retries=uow.Retry(sleep=lambda _: None))
    def count_skus(uow: ShopUnitOfWork = uow.NEW_UOW) -> int:
        return uow.skus.count()

    try:
        with pytest.raises(OperationalError) as raised:
            count_skus()
    finally:
        engine.dispose()
    return raised.value


#: The cases whose error shows the password: a rejected argument echoed back with repr(), here a URL string.


@pytest.mark.parametrize("name", [pytest.param(name, id=name.replace(": ", "-").replace(" ", "-")) for name in CASES])
async def test_errors_hide_the_password(name: str, secrets: Secrets) -> None:
    """The message, repr and formatted traceback of each error uow raises on such engines hide the password."""
    expected, provoke = CASES[name]
    error = await provoke(secrets)
    assert isinstance(error, expected)
    assert [] == shown(*error_texts(error))


def test_the_error_cases_cover_every_uow_error() -> None:
    """The error cases provoke every error type of uow.errors, and a refused connection."""
    provoked = {expected.__name__ for expected, _ in CASES.values()}
    # FakeDatabaseError comes from the fake only, which has no URL and so no password to show.
    declared = {name for name in errors.__all__ if name not in ("UowError", "is_retryable", "FakeDatabaseError")}
    assert declared | {"OperationalError", "OSError"} == provoked
