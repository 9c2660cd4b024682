"""The FastAPI dependency on real databases, through httpx's ASGI client: async and sync endpoints."""

# No `from __future__ import annotations` here: FastAPI reads the annotations of the endpoints, which are
# defined inside the functions that build each application, and a string annotation would be looked up in
# this module's globals instead.

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

import uow
import uow.fastapi
from tests.integration.conftest import rows
from tests.integration.test_starlette import (
    TIMEOUT,
    Boom,
    _async_engine,  # noqa: F401 - a fixture
    _current_or_none,
    _refs_table,  # noqa: F401 - a fixture
    checked_out,
    client,
    conflict,
    enforce_foreign_keys,
    item_names,
    lifespan,
    recording_commits,
    recording_order,
    refs,
    send_mixed_requests,
    strict_client,
)
from tests.support.databases import Database, Provisioner
from tests.support.models import Item, Note
from tests.support.uows import (
    AsyncFakeShopUnitOfWork,
    AsyncShopUnitOfWork,
    AsyncSqlAlchemyShopUnitOfWork,
    FakeShopUnitOfWork,
    ShopUnitOfWork,
    SqlAlchemyShopUnitOfWork,
)
from uow import NEW_UOW, errors, transactional
from uow.starlette import CommitPolicy, UnitOfWorkMiddleware

ON_DATABASES = pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(name="sync_engine")
def _sync_engine(database: Database, engine: Engine, refs_table: object, provisioner: Provisioner) -> Iterator[Engine]:
    """A sync engine of the test's own on the run's database, with foreign keys on."""
    eng = provisioner.track(database.engine())
    enforce_foreign_keys(eng)
    try:
        yield eng
    finally:
        eng.dispose()


# -- the factories: FastAPI dependencies that read the engine from the application ---------


def make_uow(request: Request) -> AsyncSqlAlchemyShopUnitOfWork:
    """A new async unit of work on the application's engine."""
    request.app.state.factory_calls += 1
    return AsyncSqlAlchemyShopUnitOfWork(request.app.state.engine)


def make_sync_uow(request: Request) -> SqlAlchemyShopUnitOfWork:
    """A new sync unit of work on the application's sync engine."""
    return SqlAlchemyShopUnitOfWork(request.app.state.sync_engine)


ExplicitUnitOfWork = Annotated[AsyncShopUnitOfWork, uow.fastapi.depends(make_uow)]
OnSuccessUnitOfWork = Annotated[AsyncShopUnitOfWork, uow.fastapi.depends(make_uow, commit="on_success")]
SyncUnitOfWork = Annotated[ShopUnitOfWork, Depends(make_sync_uow)]


@transactional
async def add_note(text: str, uow: AsyncShopUnitOfWork = NEW_UOW) -> AsyncShopUnitOfWork:
    """A service that needs an active unit of work: it has no factory."""
    await uow.notes.add(Note(text=text))
    return uow


class Recorder:
    """What the application's code saw."""

    def __init__(self) -> None:
        #: The unit of work of each request, as its endpoint got it.
        self.units: list[Any] = []
        #: For each background task and lifespan hook: its unit of work, and what uow.current() returned in it.
        self.background: list[tuple[Any, object]] = []
        #: The thread each sync endpoint ran in.
        self.threads: list[int] = []
        self.waiting = asyncio.Event()


def shop(
    eng: AsyncEngine | None,
    commit: CommitPolicy = "explicit",
    sync_engine: Engine | None = None,
    *,
    mapped: bool = False,
) -> FastAPI:
    """A FastAPI application whose async endpoints get the request's unit of work from uow.fastapi.depends().

    With *mapped*, it has a handler that answers an IntegrityError with 409.
    """
    seen = Recorder()
    UnitOfWork = OnSuccessUnitOfWork if commit == "on_success" else ExplicitUnitOfWork

    @transactional(factory=lambda: AsyncSqlAlchemyShopUnitOfWork(eng))
    async def add_later(name: str, uow: AsyncShopUnitOfWork = NEW_UOW) -> None:
        seen.background.append((uow, _current_or_none()))
        await uow.items.add(Item(name))

    @contextlib.asynccontextmanager
    async def lifespan_hooks(app: FastAPI) -> AsyncIterator[None]:
        await add_later("at startup")
        yield
        await add_later("at shutdown")

    app = FastAPI(lifespan=lifespan_hooks, exception_handlers={IntegrityError: conflict} if mapped else {})
    app.state.engine = eng
    app.state.sync_engine = sync_engine
    app.state.seen = seen
    app.state.factory_calls = 0

    @app.post("/items")
    async def add_item(request: Request, name: str, uow: UnitOfWork, tasks: BackgroundTasks, response: Response) -> Any:
        params = request.query_params
        seen.units.append(uow)
        assert uow.active
        assert _current_or_none() is uow
        await uow.items.add(Item(name))
        joined = await add_note(name)
        if "dangling" in params:
            await uow.session.execute(refs.insert().values(sku="missing"))
        if "commit" in params:
            await uow.commit()
        if "raise" in params:
            raise Boom(name)
        if "http_error" in params:
            raise HTTPException(status_code=409, detail="conflict")
        if "rollback_only" in params:
            uow.set_rollback_only()
        if "later" in params:
            tasks.add_task(add_later, params["later"])
        if "status" in params:
            return JSONResponse({"returned": True}, status_code=int(params["status"]))
        if "response_status" in params:
            response.status_code = int(params["response_status"])
        return {"joined": joined is uow}

    @app.post("/wait")
    async def wait(uow: UnitOfWork) -> None:
        seen.units.append(uow)
        await uow.items.add(Item("waiting"))
        await uow.session.flush()  # the connection is checked out, the row written but not committed
        seen.waiting.set()
        await asyncio.Event().wait()

    async def audit(uow: UnitOfWork) -> AsyncShopUnitOfWork:
        await uow.notes.add(Note(text="audited"))
        return uow

    @app.post("/two")
    async def two(uow: UnitOfWork, audited: Annotated[AsyncShopUnitOfWork, Depends(audit)]) -> Any:
        seen.units.append(uow)
        await uow.items.add(Item("two"))
        return {"same": audited is uow}

    @app.post("/sync/items")
    @transactional
    def add_sync_item(name: str, uow: SyncUnitOfWork, request: Request) -> Any:
        seen.threads.append(threading.get_ident())
        seen.units.append(uow)
        uow.items.add(Item(name))
        if "dangling" in request.query_params:
            uow.session.execute(refs.insert().values(sku="missing"))
        if "raise" in request.query_params:
            raise Boom(name)
        return {"current": _current_or_none() is uow}

    @app.post("/sync/explicit")
    def add_sync_item_explicitly(name: str, uow: SyncUnitOfWork, request: Request) -> Any:
        seen.units.append(uow)
        with uow:
            uow.items.add(Item(name))
            if "commit" in request.query_params:
                uow.commit()
        return {"active": uow.active}

    return app


def seen(app: FastAPI) -> Recorder:
    recorder: Recorder = app.state.seen
    return recorder


# -- the dependency ------------------------------------------------------------------


@ON_DATABASES
async def test_the_endpoint_gets_an_entered_unit_of_work_of_its_own_current_and_joined(
    async_engine: AsyncEngine,
) -> None:
    """Each request's endpoint gets a new, active unit of work; uow.current() returns it; a service joins it."""
    app = shop(async_engine)

    async with client(app) as http:
        first = await http.post("/items", params={"name": "first"})
        second = await http.post("/items", params={"name": "second"})

    assert [(200, {"joined": True})] * 2 == [(r.status_code, r.json()) for r in (first, second)]
    assert 2 == len({id(unit) for unit in seen(app).units})
    assert [False, False] == [unit.active for unit in seen(app).units]
    assert 2 == app.state.factory_calls


@ON_DATABASES
async def test_an_endpoint_and_its_dependencies_share_the_request_unit_of_work(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """A dependency that also asks for the unit of work gets the same one, entered once."""
    app = shop(async_engine, "on_success")

    async with client(app) as http:
        response = await http.post("/two")

    assert (200, {"same": True}) == (response.status_code, response.json())
    assert 1 == app.state.factory_calls
    assert ["two"] == item_names(engine)
    assert [("audited",)] == rows(engine, "SELECT text FROM uow_notes")


@ON_DATABASES
async def test_explicit_policy_keeps_what_the_endpoint_committed_and_rolls_back_the_rest(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """commit="explicit" (the default): only what the endpoint committed stays, even when it answers 200."""
    app = shop(async_engine)

    async with client(app) as http:
        committed = await http.post("/items", params={"name": "committed", "commit": ""})
        forgotten = await http.post("/items", params={"name": "forgotten"})

    assert (200, 200) == (committed.status_code, forgotten.status_code)
    assert ["committed"] == item_names(engine)
    assert (1, True) == (seen(app).units[0].commits, seen(app).units[0].committed)
    assert (0, True) == (seen(app).units[1].commits, seen(app).units[1].rolled_back)


@ON_DATABASES
@pytest.mark.parametrize(
    ("params", "status", "kept"),
    [
        ({}, 200, True),
        ({"response_status": "201"}, 201, True),
        ({"response_status": "409"}, 409, False),
        ({"http_error": ""}, 409, False),
        ({"raise": ""}, 500, False),
        ({"rollback_only": ""}, 200, False),
    ],
    ids=["returned", "response-201", "response-409", "http-exception", "exception", "rollback-only"],
)
async def test_on_success_policy_commits_a_request_that_raised_nothing_and_answers_below_400(
    async_engine: AsyncEngine, engine: Engine, params: dict[str, str], status: int, kept: bool
) -> None:
    """commit="on_success" commits unless the endpoint raised or set a status of 400 or more on its Response."""
    app = shop(async_engine, "on_success")

    async with client(app) as http:
        response = await http.post("/items", params={"name": "lamp"} | params)

    assert status == response.status_code
    assert (["lamp"] if kept else []) == item_names(engine)
    assert (kept, False) == (seen(app).units[0].committed, seen(app).units[0].active)


@ON_DATABASES
async def test_a_response_object_that_the_endpoint_returns_is_not_seen_by_the_dependency(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """FastAPI shows a dependency no Response the endpoint returns: a returned 409 commits, unlike the middleware."""
    app = shop(async_engine, "on_success")

    async with client(app) as http:
        response = await http.post("/items", params={"name": "lamp", "status": "409"})

    assert (409, ["lamp"]) == (response.status_code, item_names(engine))


@ON_DATABASES
@pytest.mark.parametrize("commit", ["explicit", "on_success"])
async def test_a_commit_that_fails_gives_a_500_and_commits_nothing(
    async_engine: AsyncEngine, engine: Engine, commit: CommitPolicy
) -> None:
    """A COMMIT that the database refuses (a deferred foreign key) reaches the client as a 500, never a 200."""
    app = shop(async_engine, commit)
    params = {"name": "lamp", "dangling": ""} | ({"commit": ""} if commit == "explicit" else {})

    async with client(app) as http:
        response = await http.post("/items", params=params)

    assert 500 == response.status_code
    assert [] == item_names(engine)
    assert [] == rows(engine, "SELECT sku FROM uow_web_refs")
    assert (0, True) == (seen(app).units[0].commits, seen(app).units[0].rolled_back)
    assert 0 == checked_out(async_engine)


@ON_DATABASES
async def test_a_failed_commit_is_answered_by_the_applications_exception_handler(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """An IntegrityError at COMMIT gets the app's handler's 409; no background task runs, nothing is committed."""
    app = shop(async_engine, "on_success", mapped=True)

    async with strict_client(app) as http:
        response = await http.post("/items", params={"name": "lamp", "dangling": "", "later": "later"})

    assert (409, {"message": "conflict"}) == (response.status_code, response.json())
    assert ([], []) == (item_names(engine), seen(app).background)
    assert 0 == checked_out(async_engine)


@ON_DATABASES
async def test_a_failed_commit_without_a_handler_is_answered_500_and_logged_not_raised(
    async_engine: AsyncEngine, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """With no handler for the error, FastAPI's HTTPException handler answers 500; uow logs the error."""
    app = shop(async_engine, "on_success")

    with caplog.at_level(logging.ERROR, logger="uow"):
        async with strict_client(app) as http:
            response = await http.post("/items", params={"name": "lamp", "dangling": "", "later": "later"})

    assert (500, {"detail": "Internal Server Error"}) == (response.status_code, response.json())
    assert [IntegrityError] == [type(record.exc_info[1]) for record in caplog.records if record.exc_info]
    assert ([], []) == (item_names(engine), seen(app).background)


@ON_DATABASES
async def test_the_commit_happens_before_the_response_starts(async_engine: AsyncEngine, engine: Engine) -> None:
    """The server sees the COMMIT before the http.response.start message."""
    events: list[str] = []
    app = shop(async_engine, "on_success")
    recording_commits(async_engine, events)

    async with client(recording_order(app, events)) as http:
        response = await http.post("/items", params={"name": "lamp"})

    assert 200 == response.status_code
    assert ["COMMIT", "response 200"] == events


async def test_fastapi_ends_a_request_scoped_dependency_after_the_response_starts() -> None:
    """Why depends() uses scope="function": with FastAPI's default scope, the code after yield runs too late."""
    events: list[str] = []

    async def dependency() -> AsyncIterator[None]:
        yield
        events.append("after yield")

    app = FastAPI()

    @app.get("/default")
    async def default(_: Annotated[None, Depends(dependency)]) -> None:
        pass

    @app.get("/function")
    async def function(_: Annotated[None, Depends(dependency, scope="function")]) -> None:
        pass

    async with client(recording_order(app, events)) as http:
        await http.get("/default")
        await http.get("/function")

    assert ["response 200", "after yield", "after yield", "response 200"] == events


# -- background tasks and lifespan ------------------------------------------------------


@ON_DATABASES
async def test_a_background_task_gets_a_unit_of_work_of_its_own_that_commits_on_its_own(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """A @transactional background task builds its own unit of work, not the request's, and commits it."""
    app = shop(async_engine)

    async with client(app) as http:
        response = await http.post("/items", params={"name": "uncommitted", "later": "later"})

    assert 200 == response.status_code
    [(background_unit, current_in_background)] = seen(app).background
    assert background_unit is not seen(app).units[0]
    assert current_in_background is background_unit
    assert (1, False) == (background_unit.commits, background_unit.active)
    assert ["later"] == item_names(engine)  # the request's uncommitted item is gone, the background's stays


@ON_DATABASES
async def test_lifespan_hooks_get_units_of_work_of_their_own(async_engine: AsyncEngine, engine: Engine) -> None:
    """Startup and shutdown code that is @transactional builds and commits its own unit of work."""
    app = shop(async_engine)

    async with lifespan(app), client(app) as http:
        response = await http.post("/items", params={"name": "request", "commit": ""})

    assert 200 == response.status_code
    assert 1 == app.state.factory_calls
    assert [True, True] == [current is unit for unit, current in seen(app).background]
    assert [1, 1] == [unit.commits for unit, _ in seen(app).background]
    assert seen(app).units[0] not in [unit for unit, _ in seen(app).background]
    assert ["at shutdown", "at startup", "request"] == item_names(engine)


# -- cancellation and load ----------------------------------------------------------------


@ON_DATABASES
@pytest.mark.parametrize("commit", ["explicit", "on_success"])
async def test_a_request_cancelled_mid_handling_rolls_back_and_returns_its_connection(
    async_engine: AsyncEngine, engine: Engine, commit: CommitPolicy
) -> None:
    """Cancelling the request's task while the endpoint waits: nothing committed, no connection checked out."""
    app = shop(async_engine, commit)

    async with client(app) as http:
        request = asyncio.create_task(http.post("/wait"))
        await asyncio.wait_for(seen(app).waiting.wait(), TIMEOUT)
        assert 1 == checked_out(async_engine)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request

    assert 0 == checked_out(async_engine)
    assert (False, True) == (seen(app).units[0].active, seen(app).units[0].rolled_back)
    assert [] == item_names(engine)


#: What request number n does, by n % 6, and the status it gets, under commit="on_success".
MIXED_FASTAPI = [
    ({}, 200),
    ({"http_error": ""}, 409),
    ({"raise": ""}, 500),
    ({"dangling": ""}, 500),
    ({"later": "later"}, 200),
    ({"rollback_only": ""}, 200),
]


@ON_DATABASES
async def test_500_requests_with_errors_mixed_in_leave_no_connection_checked_out(
    async_engine: AsyncEngine, engine: Engine
) -> None:
    """500 concurrent requests, a third of them failing, commit exactly the successes and return every connection."""
    app = shop(async_engine, "on_success")
    await send_mixed_requests(app, MIXED_FASTAPI, seen(app).units, async_engine, engine)


@ON_DATABASES
async def test_the_middleware_works_in_a_fastapi_application(async_engine: AsyncEngine, engine: Engine) -> None:
    """UnitOfWorkMiddleware gives FastAPI endpoints that take no parameter the request's unit of work."""
    app = FastAPI()
    app.add_middleware(
        UnitOfWorkMiddleware, factory=lambda: AsyncSqlAlchemyShopUnitOfWork(async_engine), commit="on_success"
    )

    @app.post("/items")
    async def add_item(name: str) -> Any:
        await add_note(name)
        await uow.current(AsyncShopUnitOfWork).items.add(Item(name))
        if name == "fails":
            raise HTTPException(status_code=400)
        return {}

    async with client(app) as http:
        statuses = [(await http.post("/items", params={"name": name})).status_code for name in ("kept", "fails")]

    assert [200, 400] == statuses
    assert ["kept"] == item_names(engine)
    assert [("kept",)] == rows(engine, "SELECT text FROM uow_notes")


# -- sync endpoints ---------------------------------------------------------------------------


@ON_DATABASES
async def test_a_sync_endpoint_decorated_with_transactional_owns_its_unit_of_work_in_its_thread(
    async_engine: AsyncEngine, sync_engine: Engine, engine: Engine
) -> None:
    """A `def` endpoint gets an idle sync unit of work, and @transactional enters and commits it in its thread."""
    app = shop(async_engine, sync_engine=sync_engine)

    async with client(app) as http:
        ok = await http.post("/sync/items", params={"name": "kept"})
        failed = await http.post("/sync/items", params={"name": "raised", "raise": ""})
        refused = await http.post("/sync/items", params={"name": "refused", "dangling": ""})

    assert [(200, {"current": True}), 500, 500] == [
        (ok.status_code, ok.json()),
        failed.status_code,
        refused.status_code,
    ]
    assert ["kept"] == item_names(engine)
    assert [(1, False), (0, False), (0, False)] == [(unit.commits, unit.active) for unit in seen(app).units]
    assert threading.get_ident() not in seen(app).threads
    assert 0 == checked_out(sync_engine)


@ON_DATABASES
async def test_a_sync_endpoint_can_enter_its_unit_of_work_and_commit_explicitly(
    async_engine: AsyncEngine, sync_engine: Engine, engine: Engine
) -> None:
    """A `def` endpoint that enters its unit of work with `with uow:` keeps only what it committed."""
    app = shop(async_engine, sync_engine=sync_engine)

    async with client(app) as http:
        committed = await http.post("/sync/explicit", params={"name": "committed", "commit": ""})
        forgotten = await http.post("/sync/explicit", params={"name": "forgotten"})

    assert [{"active": False}] * 2 == [committed.json(), forgotten.json()]
    assert ["committed"] == item_names(engine)


@ON_DATABASES
async def test_500_requests_to_sync_endpoints_with_errors_mixed_in_leave_no_connection_checked_out(
    async_engine: AsyncEngine, sync_engine: Engine, engine: Engine
) -> None:
    """500 concurrent requests to a `def` endpoint, in the thread pool, a third failing: no connection left out."""
    app = shop(async_engine, sync_engine=sync_engine)
    outcomes = [({}, 200), ({"raise": ""}, 500), ({"dangling": ""}, 500)]

    async def one(http: Any, n: int) -> int:
        params, _ = outcomes[n % 3]
        response = await http.post("/sync/items", params={"name": f"{n:03}"} | params)
        return int(response.status_code)

    async with client(app) as http:
        statuses: list[int] = []
        for start in range(0, 500, 20):
            statuses += await asyncio.gather(*(one(http, n) for n in range(start, min(start + 20, 500))))

    assert [outcomes[n % 3][1] for n in range(500)] == statuses
    assert [f"{n:03}" for n in range(0, 500, 3)] == item_names(engine)
    assert 0 == checked_out(sync_engine)
    assert [] == [unit for unit in seen(app).units if unit.active]


async def test_a_sync_unit_of_work_entered_by_a_sync_dependency_is_not_current_in_the_endpoint() -> None:
    """A `def` dependency's unit of work is not current in the endpoint: why depends() refuses sync ones."""
    # FastAPI runs the dependency's enter, the endpoint and the dependency's exit as separate jobs of the
    # thread pool, each in a copy of the request's context, and under load in different threads, where a sync
    # unit of work raises OwnershipError.
    fake = FakeShopUnitOfWork()
    found: list[object] = []

    def entered() -> Iterator[ShopUnitOfWork]:
        with fake:
            yield fake

    app = FastAPI()

    @app.post("/")
    def endpoint(unit: Annotated[ShopUnitOfWork, Depends(entered)]) -> None:
        found.append(_current_or_none())

    async with client(app) as http:
        response = await http.post("/")

    assert (200, [None]) == (response.status_code, found)


# -- misuse and testing with the fake ---------------------------------------------------------


async def test_depends_refuses_a_def_endpoint_at_its_first_request() -> None:
    """A `def` endpoint runs in a worker thread, where the request's unit of work cannot be used: ConfigurationError."""
    app = FastAPI()
    app.dependency_overrides[make_uow] = AsyncFakeShopUnitOfWork

    @app.post("/")
    def endpoint(uow: OnSuccessUnitOfWork) -> None:
        raise AssertionError("never called")  # pragma: no cover

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as http:
        with pytest.raises(errors.ConfigurationError, match=r"is a `def` endpoint.*Declare the endpoint `async def`"):
            await http.post("/")


class AsyncCallable:
    """An endpoint that is an instance with an async __call__."""

    async def __call__(self, uow: OnSuccessUnitOfWork) -> None:
        await uow.items.add(Item("lamp"))


async def add_lamp(uow: OnSuccessUnitOfWork, extra: str = "") -> None:
    await uow.items.add(Item(f"lamp{extra}"))


def add_nothing(uow: OnSuccessUnitOfWork, extra: str = "") -> None:
    raise AssertionError("never called")  # pragma: no cover


@pytest.mark.parametrize(
    ("endpoint", "status"),
    [
        (add_lamp, 200),
        (functools.partial(add_lamp, extra=" too"), 200),
        (AsyncCallable(), 200),
        (functools.partial(add_nothing, extra=" too"), 500),
    ],
    ids=["async-def", "partial-of-async-def", "async-callable", "partial-of-def"],
)
async def test_depends_takes_async_endpoints_of_every_form_and_refuses_sync_ones(endpoint: Any, status: int) -> None:
    """An async function, a partial of one, or an instance with an async __call__ is served; a sync one refused."""
    fake = AsyncFakeShopUnitOfWork()
    app = FastAPI()
    app.dependency_overrides[make_uow] = lambda: fake
    app.add_api_route("/", endpoint, methods=["POST"])

    async with client(app) as http:
        response = await http.post("/")

    assert (status, status == 200) == (response.status_code, fake.committed)


def test_depends_refuses_a_factory_declared_to_return_a_sync_unit_of_work() -> None:
    """A factory annotated to return a sync unit of work is refused at once, with what to do instead."""
    with pytest.raises(errors.ConfigurationError, match=r"Annotated\[SqlAlchemyShopUnitOfWork, Depends\(factory\)\]"):
        uow.fastapi.depends(make_sync_uow)  # type: ignore[arg-type]


def test_depends_refuses_an_unknown_commit_policy() -> None:
    """commit= takes "explicit" or "on_success"; anything else raises ConfigurationError at once."""
    with pytest.raises(errors.ConfigurationError, match="commit must be one of"):
        uow.fastapi.depends(make_uow, commit="always")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: FakeShopUnitOfWork(), "returned the sync FakeShopUnitOfWork"),
        (lambda: Session(), "not a unit of work"),
    ],
    ids=["sync", "session"],
)
async def test_a_factory_that_returns_no_async_unit_of_work_is_refused_at_the_request(
    factory: Any, message: str
) -> None:
    """A factory whose type is not declared is checked at the first request: ConfigurationError, with the fix."""
    app = FastAPI()
    Refused = Annotated[Any, uow.fastapi.depends(factory)]

    @app.get("/")
    async def endpoint(unit: Refused) -> None:
        pass

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as http:
        with pytest.raises(errors.ConfigurationError, match=message):
            await http.get("/")


async def test_dependency_overrides_swap_the_factory_for_the_fake() -> None:
    """Overriding the factory runs the endpoint with the fake, under the same commit policy."""
    fake = AsyncFakeShopUnitOfWork()
    app = shop(None, "on_success")
    app.dependency_overrides[make_uow] = lambda: fake

    async with client(app) as http:
        response = await http.post("/items", params={"name": "lamp"})

    assert (200, True, False) == (response.status_code, fake.committed, fake.active)
    async with fake:
        assert ["lamp"] == [item.name for item in await fake.items.list()]
