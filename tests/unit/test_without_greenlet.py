"""uow without greenlet, which SQLAlchemy 2.1 no longer installs: only the async SQLAlchemy classes need it.

Each test runs a new interpreter in which ``import greenlet`` fails, as in an
install of uow without the ``asyncio`` extra: a ``sitecustomize`` module on
its ``PYTHONPATH`` blocks greenlet before anything else is imported. A new
interpreter each time, also because SQLAlchemy raises ImportError only on
the first import of its asyncio extension without greenlet.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SITECUSTOMIZE = """\
import sys

sys.modules["greenlet"] = None  # `import greenlet` now raises ImportError, as when it is not installed
"""

#: The async fake of the test below, and a model for it, without anything from the test suite.
ASYNC_FAKE = """\
import asyncio

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import uow
from uow import AsyncFakeUnitOfWork


class Base(DeclarativeBase):
    pass


class Batch(Base):
    __tablename__ = "batches"
    reference: Mapped[str] = mapped_column(String(50), primary_key=True)
    available: Mapped[int]


class AsyncShopUnitOfWork(uow.AsyncUnitOfWork):
    batches = uow.repository(Batch)


class AsyncFakeShopUnitOfWork(AsyncFakeUnitOfWork, AsyncShopUnitOfWork):
    pass


async def scenario(unit):
    async with unit:
        await unit.batches.add(Batch(reference="b1", available=10))
        await unit.commit()
    async with unit:
        batch = await unit.batches.get("b1")
        batch.available -= 3
        await unit.commit()
    async with unit:
        return (await unit.batches.get("b1")).available


unit = AsyncFakeShopUnitOfWork()
print(asyncio.run(scenario(unit)), unit.commits)
"""

#: A project's tests that use the plugin's fake fixtures, sync and async.
FAKE_FIXTURES = """\
import asyncio

import pytest

import uow


class ShopUnitOfWork(uow.UnitOfWork):
    pass


class FakeShopUnitOfWork(uow.FakeUnitOfWork, ShopUnitOfWork):
    pass


class AsyncShopUnitOfWork(uow.AsyncUnitOfWork):
    pass


class AsyncFakeShopUnitOfWork(uow.AsyncFakeUnitOfWork, AsyncShopUnitOfWork):
    pass


@pytest.fixture
def uow_fake_factory():
    return FakeShopUnitOfWork


@pytest.fixture
def uow_async_fake_factory():
    return AsyncFakeShopUnitOfWork


def test_greenlet_is_missing():
    with pytest.raises(ImportError):
        import greenlet


def test_the_fake_commits(uow_fake):
    with uow_fake:
        uow_fake.commit()
    assert 1 == uow_fake.commits


def test_the_async_fake_commits(uow_async_fake):
    async def scenario():
        async with uow_async_fake:
            await uow_async_fake.commit()

    asyncio.run(scenario())
    assert 1 == uow_async_fake.commits
"""


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    """A folder to run in, whose ``site`` folder holds the sitecustomize module that blocks greenlet."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return tmp_path


def run(bare: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run this interpreter with *args* in *bare*, greenlet blocked, and no pytest settings of this run."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    environ.update(env or {}, PYTHONPATH=str(bare / "site"))
    return subprocess.run(
        [sys.executable, *args], cwd=bare, env=environ, capture_output=True, text=True, timeout=120, check=False
    )


def run_code(bare: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run *code* as a script in *bare*; fail the test, showing its output, if it fails."""
    script = bare / "script.py"
    script.write_text(code, encoding="utf-8")
    result = run(bare, str(script))
    assert 0 == result.returncode, result.stdout + result.stderr
    return result


def readme_quickstart() -> str:
    """The first ```python block of README.md: the sync quickstart."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^```python\n(.*?)^```$", readme, flags=re.DOTALL | re.MULTILINE)
    assert match is not None, "README.md has no ```python block"
    return match.group(1)


def test_greenlet_and_the_asyncio_extension_cannot_be_imported(bare: Path) -> None:
    """In these tests' interpreters, `import greenlet` and `import sqlalchemy.ext.asyncio` raise ImportError."""
    code = textwrap.dedent("""\
        for name in ("greenlet", "sqlalchemy.ext.asyncio"):
            try:
                __import__(name)
            except ImportError:
                print(name, "ImportError")
            else:
                print(name, "imported")
        """)

    result = run_code(bare, code)

    assert ["greenlet ImportError", "sqlalchemy.ext.asyncio ImportError"] == result.stdout.splitlines()


def test_import_uow_imports_nothing_async(bare: Path) -> None:
    """`import uow` and its pytest plugin work, and neither imports SQLAlchemy's asyncio extension."""
    code = textwrap.dedent("""\
        import sys

        import uow
        import uow.pytest_plugin

        print([name for name in sys.modules if name.startswith("sqlalchemy.ext.asyncio")])
        print(uow.SqlAlchemyUnitOfWork.__name__, uow.AsyncSqlAlchemyRepository.__name__)
        """)

    result = run_code(bare, code)

    assert ["[]", "SqlAlchemyUnitOfWork AsyncSqlAlchemyRepository"] == result.stdout.splitlines()


def test_the_readme_quickstart_runs(bare: Path) -> None:
    """The README's sync quickstart, its production run on SQLite and its unit test, runs without greenlet."""
    code = readme_quickstart()

    result = run_code(bare, code)

    assert "" == result.stderr


def test_the_async_sqlalchemy_unit_of_work_names_the_extra(bare: Path) -> None:
    """uow.AsyncSqlAlchemyUnitOfWork raises an ImportError that says to install uow[asyncio], every time it is used."""
    code = textwrap.dedent("""\
        import uow

        for _ in range(2):  # SQLAlchemy lets a second import of its asyncio extension through
            try:
                uow.AsyncSqlAlchemyUnitOfWork
            except ImportError as error:
                print(type(error).__name__, error.name, "install uow[asyncio]" in str(error))
            else:
                print("imported")
        """)

    result = run_code(bare, code)

    assert ["ImportError greenlet True", "ImportError greenlet True"] == result.stdout.splitlines()


def test_the_async_fake_runs(bare: Path) -> None:
    """`from uow import AsyncFakeUnitOfWork` works, and an async fake's blocks add, change and commit."""
    result = run_code(bare, ASYNC_FAKE)

    assert "7 2\n" == result.stdout


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ((), {}),
        (("-p", "uow.pytest_plugin"), {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}),
    ],
    ids=["entry-point", "dash-p"],
)
def test_pytest_runs_the_fake_fixtures(bare: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
    """pytest loads uow's plugin, from its entry point or from -p, and the fake fixtures work."""
    (bare / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (bare / "test_shop.py").write_text(FAKE_FIXTURES, encoding="utf-8")

    result = run(bare, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, env=env)

    assert 0 == result.returncode, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_the_async_database_fixtures_say_what_to_install(bare: Path) -> None:
    """Each async database fixture, when a test requests it, errors with a message naming uow[asyncio]."""
    ini = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"  # pytest-asyncio's
    (bare / "pytest.ini").write_text(ini, encoding="utf-8")
    (bare / "test_engine.py").write_text("def test_engine(uow_async_engine):\n    pass\n", encoding="utf-8")
    (bare / "test_connection.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\ndef uow_async_engine():\n    return object()\n\n"
        "async def test_connection(uow_async_connection):\n    pass\n",
        encoding="utf-8",
    )
    (bare / "test_session_factory.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\ndef uow_async_connection():\n    return object()\n\n"
        "def test_session_factory(uow_async_session_factory):\n    pass\n",
        encoding="utf-8",
    )

    result = run(bare, "-m", "pytest", "-p", "no:cacheprovider")

    assert 1 == result.returncode, result.stdout + result.stderr
    for fixture in ("uow_async_engine", "uow_async_connection", "uow_async_session_factory"):
        pattern = rf"ConfigurationError: the {fixture} fixture runs on SQLAlchemy's asyncio extension, which needs "
        assert re.search(pattern + r"greenlet: install uow\[asyncio\]", result.stdout), result.stdout
    assert "3 errors" in result.stdout


def test_the_fixtures_check_for_greenlet_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """The async fixtures' check fails without greenlet even where sqlalchemy.ext.asyncio imported once already."""
    pytest.importorskip("greenlet")
    import sqlalchemy.ext.asyncio  # noqa: F401  # imported: a second import would not tell that greenlet is missing

    from uow import errors, pytest_plugin

    monkeypatch.setitem(sys.modules, "greenlet", None)

    with pytest.raises(errors.ConfigurationError, match=r"the uow_async_engine fixture .* install uow\[asyncio\]"):
        pytest_plugin._need_greenlet("uow_async_engine")
