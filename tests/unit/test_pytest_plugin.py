"""uow's pytest plugin without a database: the fake fixtures through pytester, and capture_on_commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from pytest_mock import MockerFixture

from tests.support.models import Item
from tests.support.uows import AsyncFakeShopUnitOfWork, FakeShopUnitOfWork, ShopUnitOfWork
from uow import errors, pytest_plugin
from uow.pytest_plugin import capture_on_commit

pytest_plugins = ["pytester"]

#: The inner runs use pytest's strict asyncio mode, so that nothing async works by accident.
INI = """
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
asyncio_default_test_loop_scope = function
filterwarnings = error
"""

FAKE_CONFTEST = """
import pytest

from tests.support.uows import AsyncFakeShopUnitOfWork, FakeShopUnitOfWork, ShopUnitOfWork


@pytest.fixture
def uow_fake_factory():
    return FakeShopUnitOfWork


@pytest.fixture
def uow_async_fake_factory():
    return AsyncFakeShopUnitOfWork
"""

FAKE_TESTS = '''
import pytest

from tests.support.models import Item
from tests.support.uows import FakeShopUnitOfWork


def stock(uow, name, qty):
    with uow:
        uow.items.add(Item(name, qty))
        uow.commit()


def test_a_commits_to_its_fake(uow_fake):
    """A service commits to the test's fake."""
    stock(uow_fake, "lamp", 3)
    assert 1 == uow_fake.commits
    with uow_fake:
        assert ["lamp"] == [item.name for item in uow_fake.items.list()]


def test_b_gets_a_fake_of_its_own(uow_fake):
    """The next test gets a new, empty fake of the project's class."""
    assert FakeShopUnitOfWork is type(uow_fake)
    with uow_fake:
        assert 0 == uow_fake.items.count()


@pytest.mark.parametrize("uow_fake_factory", [lambda: FakeShopUnitOfWork(autocommit=True)])
def test_c_takes_a_factory_from_parametrize(uow_fake):
    """A test can give its own factory through parametrize."""
    with uow_fake:
        uow_fake.items.add(Item("rug", 1))
    assert (True, 1) == (uow_fake.autocommit, uow_fake.commits)


def test_d_spies_on_the_commit(uow_fake, mocker):
    """pytest-mock spies on the fake's commit."""
    commit = mocker.spy(uow_fake, "commit")
    stock(uow_fake, "desk", 1)
    commit.assert_called_once_with()


@pytest.mark.asyncio
async def test_e_commits_to_its_async_fake(uow_async_fake):
    """An async service commits to the test's async fake."""
    async with uow_async_fake:
        await uow_async_fake.items.add(Item("chair", 2))
        await uow_async_fake.commit()
    async with uow_async_fake:
        assert ["chair"] == [item.name for item in await uow_async_fake.items.list()]


def test_f_captures_hooks_through_the_fixture(uow_fake, uow_capture_on_commit):
    """The fixture captures hooks without running them."""
    sent = []
    with uow_capture_on_commit(uow_fake) as hooks:
        with uow_fake:
            uow_fake.on_commit(lambda: sent.append("mail"))
            uow_fake.commit()
    assert (1, []) == (len(hooks), sent)
'''

FIXTURE_NAMES = '''
def test_fixture_names(request):
    """Prints the fixtures this test gets."""
    print("fixtures:", sorted(request.fixturenames))
'''


@pytest.fixture(name="inner")
def _inner(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> pytest.Pytester:
    """A pytester project that can import the test support code and loads its plugins itself.

    Plugins are named explicitly, with autoloading off, so that the runs are the same whether or not
    uow's entry point is installed: pytest refuses a plugin that its entry point and ``-p`` both load.
    """
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTHONPATH", str(request.config.rootpath))
    pytester.makeini(INI)
    return pytester


def run(pytester: pytest.Pytester, *args: str, plugin: bool = True) -> pytest.RunResult:
    """Run the inner suite in a new process with pytest-asyncio, pytest-mock and, unless told not to, uow's plugin.

    A new process, because this one has imported uow's plugin already, which pytest would not load again.
    """
    plugins = ["-p", "pytest_asyncio.plugin", "-p", "pytest_mock"] + (["-p", "uow.pytest_plugin"] if plugin else [])
    return pytester.runpytest_subprocess(*plugins, *args)


# -- the fixtures, through pytester ---------------------------------------------


def test_each_test_gets_a_fresh_fake_from_the_overridden_factory(inner: pytest.Pytester) -> None:
    """uow_fake and uow_async_fake build the project's fakes, a new one for each test, and mocker can spy on them."""
    inner.makeconftest(FAKE_CONFTEST)
    inner.makepyfile(test_fakes=FAKE_TESTS)

    result = run(inner)

    result.assert_outcomes(passed=6)


@pytest.mark.parametrize(
    ("fixture", "override"),
    [
        ("uow_fake", "uow_fake_factory"),
        ("uow_async_fake", "uow_async_fake_factory"),
        ("uow_session_factory", "uow_engine"),
        ("uow_async_session_factory", "uow_async_engine"),
    ],
)
def test_a_fixture_left_unset_says_how_to_set_it(inner: pytest.Pytester, fixture: str, override: str) -> None:
    """Requesting a fixture whose factory or engine the project did not override errors with the override to write."""
    inner.makepyfile(f"def test_needs_it({fixture}):\n    pass\n")

    result = run(inner)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            f"*ConfigurationError: the {override} fixture is not set*Override it in your conftest.py*",
            f"*def {override}():",
        ]
    )


@pytest.mark.parametrize(
    ("conftest", "fixture", "message"),
    [
        (
            "from tests.support.uows import AsyncFakeShopUnitOfWork\n"
            "import pytest\n\n@pytest.fixture\ndef uow_fake_factory():\n    return AsyncFakeShopUnitOfWork\n",
            "uow_fake",
            "*uow_fake_factory returned * not a uow.UnitOfWork*",
        ),
        (
            "from tests.support.uows import FakeShopUnitOfWork\n"
            "import pytest\n\n@pytest.fixture\ndef uow_async_fake_factory():\n    return FakeShopUnitOfWork\n",
            "uow_async_fake",
            "*uow_async_fake_factory returned * not a uow.AsyncUnitOfWork*",
        ),
        (
            "from sqlalchemy.ext.asyncio import create_async_engine\n"
            "import pytest\n\n@pytest.fixture\ndef uow_engine():\n"
            "    return create_async_engine('sqlite+aiosqlite://')\n",
            "uow_session_factory",
            "*uow_engine returned * not a sqlalchemy.Engine*",
        ),
    ],
    ids=["sync-fake", "async-fake", "engine"],
)
def test_a_factory_of_the_wrong_kind_is_refused(
    inner: pytest.Pytester, conftest: str, fixture: str, message: str
) -> None:
    """An async fake where a sync one goes, or the reverse, or an async engine for the sync fixtures, errors."""
    inner.makeconftest(conftest)
    inner.makepyfile(f"def test_needs_it({fixture}):\n    pass\n")

    result = run(inner)

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ConfigurationError*", message])


def test_the_plugin_changes_nothing_for_tests_that_do_not_use_it(inner: pytest.Pytester) -> None:
    """The plugin has no hooks and no autouse fixture: a test that requests nothing gets the same fixtures."""
    inner.makepyfile(test_names=FIXTURE_NAMES)

    with_plugin = run(inner, "-s")
    without_plugin = run(inner, "-s", plugin=False)

    with_plugin.assert_outcomes(passed=1)
    without_plugin.assert_outcomes(passed=1)
    [names] = [line for line in with_plugin.outlines if "fixtures:" in line]
    assert [names] == [line for line in without_plugin.outlines if "fixtures:" in line]
    assert [] == [name for name in vars(pytest_plugin) if name.startswith("pytest_")]


# -- capture_on_commit ----------------------------------------------------------


class Boom(Exception):
    """Raised inside a block to make it fail."""


def stock_and_notify(unit: ShopUnitOfWork, name: str, sent: list[str]) -> None:
    """A service that stores an item and sends a message once it is committed."""
    with unit:
        unit.items.add(Item(name, 1))
        unit.on_commit(lambda: sent.append(f"{name} stocked"))
        unit.commit()


def test_captured_hooks_are_listed_after_the_commit_and_not_run() -> None:
    """By default a captured hook does not run; it joins the list when the real commit would run it."""
    fake = FakeShopUnitOfWork()
    sent: list[str] = []

    with capture_on_commit(fake) as hooks, fake:
        fake.on_commit(lambda: sent.append("owner"))
        with fake:
            fake.on_commit(lambda: sent.append("joined"))
            fake.commit()
        assert [] == hooks  # a joined commit runs nothing
        fake.commit()

    assert 2 == len(hooks)
    assert [] == sent
    for hook in hooks:
        hook()
    assert ["owner", "joined"] == sent


def test_hooks_of_rolled_back_work_are_not_captured() -> None:
    """Hooks dropped by a rollback, a rolled-back savepoint or a block left without commit never reach the list."""
    fake = FakeShopUnitOfWork()
    sent: list[str] = []

    with capture_on_commit(fake) as hooks:
        with fake:
            fake.on_commit(lambda: sent.append("left without commit"))
        with fake:
            fake.on_commit(lambda: sent.append("rolled back"))
            fake.rollback()
            with pytest.raises(Boom), fake.savepoint():
                fake.on_commit(lambda: sent.append("in a failed savepoint"))
                raise Boom
            with fake.savepoint():
                fake.on_commit(lambda: sent.append("in a released savepoint"))
            fake.commit()

    [hook] = hooks
    hook()
    assert ["in a released savepoint"] == sent


def test_execute_runs_the_hooks_as_the_unit_of_work_does(caplog: pytest.LogCaptureFixture) -> None:
    """With execute=True hooks run at the commit, hooks they register are captured too, and robust ones log."""
    fake = FakeShopUnitOfWork()
    sent: list[str] = []

    def broken() -> None:
        raise ConnectionError("the mail server is down")

    def first() -> None:
        sent.append("first")
        fake.on_commit(lambda: sent.append("registered by a hook"))

    with capture_on_commit(fake, execute=True) as hooks, fake:
        fake.on_commit(first)
        fake.on_commit(broken, robust=True)
        fake.on_commit(lambda: sent.append("last"))
        with caplog.at_level(logging.ERROR, logger="uow"):
            fake.commit()
        assert ["first", "last", "registered by a hook"] == sent

    assert [first, broken] == hooks[:2]
    assert 4 == len(hooks)
    assert ["broken"] == [record.args[1].__name__ for record in caplog.records]  # type: ignore[index,union-attr]


def test_a_failing_hook_still_fails_the_commit_under_execute() -> None:
    """A hook that is not robust raises from commit(), after the data is committed, as without the capture."""
    fake = FakeShopUnitOfWork()

    def broken() -> None:
        raise ConnectionError("the mail server is down")

    with capture_on_commit(fake, execute=True) as hooks, fake:
        fake.items.add(Item("lamp", 1))
        fake.on_commit(broken)
        with pytest.raises(ConnectionError):
            fake.commit()

    assert [broken] == hooks
    with fake:
        assert 1 == fake.items.count()


def test_a_mock_hook_shows_how_it_was_run(mocker: MockerFixture) -> None:
    """pytest-mock: a mock registered as a hook, captured with execute=True, records that it ran once."""
    fake = FakeShopUnitOfWork()
    notify = mocker.Mock(name="notify")

    with capture_on_commit(fake, execute=True) as hooks, fake:
        fake.on_commit(notify)
        notify.assert_not_called()
        fake.commit()

    notify.assert_called_once_with()
    assert [notify] == hooks


def test_the_unit_of_work_is_given_back_after_the_capture() -> None:
    """After the block, hooks are no longer captured and run as usual; a spy set before the capture is kept."""
    fake = FakeShopUnitOfWork()
    sent: list[str] = []

    with capture_on_commit(fake) as hooks:
        pass
    stock_and_notify(fake, "lamp", sent)

    assert ([], ["lamp stocked"]) == (hooks, sent)
    assert "on_commit" not in vars(fake)


def test_a_hook_registered_inside_is_captured_at_its_commit_after_the_block() -> None:
    """A hook registered during the capture is captured even when its commit comes after the capture's block."""
    fake = FakeShopUnitOfWork()
    sent: list[str] = []

    with fake:
        with capture_on_commit(fake) as hooks:
            fake.on_commit(lambda: sent.append("mail"))
        fake.on_commit(lambda: sent.append("not captured"))
        fake.commit()

    assert (1, ["not captured"]) == (len(hooks), sent)


def test_a_spy_on_on_commit_survives_the_capture(mocker: MockerFixture) -> None:
    """A pytest-mock spy on on_commit sees the registrations during the capture, and is back in place after it."""
    fake = FakeShopUnitOfWork()
    spy = mocker.spy(fake, "on_commit")

    with capture_on_commit(fake) as hooks:
        stock_and_notify(fake, "lamp", [])

    assert (1, 1) == (spy.call_count, len(hooks))
    assert spy is fake.on_commit


def test_capture_keeps_the_checks_of_on_commit() -> None:
    """The sync unit of work still refuses a coroutine function or a non-callable while its hooks are captured."""
    fake = FakeShopUnitOfWork()

    async def send() -> None:
        pass

    with capture_on_commit(fake) as hooks, fake:
        with pytest.raises(errors.ConfigurationError, match="is a coroutine function"):
            fake.on_commit(send)
        with pytest.raises(errors.ConfigurationError, match="takes a callable"):
            fake.on_commit("send")  # type: ignore[arg-type]
        fake.commit()

    assert [] == hooks


def test_capture_refuses_what_it_cannot_capture() -> None:
    """Something other than a unit of work, or a second capture of the same one, raises ConfigurationError."""
    fake = FakeShopUnitOfWork()

    with pytest.raises(errors.ConfigurationError, match="takes a unit of work"):
        capture_on_commit(object()).__enter__()  # type: ignore[arg-type]
    with capture_on_commit(fake), pytest.raises(errors.ConfigurationError, match="already capturing"):
        capture_on_commit(fake).__enter__()
    with capture_on_commit(fake) as hooks:
        assert [] == hooks  # the refused capture left nothing behind


def test_async_hooks_are_captured_and_awaited_only_with_execute() -> None:
    """On an async unit of work a coroutine hook is listed without being called, and awaited with execute=True."""
    fake = AsyncFakeShopUnitOfWork()
    sent: list[str] = []

    async def send() -> None:
        sent.append("sent")

    async def scenario(execute: bool) -> list[Callable[[], object]]:
        with capture_on_commit(fake, execute=execute) as hooks:
            async with fake:
                fake.on_commit(send)
                await fake.commit()
        return hooks

    assert ([send], []) == (asyncio.run(scenario(execute=False)), sent)
    assert ([send], ["sent"]) == (asyncio.run(scenario(execute=True)), sent)
