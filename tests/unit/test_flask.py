"""The Flask extension's configuration, contexts and hooks, with fake units of work: no database."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from flask import Flask, current_app, stream_with_context
from pytest_mock import MockerFixture
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import sessionmaker

from tests.support.models import Item, Sku
from tests.support.uows import AsyncFakeShopUnitOfWork, FakeShopUnitOfWork, ShopUnitOfWork
from uow import current, errors
from uow.flask import CommitPolicy, UnitOfWorkExtension


class Boom(Exception):
    """Raised by a view or a context to make it fail."""


class OldClickContext:
    """Ends the resources it holds without passing them the exception, as click before 8.3 does."""

    def __init__(self) -> None:
        self.resources = ExitStack()

    def __enter__(self) -> ExitStack:
        return self.resources

    def __exit__(self, *exc_info: object) -> None:
        self.resources.close()


def fake_app(
    commit: CommitPolicy = "explicit", factory: Callable[[Engine], ShopUnitOfWork] | None = None, **config: object
) -> tuple[Flask, UnitOfWorkExtension[ShopUnitOfWork]]:
    """An app whose units of work are fakes (a new one each time, or what *factory* returns), and its extension."""
    app = Flask(__name__)
    app.config["UOW_DATABASE_URL"] = "sqlite://"  # the engine is built, never connected
    app.config.update(config)
    ext: UnitOfWorkExtension[ShopUnitOfWork] = UnitOfWorkExtension(
        factory=lambda engine: FakeShopUnitOfWork(), commit=commit
    )
    ext.init_app(app, factory=factory)
    return app, ext


def committed_names(fake: FakeShopUnitOfWork) -> list[str]:
    """The names of the items committed to the fake's database."""
    return sorted(row["name"] for row in fake.database.rows(Item))


# -- configuration ------------------------------------------------------------------


def test_importing_uow_does_not_import_flask() -> None:
    """Flask is an optional extra: `import uow` leaves it unimported."""
    code = "import sys, uow; print('flask' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert "False" == result.stdout.strip()


def test_init_app_needs_a_database_url_or_an_engine() -> None:
    """init_app() without UOW_DATABASE_URL nor engine= raises ConfigurationError naming both ways."""
    ext = UnitOfWorkExtension(factory=FakeShopUnitOfWork)

    with pytest.raises(
        errors.ConfigurationError, match=r"set it to the SQLAlchemy URL .* or pass .* init_app\(app, engine=...\)"
    ):
        ext.init_app(Flask(__name__))


def test_init_app_takes_the_engine_the_application_has() -> None:
    """init_app(app, engine=...) makes that engine the app's: no configuration needed, the factory gets it."""
    engine = create_engine("sqlite://")
    app = Flask(__name__)
    ext: UnitOfWorkExtension[ShopUnitOfWork] = UnitOfWorkExtension(factory=lambda engine: FakeShopUnitOfWork())
    given: list[Engine] = []
    ext.init_app(app, engine=engine, factory=lambda engine: given.append(engine) or FakeShopUnitOfWork())

    with app.app_context():
        found = (ext.engine, ext.uow.active)

    assert ((engine, True), [engine]) == (found, given)


@pytest.mark.parametrize("key", ["UOW_DATABASE_URL", "UOW_ENGINE_OPTIONS"])
def test_init_app_refuses_an_engine_and_a_configuration(key: str) -> None:
    """An engine given to an app that also configures one raises ConfigurationError: one or the other."""
    app = Flask(__name__)
    app.config[key] = {"UOW_DATABASE_URL": "sqlite://", "UOW_ENGINE_OPTIONS": {"echo": True}}[key]
    ext = UnitOfWorkExtension(factory=FakeShopUnitOfWork)

    with pytest.raises(errors.ConfigurationError, match=f"also sets {key}: .* remove the configuration, or pass no"):
        ext.init_app(app, engine=create_engine("sqlite://"))
    assert "uow" not in app.extensions


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (sessionmaker(), r"pass factory=lambda engine: YourUnitOfWork\(the_sessionmaker\)"),
        (create_async_engine("sqlite+aiosqlite://"), "Flask views are synchronous, so pass a sync Engine"),
        (
            "postgresql://shop:secret@db/shop",
            r"not the str 'postgresql://shop:\*\*\*@db/shop': pass create_engine\(url\)",
        ),
    ],
    ids=["sessionmaker", "async-engine", "url"],
)
def test_init_app_refuses_what_is_not_a_sync_engine(given: object, message: str) -> None:
    """engine= takes a sync Engine: anything else raises ConfigurationError saying what to pass, password hidden."""
    ext = UnitOfWorkExtension(factory=FakeShopUnitOfWork)

    with pytest.raises(errors.ConfigurationError, match=message):
        ext.init_app(Flask(__name__), engine=given)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [("pool_size=5", "must be a dict"), ({"no_such_option": 1}, "cannot build the engine")],
    ids=["not-a-dict", "unknown-option"],
)
def test_init_app_refuses_bad_engine_options(options: object, message: str) -> None:
    """UOW_ENGINE_OPTIONS that create_engine() cannot take raise ConfigurationError at init_app()."""
    with pytest.raises(errors.ConfigurationError, match=message):
        fake_app(UOW_ENGINE_OPTIONS=options)


def test_init_app_passes_engine_options_to_create_engine() -> None:
    """UOW_ENGINE_OPTIONS are keyword arguments of create_engine()."""
    app, ext = fake_app(UOW_ENGINE_OPTIONS={"echo": True})

    with app.app_context():
        assert (True, "sqlite://") == (ext.engine.echo, str(ext.engine.url))


def test_init_app_refuses_a_second_extension_on_one_app() -> None:
    """An app takes one unit of work extension, set up once."""
    app, ext = fake_app()

    with pytest.raises(errors.ConfigurationError, match="already has a unit of work extension"):
        ext.init_app(app)
    with pytest.raises(errors.ConfigurationError, match="already has a unit of work extension"):
        UnitOfWorkExtension(app, factory=FakeShopUnitOfWork)


def test_extension_refuses_an_unknown_commit_policy() -> None:
    """commit= takes "explicit" or "on_success"."""
    with pytest.raises(errors.ConfigurationError, match="commit must be one of 'explicit', 'on_success'"):
        UnitOfWorkExtension(factory=FakeShopUnitOfWork, commit="always")  # type: ignore[arg-type]


def test_extension_refuses_a_factory_that_is_not_callable() -> None:
    """factory= must be a callable, on the extension and on init_app()."""
    with pytest.raises(errors.ConfigurationError, match="factory must be a callable"):
        UnitOfWorkExtension(factory="SqlAlchemyShopUnitOfWork")  # type: ignore[arg-type]
    app = Flask(__name__)
    app.config["UOW_DATABASE_URL"] = "sqlite://"
    with pytest.raises(errors.ConfigurationError, match="factory must be a callable"):
        UnitOfWorkExtension(factory=FakeShopUnitOfWork).init_app(app, factory=42)  # type: ignore[arg-type]


def test_uow_outside_an_application_context_raises() -> None:
    """ext.uow and ext.engine need an application context."""
    _, ext = fake_app()

    with pytest.raises(errors.InactiveUnitOfWorkError, match="outside an application context"):
        ext.uow
    with pytest.raises(errors.InactiveUnitOfWorkError, match="needs an application context"):
        ext.engine


def test_uow_in_an_app_that_was_not_set_up_raises() -> None:
    """ext.uow in an app that init_app() did not set up raises ConfigurationError."""
    _, ext = fake_app()

    with Flask("other").app_context(), pytest.raises(errors.ConfigurationError, match=r"call ext.init_app\(app\)"):
        ext.uow


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda engine: AsyncFakeShopUnitOfWork(), "must build a sync unit of work"),
        (lambda engine: object(), "not a uow.UnitOfWork"),
    ],
    ids=["async", "not-a-unit-of-work"],
)
def test_factory_must_return_a_sync_unit_of_work(factory: Callable[[Engine], ShopUnitOfWork], message: str) -> None:
    """A factory that returns an async unit of work, or anything else, raises ConfigurationError."""
    app, ext = fake_app(factory=factory)

    with app.app_context(), pytest.raises(errors.ConfigurationError, match=message):
        ext.uow


def test_factory_must_return_an_idle_unit_of_work() -> None:
    """A factory that returns a unit of work in use raises ConfigurationError instead of joining it."""
    fake = FakeShopUnitOfWork()
    app, ext = fake_app(factory=lambda engine: fake)

    with fake, app.app_context(), pytest.raises(errors.ConfigurationError, match="already active"):
        ext.uow


# -- requests ------------------------------------------------------------------------


def test_each_request_gets_its_own_unit_of_work() -> None:
    """Each request has a new unit of work, active in the view, reachable through uow.current(), ended after."""
    app, ext = fake_app()
    seen: list[ShopUnitOfWork] = []

    @app.get("/")
    def view() -> str:
        seen.append(ext.uow)
        return str((ext.uow is current(), ext.uow.active))

    client = app.test_client()
    texts = [client.get("/").text, client.get("/").text]

    assert ["(True, True)", "(True, True)"] == texts
    assert seen[0] is not seen[1]
    assert [False, False] == [unit.active for unit in seen]


def test_app_given_to_the_constructor_is_set_up() -> None:
    """UnitOfWorkExtension(app, factory=...) calls init_app(app)."""
    app = Flask(__name__)
    app.config["UOW_DATABASE_URL"] = "sqlite://"
    ext = UnitOfWorkExtension(app, factory=lambda engine: FakeShopUnitOfWork())

    with app.app_context():
        assert isinstance(ext.uow, FakeShopUnitOfWork)


def test_one_extension_serves_several_apps(tmp_path: Path) -> None:
    """Apps sharing an extension each get their own engine, from their own configuration, and their own factory."""
    ext: UnitOfWorkExtension[ShopUnitOfWork] = UnitOfWorkExtension(factory=lambda engine: FakeShopUnitOfWork())
    apps = [Flask("first"), Flask("second")]
    fakes = [FakeShopUnitOfWork(), FakeShopUnitOfWork()]
    for app, fake in zip(apps, fakes, strict=True):
        app.config["UOW_DATABASE_URL"] = f"sqlite:///{tmp_path / app.name}.db"
        ext.init_app(app, factory=lambda engine, fake=fake: fake)

    found = []
    for app in apps:
        with app.app_context():
            found.append((ext.engine.url.database, ext.uow))

    assert [(str(tmp_path / "first.db"), fakes[0]), (str(tmp_path / "second.db"), fakes[1])] == found


def test_before_request_functions_registered_after_init_app_see_the_unit_of_work() -> None:
    """The request's unit of work is entered before the app's later before_request functions run."""
    app, ext = fake_app()
    found: list[bool] = []

    @app.before_request
    def look() -> None:
        found.append(current() is ext.uow)

    @app.get("/")
    def view() -> str:
        return "ok"

    app.test_client().get("/")

    assert [True] == found


def test_after_request_functions_registered_before_init_app_run_after_the_commit() -> None:
    """Under on_success, after_request functions run in reverse order: those registered earlier see the commit."""
    app = Flask(__name__)
    app.config["UOW_DATABASE_URL"] = "sqlite://"
    ext: UnitOfWorkExtension[ShopUnitOfWork] = UnitOfWorkExtension(
        factory=lambda engine: FakeShopUnitOfWork(), commit="on_success"
    )
    seen: list[tuple[bool, bool]] = []

    @app.after_request
    def observe(response: object) -> object:
        seen.append((ext.uow.committed, ext.uow.active))
        return response

    ext.init_app(app)

    @app.post("/")
    def view() -> str:
        ext.uow.items.add(Item("lamp"))
        return "ok"

    app.test_client().post("/")

    assert [(True, False)] == seen


def test_a_request_inside_an_app_context_gets_its_own_unit_of_work() -> None:
    """A request made inside `with app.app_context():` has its own unit of work; the context keeps its own."""
    app, ext = fake_app()

    @app.get("/")
    def view() -> str:
        return str(id(ext.uow))

    with app.app_context():
        outer = ext.uow
        inner = app.test_client().get("/").text
        assert (True, outer) == (outer.active, current())

    assert str(id(outer)) != inner
    assert not outer.active


def test_test_request_context_enters_on_first_use_and_ends_at_teardown() -> None:
    """In test_request_context(), which runs no before_request function, ext.uow enters on first use."""
    app, ext = fake_app()

    with app.test_request_context("/"):
        with pytest.raises(errors.InactiveUnitOfWorkError):
            current()
        unit = ext.uow
        assert (unit, unit) == (current(), ext.uow)

    assert not unit.active


def test_testing_mode_propagates_a_failed_commit_to_the_test() -> None:
    """With TESTING on, Flask re-raises the failed commit in the test instead of answering 500."""
    fake = FakeShopUnitOfWork()
    app, ext = fake_app("on_success", TESTING=True, factory=lambda engine: fake)

    @app.post("/skus/<code>")
    def add(code: str) -> str:
        ext.uow.skus.add(Sku(code))
        return code

    client = app.test_client()
    assert 200 == client.post("/skus/lamp").status_code
    with pytest.raises(IntegrityError):
        client.post("/skus/lamp")
    assert (1, False) == (fake.commits, fake.active)


def test_an_error_handler_maps_a_failed_commit() -> None:
    """Under on_success, an error handler for the commit's exception answers for it, as for an exception of the view."""
    fake = FakeShopUnitOfWork()
    app, ext = fake_app("on_success", factory=lambda engine: fake)
    app.register_error_handler(IntegrityError, lambda error: ({"message": "taken"}, 409))

    @app.post("/skus/<code>")
    def add(code: str) -> tuple[str, int]:
        ext.uow.skus.add(Sku(code))
        return code, 201

    client = app.test_client()
    statuses = [client.post("/skus/lamp").status_code, client.post("/skus/lamp").status_code]

    assert ([201, 409], 1, False) == (statuses, fake.commits, fake.active)


def test_a_body_streamed_with_the_request_context_cannot_use_the_ended_unit_of_work() -> None:
    """A body streamed with stream_with_context() runs after teardown: ext.uow raises, saying to read in the view."""
    app, ext = fake_app()

    @app.get("/")
    def view() -> object:
        def body() -> Iterator[str]:
            yield "start"
            yield str(ext.uow.items.count())

        return stream_with_context(body())

    with pytest.raises(errors.InactiveUnitOfWorkError) as raised:
        app.test_client().get("/").get_data()

    assert str(raised.value).startswith(
        "ext.uow was used in a response body streamed after the request was torn down: Flask ends the request, "
        "and the extension its unit of work, before it streams the body"
    )
    assert str(raised.value).endswith(
        "Read what the body needs in the view, before it returns the response, and stream from that"
    )


def test_a_body_streamed_without_the_request_context_is_told_to_read_in_the_view() -> None:
    """A generator body runs outside any context: ext.uow raises, and the message names that case."""
    app, ext = fake_app()

    @app.get("/")
    def view() -> object:
        def body() -> Iterator[str]:
            yield str(ext.uow.items.count())

        return body()

    with pytest.raises(errors.InactiveUnitOfWorkError, match="A response body that a generator streams runs after"):
        app.test_client().get("/").get_data()


def test_teardown_logs_what_fails_and_never_raises(mocker: MockerFixture, caplog: pytest.LogCaptureFixture) -> None:
    """A unit of work whose session fails to close at teardown is logged on "uow"; the response stands."""
    app, ext = fake_app()
    mocker.patch.object(FakeShopUnitOfWork, "_close", side_effect=RuntimeError("close failed"))

    @app.get("/")
    def view() -> str:
        ext.uow.items.count()
        return "ok"

    with caplog.at_level(logging.ERROR, logger="uow"):
        response = app.test_client().get("/")

    assert 200 == response.status_code
    assert ["uow: ending"] == [record.getMessage()[:11] for record in caplog.records]


# -- application contexts outside a request -------------------------------------------


def test_app_context_enters_its_unit_of_work_on_first_use() -> None:
    """An application context has no unit of work until ext.uow is used; then it is the current one until the end."""
    app, ext = fake_app()

    with app.app_context():
        with pytest.raises(errors.InactiveUnitOfWorkError):
            current()
        unit = ext.uow
        assert (True, unit, unit) == (unit.active, current(), ext.uow)

    assert not unit.active


@pytest.mark.parametrize(("commit", "expected"), [("explicit", []), ("on_success", ["lamp"])])
def test_app_context_commits_at_its_end_only_on_success(commit: CommitPolicy, expected: list[str]) -> None:
    """At the end of an application context, on_success commits and explicit rolls back."""
    fake = FakeShopUnitOfWork()
    app, ext = fake_app(commit, factory=lambda engine: fake)

    with app.app_context():
        ext.uow.items.add(Item("lamp"))

    assert expected == committed_names(fake)


def test_app_context_sees_an_exception_that_click_before_8_3_does_not_pass() -> None:
    """A context ended without its exception, as click before 8.3 ends a command's, still rolls back."""
    fake = FakeShopUnitOfWork()
    app, ext = fake_app("on_success", factory=lambda engine: fake)

    with pytest.raises(Boom), OldClickContext() as resources:
        resources.enter_context(app.app_context())
        ext.uow.items.add(Item("lamp"))
        raise Boom

    assert ([], True) == (committed_names(fake), fake.rolled_back)


def test_app_context_used_while_handling_an_exception_still_commits() -> None:
    """A context entered and ended inside an `except` block commits: the exception handled is not its own."""
    fake = FakeShopUnitOfWork()
    app, ext = fake_app("on_success", factory=lambda engine: fake)

    try:
        raise Boom
    except Boom:
        with OldClickContext() as resources:
            resources.enter_context(app.app_context())
            ext.uow.items.add(Item("lamp"))

    assert ["lamp"] == committed_names(fake)


def test_app_context_of_another_app_inside_a_request_gets_that_app_unit_of_work() -> None:
    """Inside a request of one app, another app's context has the other app's unit of work, ended with it."""
    app, ext = fake_app()
    other = Flask("other")
    other.config["UOW_DATABASE_URL"] = "sqlite://"
    ext.init_app(other)
    found: list[tuple[bool, bool]] = []

    @app.get("/")
    def view() -> str:
        mine = ext.uow
        with other.app_context():
            assert "other" == current_app.name
            theirs = ext.uow
            found.append((theirs is mine, theirs.active))
        found.append((theirs.active, mine.active))
        return "ok"

    app.test_client().get("/")

    assert [(False, True), (False, True)] == found


def test_teardown_functions_that_run_after_the_extension_cannot_use_the_unit_of_work() -> None:
    """Teardown functions registered before init_app run after it: ext.uow raises there, and enters nothing."""
    app = Flask(__name__)
    app.config["UOW_DATABASE_URL"] = "sqlite://"
    ext: UnitOfWorkExtension[ShopUnitOfWork] = UnitOfWorkExtension(factory=lambda engine: FakeShopUnitOfWork())
    messages: list[str] = []

    def use(exc: BaseException | None) -> None:
        with pytest.raises(errors.InactiveUnitOfWorkError) as raised:
            ext.uow
        messages.append(str(raised.value))

    app.teardown_request(use)
    app.teardown_appcontext(use)
    ext.init_app(app)

    @app.get("/")
    def view() -> str:
        return "ok"

    response = app.test_client().get("/")
    with app.app_context():
        ext.uow.items.count()

    assert 200 == response.status_code
    message = (
        "ext.uow was used in a teardown function that runs after the extension's, which has already ended the "
        "{}'s unit of work: Flask runs teardown functions in the reverse order of registration, so register this "
        "one after calling init_app()"
    )
    assert [
        message.format("request"),
        message.format("application context"),
        message.format("application context"),
    ] == messages


def test_on_success_sends_no_commit_for_a_request_that_did_not_use_the_unit_of_work() -> None:
    """Under on_success, a 200 whose view never used the unit of work commits nothing, as autocommit=True would."""
    fake = FakeShopUnitOfWork()
    app, _ = fake_app("on_success", factory=lambda engine: fake)

    @app.get("/")
    def view() -> str:
        return "ok"

    response = app.test_client().get("/")

    assert (200, 0, False) == (response.status_code, fake.commits, fake.committed)


def test_explicit_policy_ignores_the_autocommit_of_the_factory() -> None:
    """Under the explicit policy, a unit of work built with autocommit=True still commits only when the view does."""
    fake = FakeShopUnitOfWork(autocommit=True)
    app, ext = fake_app("explicit", factory=lambda engine: fake)

    @app.post("/")
    def view() -> str:
        ext.uow.items.add(Item("lamp"))
        return "ok"

    response = app.test_client().post("/")

    assert (200, [], True) == (response.status_code, committed_names(fake), fake.rolled_back)
