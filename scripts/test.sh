#!/usr/bin/env bash
# Sets up a virtualenv and runs everything CI checks: lint, types, a bare install, and the whole test
# suite with branch coverage. The suite includes the documentation: tests/unit/test_docs.py builds the
# site with `mkdocs build --strict`, and Sybil runs the Python examples of docs/*.md and README.md.
# Needs PostgreSQL and MariaDB for the integration tests (with CI=true a missing server fails the run);
# UOW_TEST_POSTGRES_URL and UOW_TEST_MARIADB_URL point the tests at other servers (see the README).
# Arguments go to pytest. The coverage report is printed whether the tests pass or fail; the script
# exits non-zero if either fails.
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
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
color=()
if [ -t 1 ]; then
    color=(--color=yes)  # pytest writes to tee below, not to the terminal
fi
.venv/bin/python -m coverage erase
tests=0
.venv/bin/python -m coverage run -m pytest ${color[@]+"${color[@]}"} "$@" 2>&1 | tee "$log" || tests=$?
echo "== coverage"
report=0
.venv/bin/python -m coverage report || report=$?
if [ "$tests" -ne 0 ]; then
    # PostgreSQL's words when every connection slot is taken; the tracebacks above can run to pages.
    if grep -qE "too many clients|remaining connection slots are reserved" "$log"; then
        .venv/bin/python - <<'EOF' || true
from sqlalchemy import create_engine, make_url, text

from tests.support.databases import POSTGRES_ADMIN_URL

where = make_url(POSTGRES_ADMIN_URL).render_as_string(hide_password=True)
try:
    engine = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            limit = connection.execute(text("SHOW max_connections")).scalar()
            used = connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
            ).scalar()
    finally:
        engine.dispose()
    state = f"max_connections = {limit} ({used} in use now)"
except Exception as error:
    state = f"max_connections unknown, connecting again failed ({type(error).__name__})"
print(f'PostgreSQL at {where} ran out of connections ("too many clients"): {state}; run fewer clients at once.')
EOF
    fi
    exit "$tests"
fi
exit "$report"
