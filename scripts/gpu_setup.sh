#!/usr/bin/env bash
# The set-up of scripts/gpu_check.sh, run in the repository root: a .venv whose torch sees
# CUDA and that has lbi-fx, pytest and transformers. PYTHON ($1, default python3) makes
# the venv. Exits non-zero where no such venv can be made.
#   bash scripts/gpu_setup.sh [PYTHON]
PY=${1:-python3}
set -e
cuda_ok() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if [ ! -x .venv/bin/python ]; then
  # A machine that already has a CUDA torch (often one without network) lends it to the
  # venv instead of downloading the pinned wheel; the report records the version used.
  if cuda_ok "$PY"; then "$PY" -m venv --system-site-packages .venv; else "$PY" -m venv .venv; fi
fi
if ! cuda_ok .venv/bin/python; then
  # absent, or a +cpu build: the PyPI wheel of torch 2.13.0 on Linux is the CUDA one
  .venv/bin/python -m pip install -q --upgrade pip || true
  .venv/bin/python -m pip install -q --force-reinstall "torch==2.13.0"
fi
if ! .venv/bin/python -c "import lbi_fx, pytest, transformers" 2>/dev/null; then
  # offline, the dependencies must already be there: install lbi-fx alone
  .venv/bin/python -m pip install -q -e ".[test]" \
    || .venv/bin/python -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
.venv/bin/python -c 'import torch, lbi_fx, pytest; print("torch", torch.__version__)'
