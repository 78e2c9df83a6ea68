#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (torch pinned to 2.13.0), installs
# lbi-fx with its test extra, then runs the demo or the test suite.
#   bash scripts/run.sh demo [demo args]   # the main job: transform, verify, train
#   bash scripts/run.sh test [pytest args] # the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lbi-fx-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
what=${1:-test}
shift || true
# One intra-op thread unless the caller says otherwise: the models are tiny, and on a loaded
# machine every extra thread waits for a core (the stated times were 10-20x off with the
# default of one thread per core). Subprocesses of the suite inherit it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-${OMP_NUM_THREADS:-1}}"
case "$what" in
  demo) exec .venv/bin/python examples/demo.py "$@" ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test [args]" >&2; exit 2 ;;
esac
