"""A newcomer's path: a fresh virtualenv, uow installed as the README says, and every page's examples run as copied.

The module builds, once, what a newcomer builds by following the README:

1. a new virtualenv in a temporary folder, outside the checkout, with nothing
   of the project's development environment (no ``PYTHONPATH=examples``, no
   dev dependency group);
2. uow installed there by the ``pip install`` command that README.md and
   docs/index.md give for running every example (the one with the
   ``testing`` extra), read from the README itself and run as written, from
   the root of the checkout;
3. the Python examples of README.md and docs/*.md run in that virtualenv.

The examples run as the test suite runs them: with Sybil, configured by the
``conftest.py`` at the root of the repository, copied next to a copy of the
pages. That keeps the pages' own conventions (the blocks of a page run in
order in one namespace, invisible blocks run too, skip directives skip), and
Sybil is the only package added to what the documented command installs.
The run uses pytest's defaults a newcomer has (pytest-asyncio in strict
mode), with warnings as errors as in the project's own run.

pip's cache is used as usual, so a run takes about 25 seconds on two
cores. The tests need PyPI (or the index pip is configured with); they are
marked ``integration``: ``-m "not integration"`` or
``--deselect tests/integration/test_newcomer.py`` leaves them out locally.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
OVERVIEW = ROOT / "docs" / "index.md"
#: Every page whose Python examples the test suite runs (see the root conftest.py), as a path from the root.
PAGES = ["README.md", *sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md"))]
#: A shell block of a Markdown page.
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```[ \t]*$", flags=re.MULTILINE | re.DOTALL)
#: Where Sybil's PythonCodeBlockParser finds a block: a ```python fence, or an invisible block.
PYTHON_BLOCK = re.compile(r"^(?:```python[ \t]*$|<!--\s*invisible-code-block:\s*python)", flags=re.MULTILINE)
#: The settings of the run, beside the root conftest.py. pytest-asyncio warns when its loop scope is unset,
#: and the pages' async fixtures use function scope, as docs/pytest.md says.
PYTEST_INI = """\
[pytest]
filterwarnings =
    error
asyncio_default_fixture_loop_scope = function
"""
#: Variables of the development environment that must not reach the newcomer's commands.
DEV_VARIABLES = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTEST_ADDOPTS",
    "PYTEST_PLUGINS",
    "COVERAGE_PROCESS_START",
)
TIMEOUT = 600  # seconds, for an install on a cold cache; a warm one takes seconds

pytestmark = pytest.mark.integration


def documented_install(page: Path) -> list[str]:
    """The arguments of the one ``pip install`` command of *page* that installs uow's ``testing`` extra."""
    commands = []
    for block in SHELL_BLOCK.findall(page.read_text(encoding="utf-8")):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["pip", "install"] and any(re.search(r"\[[^]]*\btesting\b", word) for word in words):
                commands.append(words)
    assert 1 == len(commands), (
        f"{page.relative_to(ROOT)} must give exactly one `pip install` command with the `testing` extra, "
        f"the one that makes every example run as copied; it gives {commands}"
    )
    return commands[0]


def python_block_lines(page: str) -> list[int]:
    """The line numbers at which Sybil finds the Python blocks of *page*, as its test ids name them."""
    text = (ROOT / page).read_text(encoding="utf-8")
    return [text.count("\n", 0, match.start()) + 1 for match in PYTHON_BLOCK.finditer(text)]


@dataclass(frozen=True)
class Outcome:
    """What became of one block in the newcomer's run."""

    result: str  # "passed", "failed", "error" or "skipped"
    detail: str


@dataclass(frozen=True)
class NewcomerRun:
    """The newcomer's virtualenv, and what running the pages there gave."""

    venv: Path
    installed: frozenset[str]  # the distributions the documented command installed
    runner: frozenset[str]  # the distributions added to run the pages
    uow_file: str
    prefix: str
    outcomes: dict[str, dict[int, Outcome]]  # page -> block line -> outcome
    output: str  # pytest's output, for a page that was not collected at all

    def describe(self, page: str, line: int, outcome: Outcome) -> str:
        """A failure message naming the page and the block."""
        return f"{page}, the block at line {line}, {outcome.result} in the newcomer's virtualenv:\n{outcome.detail}"


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run *command*; fail with its output if it fails."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert 0 == result.returncode, f"`{shlex.join(command)}` failed in {cwd}:\n{result.stdout}\n{result.stderr}"
    return result


def _distributions(python: Path, env: dict[str, str], cwd: Path) -> frozenset[str]:
    """The names of the distributions installed in the virtualenv of *python*."""
    script = "import importlib.metadata as m, json; print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
    names = json.loads(_run([str(python), "-c", script], cwd, env).stdout)
    return frozenset(re.sub(r"[-_.]+", "-", name).lower() for name in names)


def _outcomes(junit: Path) -> dict[str, dict[int, Outcome]]:
    """The outcome of each block, by page and line, from pytest's JUnit XML report."""
    outcomes: dict[str, dict[int, Outcome]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        match = re.search(r"\bline:(\d+)", case.get("name", ""))
        if match is None:  # a file that failed to be collected, reported by its name alone
            continue
        result, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                result = "failed" if kind == "failure" else kind
                detail = f"{element.get('message', '')}\n{element.text or ''}".strip()
        outcomes.setdefault(case.get("classname", ""), {})[int(match.group(1))] = Outcome(result, detail)
    return outcomes


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NewcomerRun]:
    """A fresh virtualenv with uow installed as documented, and the pages of the documentation run there."""
    work = tmp_path_factory.mktemp("newcomer")
    venv = work / ".venv"
    env = {name: value for name, value in os.environ.items() if name not in DEV_VARIABLES}
    env["VIRTUAL_ENV"] = str(venv)  # what `. .venv/bin/activate` does
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])

    # python3 -m venv .venv
    _run([sys.executable, "-m", "venv", str(venv)], work, env)
    python = venv / "bin" / "python"
    # The `pip install` of the README that makes every example run, as written, from the root of the checkout.
    command = documented_install(README)
    _run([str(python), "-m", *command], ROOT, env)
    installed = _distributions(python, env, work)
    # The runner of the pages: the version of Sybil the project's own run uses, and nothing else.
    _run([str(python), "-m", "pip", "install", f"sybil=={importlib.metadata.version('sybil')}"], work, env)
    runner = _distributions(python, env, work) - installed

    # The pages and the Sybil configuration of the repository, and nothing else of the checkout.
    pages = work / "pages"
    shutil.copytree(ROOT / "docs", pages / "docs", ignore=shutil.ignore_patterns("__pycache__", "*.py", "*.pyc"))
    shutil.copy2(README, pages / "README.md")
    shutil.copy2(ROOT / "conftest.py", pages / "conftest.py")
    (pages / "pytest.ini").write_text(PYTEST_INI, encoding="utf-8")

    where = _run([str(python), "-c", "import sys, uow; print(uow.__file__); print(sys.prefix)"], pages, env)
    uow_file, prefix = where.stdout.splitlines()[:2]
    junit = work / "junit.xml"
    pages_run = subprocess.run(
        [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={junit}"],
        cwd=pages,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    output = pages_run.stdout + pages_run.stderr
    assert junit.exists(), f"pytest did not run the pages in the newcomer's virtualenv:\n{output}"
    yield NewcomerRun(venv, installed, runner, uow_file, prefix, _outcomes(junit), output)
    shutil.rmtree(work, ignore_errors=True)  # the virtualenv is a hundred megabytes


def test_readme_and_overview_give_the_same_install_command() -> None:
    """README.md and docs/index.md give the newcomer the same command for running every example."""
    assert documented_install(README) == documented_install(OVERVIEW)


def test_uow_is_installed_in_the_new_virtualenv(newcomer: NewcomerRun) -> None:
    """The pages import uow through the new virtualenv, which holds uow, its documented extras and Sybil only."""
    assert Path(newcomer.prefix).resolve() == newcomer.venv.resolve()
    assert Path(newcomer.uow_file).resolve().is_relative_to(ROOT / "src" / "uow")  # `pip install -e .` links it
    assert {"uow", "sqlalchemy", "attrs", "aiosqlite", "flask", "fastapi", "pytest", "httpx"} <= newcomer.installed
    assert {"sybil"} == newcomer.runner
    assert set() == {"hypothesis", "coverage", "mkdocs", "psycopg", "uvicorn", "gunicorn"} & newcomer.installed


@pytest.mark.parametrize("page", [page for page in PAGES if python_block_lines(page)])
def test_page_runs_as_copied(newcomer: NewcomerRun, page: str) -> None:
    """Every Python block of the page runs, in order, in the newcomer's virtualenv."""
    outcomes = newcomer.outcomes.get(page.replace("/", "."), {})
    assert outcomes, f"{page} was not run in the newcomer's virtualenv; pytest said:\n{newcomer.output[-4000:]}"
    has_skip_directive = "<!-- skip:" in (ROOT / page).read_text(encoding="utf-8")
    for line, outcome in sorted(outcomes.items()):
        allowed = {"passed", "skipped"} if has_skip_directive else {"passed"}
        assert outcome.result in allowed, newcomer.describe(page, line, outcome)
    assert python_block_lines(page) == sorted(outcomes), f"{page}: the blocks run are not the blocks of the page"
