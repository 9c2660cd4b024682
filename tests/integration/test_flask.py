"""The Flask extension through Flask's test client and CLI runner, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import click
import pytest
from flask import Flask, abort, redirect, request, stream_with_context
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from tests.integration.conftest import rows
from tests.support.databases import Database, Provisioner
from tests.support.models import Item, Sku, skus
from tests.support.uows import ShopUnitOfWork, SqlAlchemyShopUnitOfWork
from uow import NEW_UOW, current, transactional
from uow.flask import CommitPolicy, UnitOfWorkExtension

pytestmark = pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)


class Boom(Exception):
    """Raised by a view, a hook or a command to make it fail."""


class Site(NamedTuple):
    """An app built for one test, its extension, and the engine the extension built for it."""

    app: Flask
    ext: UnitOfWorkExtension[ShopUnitOfWork]
    engine: Engine


@transactional
def add_item(name: str, uow: ShopUnitOfWork = NEW_UOW) -> bool:
    """A service: add an item; tell whether it ran in the request's unit of work."""
    uow.items.add(Item(name))
    return uow is current()


@transactional
def add_item_and_fail(name: str, uow: ShopUnitOfWork = NEW_UOW) -> None:
    """A service that adds an item, then fails."""
    uow.items.add(Item(name))
    raise Boom(name)


def create_app(database: Database, commit: CommitPolicy) -> Site:
    """An app with one route per behaviour under test, a hook that fails on demand, and a CLI command."""
    ext: UnitOfWorkExtension[ShopUnitOfWork] = UnitOfWorkExtension(factory=SqlAlchemyShopUnitOfWork, commit=commit)
    app = Flask(__name__)
    app.config["UOW_DATABASE_URL"] = database.url
    ext.init_app(app)

    @app.post("/items/<name>")
    def add(name: str) -> tuple[str, int]:
        ext.uow.items.add(Item(name))
        if request.args.get("commit"):
            ext.uow.commit()
        return name, 201

    @app.post("/items/<name>/fail")
    def fail(name: str) -> str:
        ext.uow.items.add(Item(name))
        raise Boom(name)

    @app.post("/items/<name>/commit-then-fail")
    def commit_then_fail(name: str) -> str:
        ext.uow.items.add(Item(name))
        ext.uow.commit()
        ext.uow.items.add(Item(f"{name} after"))
        raise Boom(name)

    @app.post("/items/<name>/abort")
    def conflict(name: str) -> str:
        ext.uow.items.add(Item(name))
        abort(409)

    @app.post("/items/<name>/redirect")
    def moved(name: str) -> object:
        ext.uow.items.add(Item(name))
        return redirect(f"/items/{name}")

    @app.post("/items/<name>/service")
    def service(name: str) -> tuple[str, int]:
        joined = add_item(name)
        if request.args.get("commit"):
            ext.uow.commit()
        return str(joined), 201

    @app.post("/items/<name>/swallow")
    def swallow(name: str) -> str:
        with contextlib.suppress(Boom):
            add_item_and_fail(name)
        return "swallowed"

    @app.post("/items/<name>/rollback-only")
    def rollback_only(name: str) -> str:
        ext.uow.items.add(Item(name))
        ext.uow.set_rollback_only()
        return "not saved"

    @app.post("/items/<name>/sku/<code>")
    def add_with_sku(name: str, code: str) -> tuple[str, int]:
        ext.uow.items.add(Item(name))
        ext.uow.skus.add(Sku(code))
        if request.args.get("commit"):
            ext.uow.commit()
        return name, 201

    @app.post("/items/<name>/stream")
    def stream(name: str) -> object:
        ext.uow.items.add(Item(name))
        count = ext.uow.items.count()  # read in the view: the body streams after the request ended

        def body() -> Iterator[str]:
            yield f"{name} "
            yield f"{count}"

        return stream_with_context(body())

    @app.after_request
    def failing_hook(response: object) -> object:
        if request.args.get("hook") == "fail":
            raise Boom("after_request")
        return response

    @app.cli.command("add-item")
    @click.argument("name")
    @click.option("--fail", is_flag=True)
    @click.option("--commit", is_flag=True)
    @click.option("--sku")
    def add_item_command(name: str, fail: bool, commit: bool, sku: str | None) -> None:
        ext.uow.items.add(Item(name))
        if sku is not None:
            ext.uow.skus.add(Sku(sku))
        if commit:
            ext.uow.commit()
        if fail:
            raise Boom(name)

    with app.app_context():
        engine = ext.engine
    return Site(app, ext, engine)


@pytest.fixture(name="make_site")
def _make_site(
    database: Database, engine: Engine, provisioner: Provisioner
) -> Iterator[Callable[[CommitPolicy], Site]]:
    """Build apps on the run's database (tables emptied); check and dispose their engines at the end."""
    built: list[Site] = []

    def make(commit: CommitPolicy) -> Site:
        site = create_app(database, commit)
        provisioner.track(site.engine)
        built.append(site)
        return site

    yield make
    checked_out = [site.engine.pool.checkedout() for site in built]
    for site in built:
        site.engine.dispose()
    assert [0] * len(built) == checked_out


def names(engine: Engine) -> list[str]:
    """The names of the committed items, sorted, read through a separate connection."""
    return [str(name) for (name,) in rows(engine, "SELECT name FROM uow_items ORDER BY name")]


def seed_sku(engine: Engine, code: str) -> None:
    """Commit a sku, so that adding one with the same code fails when the unit of work flushes."""
    with engine.begin() as conn:
        conn.execute(skus.insert(), [{"code": code, "description": "", "stock": 0}])


# -- the on_success policy ----------------------------------------------------------


def test_on_success_commits_a_2xx_response(make_site: Callable[[CommitPolicy], Site], engine: Engine) -> None:
    """Under on_success, a view that answers 201 has its work committed."""
    client = make_site("on_success").app.test_client()

    response = client.post("/items/lamp")

    assert (201, ["lamp"]) == (response.status_code, names(engine))


def test_on_success_commits_a_3xx_response(make_site: Callable[[CommitPolicy], Site], engine: Engine) -> None:
    """Under on_success, a view that redirects has its work committed."""
    client = make_site("on_success").app.test_client()

    response = client.post("/items/lamp/redirect")

    assert (302, ["lamp"]) == (response.status_code, names(engine))


def test_on_success_rolls_back_a_4xx_response(make_site: Callable[[CommitPolicy], Site], engine: Engine) -> None:
    """Under on_success, a view that aborts with 409 has its work rolled back."""
    client = make_site("on_success").app.test_client()

    response = client.post("/items/lamp/abort")

    assert (409, []) == (response.status_code, names(engine))


def test_on_success_commits_what_a_service_did_in_the_request_unit_of_work(
    make_site: Callable[[CommitPolicy], Site], engine: Engine
) -> None:
    """A @transactional service called by a view joins the request's unit of work, committed on success."""
    client = make_site("on_success").app.test_client()

    response = client.post("/items/lamp/service")

    assert (201, "True", ["lamp"]) == (response.status_code, response.text, names(engine))


def test_on_success_keeps_set_rollback_only_silent(make_site: Callable[[CommitPolicy], Site], engine: Engine) -> None:
    """A view that calls set_rollback_only() answers as it says, and nothing is committed."""
    client = make_site("on_success").app.test_client()

    response = client.post("/items/lamp/rollback-only")

    assert (200, []) == (response.status_code, names(engine))


# -- the explicit policy ----------------------------------------------------------


def test_explicit_commits_only_what_the_view_commits(make_site: Callable[[CommitPolicy], Site], engine: Engine) -> None:
    """Under the explicit policy, a 201 without commit() writes nothing; with commit() it writes."""
    client = make_site("explicit").app.test_client()

    uncommitted = client.post("/items/lamp")
    committed = client.post("/items/desk?commit=1")

    assert (201, 201, ["desk"]) == (uncommitted.status_code, committed.status_code, names(engine))


def test_explicit_needs_the_view_to_commit_a_joined_service(
    make_site: Callable[[CommitPolicy], Site], engine: Engine
) -> None:
    """A @transactional service joins the request's unit of work, so the view's commit() makes it durable."""
    client = make_site("explicit").app.test_client()

    joined = client.post("/items/lamp/service")
    committed = client.post("/items/desk/service?commit=1")

    assert ("True", "True", ["desk"]) == (joined.text, committed.text, names(engine))


def test_explicit_keeps_what_was_committed_before_an_exception(
    make_site: Callable[[CommitPolicy], Site], engine: Engine
) -> None:
    """A view that commits, does more and raises gives 500; the work after the commit is rolled back."""
    client = make_site("explicit").app.test_client()

    response = client.post("/items/lamp/commit-then-fail")

    assert (500, ["lamp"]) == (response.status_code, names(engine))


# -- failures, under both policies -------------------------------------------------


@pytest.mark.parametrize("commit", ["explicit", "on_success"])
def test_an_exception_in_a_view_gives_500_and_commits_nothing(
    make_site: Callable[[CommitPolicy], Site], engine: Engine, commit: CommitPolicy
) -> None:
    """A view that raises gives 500, and what it did is rolled back."""
    client = make_site(commit).app.test_client()

    response = client.post("/items/lamp/fail")

    assert (500, []) == (response.status_code, names(engine))


@pytest.mark.parametrize(("commit", "query"), [("explicit", "?commit=1"), ("on_success", "")])
def test_a_commit_that_fails_gives_500_and_no_rows(
    make_site: Callable[[CommitPolicy], Site], engine: Engine, commit: CommitPolicy, query: str
) -> None:
    """A duplicate key found when the commit flushes gives 500, and nothing of the request is written."""
    seed_sku(engine, "taken")
    client = make_site(commit).app.test_client()

    response = client.post(f"/items/lamp/sku/taken{query}")

    assert (500, []) == (response.status_code, names(engine))


def test_a_commit_the_database_refuses_gives_500_and_no_rows(
    make_site: Callable[[CommitPolicy], Site], engine: Engine
) -> None:
    """Under on_success, a COMMIT that fails (a listener on the engine's commit raises) gives 500, no rows."""
    site = make_site("on_success")
    client = site.app.test_client()

    def refuse(conn: Connection) -> None:
        raise Boom("COMMIT refused")

    event.listen(site.engine, "commit", refuse)
    try:
        refused = client.post("/items/lamp")
    finally:
        event.remove(site.engine, "commit", refuse)
    accepted = client.post("/items/desk")

    assert (500, 201, ["desk"]) == (refused.status_code, accepted.status_code, names(engine))


def test_a_failed_commit_that_an_error_handler_maps_gives_its_status_and_no_rows(
    make_site: Callable[[CommitPolicy], Site], engine: Engine
) -> None:
    """Under on_success, an IntegrityError handler answers 409 for a commit that fails; nothing is written."""
    seed_sku(engine, "taken")
    site = make_site("on_success")
    site.app.register_error_handler(IntegrityError, lambda error: ("taken", 409))
    client = site.app.test_client()

    refused = client.post("/items/lamp/sku/taken")
    accepted = client.post("/items/desk/sku/free")

    assert (409, 201, ["desk"]) == (refused.status_code, accepted.status_code, names(engine))


def test_a_streamed_response_is_committed_before_its_body_streams(
    make_site: Callable[[CommitPolicy], Site], engine: Engine
) -> None:
    """Under on_success, a view that streams has its work committed before the first chunk is read."""
    client = make_site("on_success").app.test_client()

    response = client.post("/items/lamp/stream")
    before_the_body = names(engine)

    assert (200, ["lamp"], "lamp 1") == (response.status_code, before_the_body, response.text)


def test_an_error_in_another_after_request_function_gives_500_and_no_rows(
    make_site: Callable[[CommitPolicy], Site], engine: Engine
) -> None:
    """Under on_success, an after_request function that raises before the commit gives 500, and no commit."""
    client = make_site("on_success").app.test_client()

    response = client.post("/items/lamp?hook=fail")

    assert (500, []) == (response.status_code, names(engine))


def test_a_swallowed_service_error_gives_500_and_no_rows(
    make_site: Callable[[CommitPolicy], Site], engine: Engine
) -> None:
    """Under on_success, a view that catches the error of a joined service gives 500: the work is not committed."""
    client = make_site("on_success").app.test_client()

    response = client.post("/items/lamp/swallow")

    assert (500, []) == (response.status_code, names(engine))


@pytest.mark.parametrize("commit", ["explicit", "on_success"])
def test_no_connection_left_checked_out_after_500_requests_with_errors_mixed_in(
    make_site: Callable[[CommitPolicy], Site], engine: Engine, commit: CommitPolicy
) -> None:
    """500 requests mixing commits, exceptions, aborts, failed commits and failing hooks leave the pool full."""
    seed_sku(engine, "taken")
    site = make_site(commit)
    client = site.app.test_client()
    commits = commit == "on_success"
    # (path, status, whether the item is committed)
    kinds = [
        ("/items/{}?commit=1", 201, True),
        ("/items/{}", 201, commits),
        ("/items/{}/fail", 500, False),
        ("/items/{}/abort", 409, False),
        ("/items/{}/redirect", 302, commits),
        ("/items/{}/sku/taken?commit=1", 500, False),
        ("/items/{}/service?commit=1", 201, True),
        ("/items/{}/swallow", 500 if commits else 200, False),
        ("/items/{}?hook=fail", 500, False),
        ("/items/{}/commit-then-fail", 500, True),
    ]
    statuses: list[int] = []
    expected_statuses: list[int] = []
    expected_names: list[str] = []
    for number, (path, status, committed) in zip(range(500), itertools.cycle(kinds)):
        name = f"item {number:03}"
        statuses.append(client.post(path.format(name)).status_code)
        expected_statuses.append(status)
        if committed:
            expected_names.append(name)

    assert expected_statuses == statuses
    assert expected_names == names(engine)
    assert 0 == site.engine.pool.checkedout()


# -- application contexts outside a request ------------------------------------------


def test_cli_command_commits_on_success(make_site: Callable[[CommitPolicy], Site], engine: Engine) -> None:
    """Under on_success, a CLI command that ends normally has its work committed."""
    runner = make_site("on_success").app.test_cli_runner()

    result = runner.invoke(args=["add-item", "lamp"])

    assert (0, ["lamp"]) == (result.exit_code, names(engine))


def test_cli_command_that_fails_commits_nothing(make_site: Callable[[CommitPolicy], Site], engine: Engine) -> None:
    """Under on_success, a CLI command that raises has its work rolled back."""
    runner = make_site("on_success").app.test_cli_runner()

    result = runner.invoke(args=["add-item", "lamp", "--fail"])

    assert (1, Boom, []) == (result.exit_code, type(result.exception), names(engine))


def test_cli_command_whose_commit_fails_exits_with_the_error(
    make_site: Callable[[CommitPolicy], Site], engine: Engine
) -> None:
    """Under on_success, a CLI command whose commit fails at the end of its context fails with that error; no rows."""
    seed_sku(engine, "taken")
    runner = make_site("on_success").app.test_cli_runner()

    result = runner.invoke(args=["add-item", "lamp", "--sku", "taken"])

    assert (1, IntegrityError, []) == (result.exit_code, type(result.exception), names(engine))


def test_cli_command_under_explicit_commits_only_what_it_commits(
    make_site: Callable[[CommitPolicy], Site], engine: Engine
) -> None:
    """Under the explicit policy, a CLI command writes only what it commits."""
    runner = make_site("explicit").app.test_cli_runner()

    uncommitted = runner.invoke(args=["add-item", "lamp"])
    committed = runner.invoke(args=["add-item", "desk", "--commit"])

    assert (0, 0, ["desk"]) == (uncommitted.exit_code, committed.exit_code, names(engine))


def test_app_context_commits_on_success_when_it_ends(make_site: Callable[[CommitPolicy], Site], engine: Engine) -> None:
    """Under on_success, `with app.app_context():` commits when it ends without an exception."""
    site = make_site("on_success")

    with site.app.app_context():
        site.ext.uow.items.add(Item("lamp"))
        assert [] == names(engine)

    assert ["lamp"] == names(engine)


def test_app_context_that_raises_commits_nothing(make_site: Callable[[CommitPolicy], Site], engine: Engine) -> None:
    """Under on_success, `with app.app_context():` that ends with an exception rolls back."""
    site = make_site("on_success")

    with pytest.raises(Boom), site.app.app_context():
        site.ext.uow.items.add(Item("lamp"))
        raise Boom

    assert [] == names(engine)


def test_app_context_commit_that_fails_raises_when_the_context_ends(
    make_site: Callable[[CommitPolicy], Site], engine: Engine
) -> None:
    """Under on_success, a commit that fails at the end of an application context raises there; no rows."""
    seed_sku(engine, "taken")
    site = make_site("on_success")

    with pytest.raises(IntegrityError), site.app.app_context():
        site.ext.uow.items.add(Item("lamp"))
        site.ext.uow.skus.add(Sku("taken"))

    assert [] == names(engine)


# -- what the application already has, and the engine's lifetime ------------------------


def test_an_app_given_its_engine_and_sessionmaker_commits_through_them(
    database: Database, engine: Engine, provisioner: Provisioner
) -> None:
    """init_app(engine=...) with a factory over the application's sessionmaker: requests use its sessions."""
    app_engine = provisioner.track(database.engine())
    session_factory = sessionmaker(app_engine, expire_on_commit=False, info={"made by": "the application"})
    ext: UnitOfWorkExtension[ShopUnitOfWork] = UnitOfWorkExtension(
        factory=SqlAlchemyShopUnitOfWork, commit="on_success"
    )
    app = Flask(__name__)
    ext.init_app(app, engine=app_engine, factory=lambda engine: SqlAlchemyShopUnitOfWork(session_factory))

    @app.post("/items/<name>")
    def add(name: str) -> tuple[str, int]:
        ext.uow.items.add(Item(name))
        return str(ext.uow.session.info["made by"]), 201

    response = app.test_client().post("/items/lamp")
    with app.app_context():
        found = ext.engine

    assert (201, "the application", ["lamp"]) == (response.status_code, response.text, names(engine))
    assert app_engine is found


def closes_of(engine: Engine) -> list[str]:
    """A list that grows each time the pool of *engine* closes one of its connections."""
    closes: list[str] = []
    event.listen(engine, "close", lambda *args: closes.append("close"))
    return closes


def test_a_built_engine_is_disposed_of_when_the_app_is_garbage_collected(database: Database) -> None:
    """The engine built from UOW_DATABASE_URL closes its pooled connections when its app goes away."""
    app = Flask(__name__)
    app.config["UOW_DATABASE_URL"] = database.url
    ext = UnitOfWorkExtension(app, factory=SqlAlchemyShopUnitOfWork)
    with app.app_context():
        built = ext.engine
    closes = closes_of(built)
    with built.connect() as connection:
        connection.execute(text("SELECT 1"))

    pooled = built.pool.checkedin()
    del app
    gc.collect()

    assert (1, ["close"], 0) == (pooled, closes, built.pool.checkedin())


def test_a_given_engine_is_never_disposed_of(database: Database, provisioner: Provisioner) -> None:
    """An engine given to init_app() keeps its pooled connections when its app goes away: it is the application's."""
    given = provisioner.track(database.engine())
    closes = closes_of(given)
    app = Flask(__name__)
    UnitOfWorkExtension(factory=SqlAlchemyShopUnitOfWork).init_app(app, engine=given)
    with given.connect() as connection:
        connection.execute(text("SELECT 1"))

    del app
    gc.collect()

    assert ([], 1) == (closes, given.pool.checkedin())
    given.dispose()


def run_python(code: str, database: Database, tmp_path: Path) -> str:
    """What *code* prints, run by a Python of its own (which ends as a process does), with the URL in $URL."""
    env = {**os.environ, "URL": database.url.render_as_string(hide_password=False)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert 0 == result.returncode, result.stderr
    return result.stdout


def test_a_built_engine_is_disposed_of_when_the_interpreter_exits(database: Database, tmp_path: Path) -> None:
    """At exit, the engine built from the configuration closes its connections; the one given to init_app() does not."""
    code = """
        import os
        from flask import Flask
        from sqlalchemy import create_engine, event, text
        from uow import FakeUnitOfWork
        from uow.flask import UnitOfWorkExtension

        built, given = Flask("built"), Flask("given")
        built.config["UOW_DATABASE_URL"] = os.environ["URL"]
        ext = UnitOfWorkExtension(built, factory=lambda engine: FakeUnitOfWork())
        ext.init_app(given, engine=create_engine(os.environ["URL"]))
        for app in (built, given):
            with app.app_context(), ext.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
                event.listen(ext.engine, "close", lambda *args, name=app.name: print(name, "closed"))
        print("exiting")
    """

    assert "exiting\nbuilt closed\n" == run_python(code, database, tmp_path)


def test_a_forked_process_gets_a_pool_of_its_own(database: Database, tmp_path: Path) -> None:
    """A forked child gets a new pool, and its exit closes only its own connections: the parent's still work."""
    code = """
        import os, sys
        from flask import Flask
        from sqlalchemy import text
        from uow import FakeUnitOfWork
        from uow.flask import UnitOfWorkExtension

        app = Flask("shop")
        app.config["UOW_DATABASE_URL"] = os.environ["URL"]
        ext = UnitOfWorkExtension(app, factory=lambda engine: FakeUnitOfWork())
        with app.app_context():
            engine = ext.engine
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        sys.stdout.flush()
        child = os.fork()
        if child == 0:
            print("child", engine.pool.checkedin(), flush=True)
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            sys.exit(0)  # the child's exit disposes of its engine
        os.waitpid(child, 0)
        print("parent", engine.pool.checkedin())
        with engine.connect() as connection:  # the connection the parent pooled before the fork
            print("still open:", connection.execute(text("SELECT 1")).scalar() == 1)
    """

    assert "child 0\nparent 1\nstill open: True\n" == run_python(code, database, tmp_path)
