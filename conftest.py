"""Run the Python examples of the documentation and the README as tests.

Every fenced ``python`` block in ``docs/*.md`` and in ``README.md`` is
executed by Sybil, top to bottom, each page in a namespace of its own. Pages
may also hold invisible blocks (``<!-- invisible-code-block: python -->``)
for the few lines a reader need not see, such as running a test function
that the page shows. The ``mocker`` fixture of pytest-mock is available to
the pages of the documentation.
"""

from __future__ import annotations

from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

_docs = Sybil(
    name="docs",
    parsers=[PythonCodeBlockParser(), SkipParser()],
    path="docs",
    patterns=["*.md"],
    fixtures=["mocker"],
)

_readme = Sybil(
    name="readme",
    parsers=[PythonCodeBlockParser(), SkipParser()],
    path=".",
    patterns=["README.md"],
    # Only the README at the root of the repository, not any nested one.
    excludes=["*/README.md"],
)

pytest_collect_file = (_docs + _readme).pytest()
