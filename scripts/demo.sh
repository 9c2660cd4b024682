#!/usr/bin/env bash
# Sets up a virtualenv and runs the example allocation application.
# It uses an SQLite file by default; DATABASE_URL switches it, for example
#   DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
PYTHONPATH=examples exec .venv/bin/python -m allocation "$@"
