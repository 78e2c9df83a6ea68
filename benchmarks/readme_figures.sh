#!/usr/bin/env bash
# Rerun every timing/memory figure the docs quote (docs/performance.md, region-parallel.md,
# backends.md, pgf.md, spl.md; the README's headline table), one after another, on a quiet
# machine. Outputs (text + JSON) land in ${OUT:-benchmarks/results}; the docs' tables are
# copied from there by hand, with this script's date. About 25 minutes on a 2-core CPU.
#   bash benchmarks/readme_figures.sh            # everything
#   bash benchmarks/readme_figures.sh step scan  # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
run() {  # run NAME CMD...: JSON to $OUT/NAME.json, stderr (progress) to $OUT/NAME.log
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/commands.txt"
  local t0=$SECONDS
  "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
  echo "   $((SECONDS - t0)) s" | tee -a "$OUT/commands.txt"
}
want() { [ $# -eq 0 ] || [[ " $SELECTED " == *" $1 "* ]]; }
SELECTED="$*"
date -u +"%Y-%m-%d %H:%M UTC" >"$OUT/date.txt"
if want scan; then
  run scan "$PY" -m lbi_fx bench scan --json --device cpu --threads 1
fi
if want step; then
  STEP=("$PY" -m lbi_fx bench step --steps 7 --threads 1 --device cpu --json)
  # the paper's configuration: one row of r = 16 (mean pool), every Jacobian strategy
  for j in auto reuse recompute; do
    run "step_transformer_mean16_$j" "${STEP[@]}" --model transformer --pool mean --rank 16 --jacobian "$j"
  done
  # the default for a causal LM: 4 causal segments; 4 x 4 = 16 scalars (the demo), 4 x 16 = 64
  run step_transformer_causal4x4 "${STEP[@]}" --model transformer --rank 4
  run step_transformer_causal4x16 "${STEP[@]}" --model transformer --rank 16
  for m in mamba2 hybrid; do
    run "step_${m}_mean16" "${STEP[@]}" --model "$m" --pool mean --rank 16
    run "step_${m}_causal4x4" "${STEP[@]}" --model "$m" --rank 4
  done
fi
if want comm; then
  # GPT-2 vocabulary at L = 1024, fp32 (bf16 VJPs take over 30 min on 2 cores)
  L1024=(--json --vocab 50257 --dtype fp32 --jacobian recompute --chunk 4)
  run comm_L1024_vocab50257_shared_allgather "$PY" -m lbi_fx bench comm "${L1024[@]}"
  run comm_L1024_vocab50257_per_region_relay "$PY" -m lbi_fx bench comm "${L1024[@]}" \
    --exchange relay --canvas-weights per_region
  run comm_timed "$PY" -m lbi_fx bench comm --timed --json
fi
if want crossover; then  # needs root (tc on loopback); --modeled otherwise
  run crossover "$PY" -m lbi_fx bench crossover --rates unshaped,1gbit,100mbit,50mbit,30mbit,10mbit \
    --json --plot docs/crossover.png --no-progress
  "$PY" -m lbi_fx plan --validate benchmarks/results/crossover.json > benchmarks/results/plan_validate.txt
fi
if want pgf; then
  run pgf "$PY" -m lbi_fx bench pgf --json --threads 1 --plot docs/pgf_memory.png
fi
if want parity; then
  run parity "$PY" -m lbi_fx parity --threads 1 --json
fi
if want spl; then
  # step time and memory columns of the SPL table only (its BPB columns need the 1000-step run)
  run spl_timing "$PY" -m lbi_fx spl --steps 10 --threads 1 --json --no-progress
fi
