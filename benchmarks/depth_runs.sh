#!/usr/bin/env bash
# The runs behind the depth table of docs/depth.md (issue #23): `lbi-fx quality --long`, one seed
# per process, one thread each (two processes side by side on a 2-core machine; each run
# is deterministic per seed and thread count, so where they ran does not move a digit).
# Every run writes benchmarks/results/depth/NAME_seedS.json; the dense rows are trained
# once per seed (dense_seedS.json) and reused by every design run of that seed.
#   bash benchmarks/depth_runs.sh SEED [NAME ...]    # NAME: a design below, or all
#   python benchmarks/depth_table.py --plot docs/depth.png
set -euo pipefail
cd "$(dirname "$0")/.."
S=${1:?usage: depth_runs.sh SEED [NAME ...]}; shift
out=benchmarks/results/depth
mkdir -p "$out"
q() { OMP_NUM_THREADS=1 .venv/bin/lbi-fx quality --long --seeds 1 --seed "$S" \
      --no-designs --json --no-progress "$@"; }
# design name -> quality flags (rows of that design only; dense rows reused)
declare -A D=(
  [spl]="--ranks none --no-per-position"
  [per_position]="--ranks 1 --norms none --summaries inclusive --decoder-inits zero --decoder-windows 4"
  [default_16x4]="--ranks 16 --no-per-position"
  [prefix_8x8]="--ranks 8 --no-per-position"
  [per_position_w1]="--ranks 1 --norms none --summaries inclusive --decoder-inits zero --no-per-position"
  [per_position_w8]="--ranks 1 --norms none --summaries inclusive --decoder-inits zero --decoder-windows 8 --no-per-position"
  [per_position_w16]="--ranks 1 --norms none --summaries inclusive --decoder-inits zero --decoder-windows 16 --no-per-position"
  [per_position_every]="--ranks 1 --norms none --summaries inclusive --decoder-inits zero --decoders-at every --no-per-position"
  [per_position_linear]="--ranks 1 --norms none --summaries inclusive --decoder-inits zero --encoders linear --no-per-position"
  [inclusive_4x16]="--ranks 4 --summaries inclusive --decoder-inits zero --no-per-position"
  [inclusive_4x16_none]="--ranks 4 --norms none --summaries inclusive --decoder-inits zero --no-per-position"
  [inclusive_4x16_rms]="--ranks 4 --norms rms --summaries inclusive --decoder-inits zero --no-per-position"
  [inclusive_8x8]="--ranks 8 --summaries inclusive --decoder-inits zero --no-per-position"
  [inclusive_2x32_none]="--ranks 2 --norms none --summaries inclusive --decoder-inits zero --no-per-position"
  [inclusive_4x32_128]="--budgets 128 --ranks 4 --summaries inclusive --decoder-inits zero --no-per-position"
  [inclusive_4x64_256]="--budgets 256 --ranks 4 --summaries inclusive --decoder-inits zero --no-per-position"
)
if [ ! -s "$out/dense_seed$S.json" ]; then  # dense 6, 4, 2 layers + the per-position row
  q --no-spl --ranks 1 --norms none --summaries inclusive --decoder-inits zero --decoder-windows 4 \
    > "$out/dense_seed$S.json"
fi
names=("$@")
if [ "${#names[@]}" -eq 0 ] || [ "${names[0]}" = all ]; then names=("${!D[@]}"); fi
for name in "${names[@]}"; do
  [ -n "${D[$name]:-}" ] || { echo "unknown design $name: ${!D[*]}" >&2; exit 2; }
  [ "$name" = per_position ] && continue  # in dense_seedS.json
  # shellcheck disable=SC2086
  spl=--no-spl; [ "$name" = spl ] && spl=
  q $spl ${D[$name]} --reuse-dense "$out/dense_seed$S.json" > "$out/${name}_seed$S.json"
done
