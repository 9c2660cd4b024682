"""The documentation builds cleanly, and its API reference covers every public name.

The Python examples of ``docs/*.md`` and ``README.md`` are run by Sybil,
configured in the ``conftest.py`` at the root of the repository.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import uow
from uow import errors

ROOT = Path(__file__).resolve().parents[2]
API_PAGE = ROOT / "docs" / "api.md"
PUBLIC = sorted(set(uow.__all__) - {"errors"})


def _directives() -> set[str]:
    """The objects that ``docs/api.md`` renders with a ``::: name`` directive."""
    return set(re.findall(r"^::: ([\w.]+)\s*$", API_PAGE.read_text(encoding="utf-8"), flags=re.MULTILINE))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built by ``mkdocs build --strict``; building fails on any warning."""
    if not os.environ.get("CI"):  # in CI the docs tools must be installed
        pytest.importorskip("mkdocs")
        pytest.importorskip("mkdocstrings_handlers.python")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        # Not --quiet: it also silences the warnings that --strict turns into a failure.
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_mkdocs_build_is_strict_clean(site: Path) -> None:
    """Every page in docs/ is in the navigation and is built."""
    for page in sorted(path.stem for path in (ROOT / "docs").glob("*.md")):
        assert (site / ("index.html" if page == "index" else page)).exists(), page


@pytest.mark.parametrize("name", PUBLIC)
def test_api_page_documents_public_name(name: str) -> None:
    """Every name in ``uow.__all__`` has its own ``::: uow.name`` entry in docs/api.md."""
    assert f"uow.{name}" in _directives()


def test_api_page_documents_the_errors() -> None:
    """``uow.errors`` is in ``uow.__all__`` and docs/api.md renders the module whole."""
    assert "errors" in uow.__all__
    assert "uow.errors" in _directives()


def test_api_reference_renders_every_public_name(site: Path) -> None:
    """The built API reference has an entry for each public class, function and exception."""
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'id="(uow[\w.]*)"', html))
    expected = {f"uow.{name}" for name in PUBLIC} | {f"uow.errors.{name}" for name in errors.__all__}
    assert set() == expected - anchors
