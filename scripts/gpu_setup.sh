#!/usr/bin/env bash
# The set-up of scripts/gpu_check.sh, run in the repository root: a .venv whose torch sees
# CUDA and that has lbi-fx (editable, from this tree), pytest, hypothesis and transformers.
# PYTHON ($1, default python3) makes the venv. Exits non-zero where no such venv can be made.
#   bash scripts/gpu_setup.sh [PYTHON]
#
# Two machines:
# - One whose PYTHON already has a CUDA torch, of whatever version (the lent GPU machines:
#   torch 2.11 in /opt/torch/.venv, no network). The venv borrows that Python's packages
#   (a .pth naming the site dirs PYTHON sees; --system-site-packages would not do, since
#   PYTHON may itself be a venv whose packages a venv made from it would not see) and
#   everything else comes from wheelhouse/ (`bash scripts/build_wheelhouse.sh`, carried
#   with the tree) with --no-index: pip never looks for an index, and a constraint holds
#   torch (and numpy, triton) at the machine's versions.
# - One without: torch==2.13.0 from PyPI (the CUDA wheel on Linux) and `pip install -e
#   ".[test]"`, as scripts/run.sh does; without network it falls back to installing lbi-fx
#   alone with --no-index.
# LBI_FX_REHEARSE=1 accepts a torch that sees no CUDA as "the machine's torch": the CPU
# rehearsal of the first case (tests/test_gpu_setup_offline.py). LBI_FX_WHEELHOUSE names
# another wheelhouse folder. `--venv-only` stops once .venv is made (a test of the borrowing).
VENV_ONLY=0
if [ "${1:-}" = --venv-only ]; then VENV_ONLY=1; shift; fi  # make .venv, install nothing
PY=${1:-python3}
WHEELS=${LBI_FX_WHEELHOUSE:-wheelhouse}
set -e
torch_ok() {
  if [ "${LBI_FX_REHEARSE:-0}" = 1 ]; then
    "$1" -c "import torch" 2>/dev/null
  else
    "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
  fi
}
have_wheels() { compgen -G "$WHEELS/*.whl" >/dev/null; }
if [ ! -x .venv/bin/python ]; then
  if torch_ok "$PY"; then
    echo "gpu_setup: $PY has a usable torch: the venv borrows its packages"
    # a base Python without ensurepip (Debian's, without python3-venv) makes no pip: the
    # wheelhouse's pip is installed below
    "$PY" -m venv .venv || { rm -rf .venv; "$PY" -m venv --without-pip .venv; }
    # every site dir that $PY sees, in its order (not --system-site-packages: where $PY is a
    # venv, that would be its base Python's packages instead of its own)
    dirs=$("$PY" -c "import sys; print('\n'.join(p for p in sys.path
                     if p.endswith(('site-packages', 'dist-packages'))))")
    .venv/bin/python - "$dirs" <<'EOF'
import sys, sysconfig
dirs = [d for d in sys.argv[1].splitlines() if d]
pth = sysconfig.get_path("purelib") + "/_lbi_fx_system_site.pth"
with open(pth, "w") as f:  # after the venv's own site dir: what the venv installs wins
    f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
EOF
  else
    "$PY" -m venv .venv
  fi
fi
[ "$VENV_ONLY" = 1 ] && exit 0
if ! torch_ok .venv/bin/python; then
  # absent, or a +cpu build: the PyPI wheel of torch 2.13.0 on Linux is the CUDA one
  .venv/bin/python -m pip install -q --upgrade pip || true
  .venv/bin/python -m pip install -q --force-reinstall "torch==2.13.0"
fi
if ! .venv/bin/python -c "import lbi_fx, pytest, hypothesis, transformers" 2>/dev/null; then
  if have_wheels; then
    if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
      pipwhl=$(ls "$WHEELS"/pip-*.whl | head -n 1)
      .venv/bin/python "$pipwhl/pip" install -q --no-index --find-links "$WHEELS" pip
    fi
    # pip may add or upgrade anything but torch (and numpy, which the wheelhouse lacks)
    .venv/bin/python -c "import importlib.metadata as m
for n in ('torch', 'numpy', 'triton'):
    try: print(f'{n}=={m.version(n)}')
    except m.PackageNotFoundError: pass" >.venv/lbi-fx-constraints.txt
    off=(--no-index --find-links "$WHEELS" -c .venv/lbi-fx-constraints.txt)
    want=("networkx>=3.0" tqdm "pytest>=7" "hypothesis>=6")
    if compgen -G "$WHEELS/transformers-*.whl" >/dev/null; then
      want+=(transformers)
    elif ! .venv/bin/python -c "import transformers" 2>/dev/null; then
      echo "gpu_setup: no transformers here nor in $WHEELS: tests/test_huggingface.py will" \
           "fail to import" >&2
    fi
    # lbi-fx from this tree, editable, built by the wheelhouse's setuptools installed in the
    # venv (an isolated build would still see the borrowed site dirs and their setuptools,
    # maybe one older than the 77 that pyproject's SPDX license needs); --no-deps: torch and
    # triton are the machine's
    .venv/bin/python -m pip install -q --no-compile "${off[@]}" "${want[@]}" "setuptools>=77" wheel
    .venv/bin/python -m pip install -q --no-compile "${off[@]}" --no-deps --no-build-isolation -e .
  else
    # offline without a wheelhouse, the dependencies must already be there: lbi-fx alone
    .venv/bin/python -m pip install -q -e ".[test]" \
      || .venv/bin/python -m pip install -q --no-deps --no-build-isolation --no-index -e .
  fi
fi
.venv/bin/python -c 'import torch, lbi_fx, pytest, hypothesis
print("torch", torch.__version__, "cuda", torch.version.cuda, "from", torch.__file__)'
