#!/usr/bin/env bash
# One prepared GPU check (issue 25): on a machine with CUDA, set up .venv if needed, run
# every GPU-marked test and the CUDA benches, each part under its own timeout and all of
# it within GPU_CHECK_BUDGET seconds (default 480: 8 minutes), and write one
# gpu_results.json (to $OUT if set, else the repository root) with each part's status,
# wall time and key figures. Logs of every part go to gpu_check_logs/ beside the JSON.
#
#   bash scripts/gpu_check.sh            # exit 0: every part ok, 1: a part failed or timed
#                                        # out, 0 with status "no CUDA" where there is none
#
# Without CUDA (no NVIDIA driver, CUDA_VISIBLE_DEVICES empty or -1, or a torch that sees
# no device) it installs nothing, says so on stderr and still writes the JSON, status
# "no CUDA". Set-up (scripts/gpu_setup.sh): a machine whose system Python already has a
# CUDA torch, of any version, lends it to the venv and, without network, installs the rest
# from wheelhouse/ (`bash scripts/build_wheelhouse.sh` where PyPI is reachable; carry it);
# elsewhere it needs only PyPI: torch==2.13.0 (the CUDA wheel on Linux) and this project
# with its test extra, as scripts/run.sh does.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-480}
OUT_DIR=${OUT:-$ROOT}
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/gpu_results.json"
LOGS="$OUT_DIR/gpu_check_logs"
mkdir -p "$LOGS"
SYS_PY=${PYTHON:-python3}
export ROOT START BUDGET RESULTS LOGS

no_cuda() {  # $1: why. The JSON says "no CUDA"; nothing was installed or run.
  echo "gpu_check: no CUDA: $1; nothing to check (wrote $RESULTS)" >&2
  if command -v "$SYS_PY" >/dev/null 2>&1; then
    GPU_CHECK_MODE=no-cuda GPU_CHECK_WHY="$1" "$SYS_PY" scripts/gpu_check_report.py
  else  # not even a Python: the JSON by hand
    printf '{"status": "no CUDA", "message": "%s", "parts": {}}\n' "$1" >"$RESULTS"
  fi
  exit 0
}

# 1. Is there a GPU at all? Checked before any install, so a CPU machine costs seconds.
if [ -n "${CUDA_VISIBLE_DEVICES+x}" ] && { [ -z "$CUDA_VISIBLE_DEVICES" ] || [ "$CUDA_VISIBLE_DEVICES" = "-1" ]; }; then
  no_cuda "CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES}' hides every device"
fi
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; } \
   && [ ! -e /dev/nvidia0 ]; then
  no_cuda "no NVIDIA driver or device (nvidia-smi and /dev/nvidia0 absent)"
fi

# 2. Set-up: a .venv whose torch sees CUDA and has lbi-fx installed.
left=$(( BUDGET - ($(date +%s) - START) ))
SETUP_S=$(( left < 240 ? left : 240 ))
t0=$(date +%s)
timeout -k 5 "$SETUP_S" bash scripts/gpu_setup.sh "$SYS_PY" >"$LOGS/setup.log" 2>&1
SETUP_RC=$?
SETUP_WALL=$(( $(date +%s) - t0 ))
export SETUP_RC SETUP_WALL SETUP_S
if [ "$SETUP_RC" -ne 0 ]; then
  echo "gpu_check: set-up failed (rc $SETUP_RC after ${SETUP_WALL}s; see $LOGS/setup.log)" >&2
  GPU_CHECK_MODE=setup-failed "$SYS_PY" scripts/gpu_check_report.py
  exit 1
fi

# 3. The parts, run and summarised by the report script (stdlib only, system Python).
GPU_CHECK_MODE=run "$SYS_PY" scripts/gpu_check_report.py
