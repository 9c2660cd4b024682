#!/usr/bin/env bash
# Installs this checkout with no extras into a new virtualenv, as `pip install uow` would, and checks
# that it works there: greenlet is not installed (SQLAlchemy 2.1 no longer brings it), the README's sync
# quickstart runs, and pytest, once installed, loads uow's plugin and runs a test on the uow_fake fixture.
# Everything happens in a temporary folder, removed at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
unset PYTHONPATH  # nothing from the checkout: uow must come from the new virtualenv

"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install --quiet "$ROOT"

cd "$WORK"
"$PY" - <<'EOF'
import importlib.metadata
import importlib.util
import sys

import uow

if not uow.__file__.startswith(sys.prefix):
    sys.exit(f"uow was imported from {uow.__file__}, not from the new virtualenv {sys.prefix}")
try:
    importlib.metadata.distribution("greenlet")
except importlib.metadata.PackageNotFoundError:
    pass
else:
    sys.exit("greenlet is installed: a bare install of uow must not bring it")
if importlib.util.find_spec("greenlet") is not None:
    sys.exit("greenlet can be imported: a bare install of uow must not bring it")
print("bare install: uow", importlib.metadata.version("uow"), "without greenlet")
EOF

# The README's first python block: the sync quickstart, with its unit test on the fake.
"$PY" - "$ROOT/README.md" "$WORK/quickstart.py" <<'EOF'
import re
import sys
from pathlib import Path

readme, out = sys.argv[1:]
match = re.search(r"^```python\n(.*?)^```$", Path(readme).read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
if match is None:
    sys.exit(f"{readme} has no python block")
Path(out).write_text(match.group(1), encoding="utf-8")
EOF
"$PY" -W error "$WORK/quickstart.py"
echo "bare install: the README's quickstart runs"

# pytest imports uow's plugin through its entry point: it must load without greenlet.
"$PY" -m pip install --quiet pytest
mkdir "$WORK/project"
printf '[pytest]\n' >"$WORK/project/pytest.ini"
cat >"$WORK/project/test_bare.py" <<'EOF'
import pytest

import uow


class FakeShopUnitOfWork(uow.FakeUnitOfWork):
    pass


@pytest.fixture
def uow_fake_factory():
    return FakeShopUnitOfWork


def test_the_fake_fixture_commits(uow_fake):
    with uow_fake:
        uow_fake.commit()
    assert 1 == uow_fake.commits


def test_greenlet_is_not_installed():
    with pytest.raises(ImportError):
        import greenlet  # noqa: F401
EOF
cd "$WORK/project"
"$PY" -m pytest -q -p no:cacheprovider -W error
echo "bare install: pytest loads uow's plugin"
