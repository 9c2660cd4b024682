#!/usr/bin/env bash
# Creates .venv (if needed) and installs uow with every extra and development tool.
# Sourced by the other scripts; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# pip >= 25.1 reads [dependency-groups] from pyproject.toml.
.venv/bin/python -m pip install --quiet -e ".[postgresql,asyncpg,mysql,aiomysql,aiosqlite]" --group dev
