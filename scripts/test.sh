#!/usr/bin/env bash
# Sets up a virtualenv and runs everything CI checks: lint, types, the whole test
# suite with branch coverage, and the docs build. Needs PostgreSQL and MariaDB for
# the integration tests (with CI=true a missing server fails the run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/services.sh
export PYTHONPATH=examples
echo "== ruff"
.venv/bin/ruff check src tests examples
.venv/bin/ruff format --check src tests examples
echo "== mypy --strict"
.venv/bin/mypy --strict src
.venv/bin/mypy --strict tests/typing examples/allocation
echo "== bare install"
# uow with no extras, in a virtualenv of its own: no greenlet, the README's quickstart and pytest's plugin.
bash scripts/bare-install.sh
echo "== pytest"
# Coverage starts before pytest: pytest loads uow's own plugin (and with it uow) before a plugin
# such as pytest-cov could start measuring.
.venv/bin/python -m coverage erase
.venv/bin/python -m coverage run -m pytest "$@"
.venv/bin/python -m coverage report
