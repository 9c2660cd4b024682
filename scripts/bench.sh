#!/usr/bin/env bash
# Runs the benchmarks: uow against raw SQLAlchemy and its peers. Installs the
# benchmark-only dependencies (advanced-alchemy, matplotlib) into .venv first.
# Arguments go to benchmarks/run.py, e.g. `bash scripts/bench.sh --quick`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install --quiet --group bench
bash scripts/services.sh
exec .venv/bin/python benchmarks/run.py "$@"
