#!/usr/bin/env bash
# Build wheelhouse/ (ignored by git): the wheels that scripts/gpu_setup.sh installs, with
# --no-index, on a GPU machine that has its own CUDA torch and no network. Run it here, where
# PyPI is reachable, then carry the folder to the device (`carry=["wheelhouse"]`).
#
#   bash scripts/build_wheelhouse.sh            # -> wheelhouse/, prints its size
#   bash scripts/build_wheelhouse.sh --check    # only measure an existing one (no network)
#
# What goes in: the test dependencies of the GPU check beyond torch (networkx, tqdm, pytest,
# hypothesis, transformers, and whatever they need), plus pip, setuptools and wheel so the
# venv can bootstrap pip and build lbi-fx editable from the copied tree. What stays out: torch,
# triton and the nvidia-* / cuda-* libraries (the device's CUDA torch ships its own), and
# numpy (every torch install there has one; transformers' numpy requirement is met by it).
# lbi-fx itself is not a wheel here: gpu_setup.sh installs it editable from the tree the
# device got, so the check always runs the code that was sent (a wheel would be a snapshot,
# and a non-editable install cannot be imported from the repository root anyway).
#
# Binary wheels (regex, pyyaml, tokenizers, safetensors, hf-xet, charset-normalizer) are
# fetched for each Python in WHEELHOUSE_PYTHONS (default "3.11 3.12 3.13"; the device's
# is 3.12) on manylinux x86_64. Exits 1, and keeps what it fetched, if the folder ends above
# WHEELHOUSE_MAX_MB (default 60). WHEELHOUSE_HF=0 leaves transformers out (the check's pytest
# part then fails at collection unless the device has transformers itself).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${WHEELHOUSE:-wheelhouse}
PYTHONS=${WHEELHOUSE_PYTHONS:-3.11 3.12 3.13}
MAX_MB=${WHEELHOUSE_MAX_MB:-60}
REQS=(pip "setuptools>=77" wheel "networkx>=3.0" tqdm "pytest>=7" "hypothesis>=6")
[ "${WHEELHOUSE_HF:-1}" = 1 ] && REQS+=(transformers)
# left to the device's own Python (see above); a regex on normalised names
SKIP='^(torch|triton|numpy|nvidia-.*|cuda-.*)$'
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
size_check() {
  local n bytes mb
  n=$(find "$DEST" -name '*.whl' | wc -l)
  bytes=$(du -sb "$DEST" | cut -f1)
  mb=$("$PY" -c "print(f'{$bytes / 2**20:.1f}')")
  echo "build_wheelhouse: $DEST: $n wheels, $mb MiB (limit $MAX_MB MiB)"
  if [ "$bytes" -gt $(( MAX_MB * 1024 * 1024 )) ]; then
    echo "build_wheelhouse: $DEST is larger than $MAX_MB MiB: too big to carry; refusing" >&2
    exit 1
  fi
}
if [ "${1:-}" = --check ]; then
  [ -d "$DEST" ] || { echo "build_wheelhouse: no $DEST" >&2; exit 1; }
  size_check
  exit 0
fi
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # a fresh set: no stale second version of anything
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
for v in $PYTHONS; do
  tag=cp${v/./}
  # resolve the whole tree for that Python (nothing is installed), then fetch each wheel
  # alone, so that the excluded packages are never downloaded
  "$PY" -m pip install -q --dry-run --target "$tmp/target" --only-binary=:all: \
    --python-version "$v" --implementation cp --abi "$tag" "${PLATFORMS[@]}" \
    --report "$tmp/$tag.json" "${REQS[@]}"
  "$PY" - "$tmp/$tag.json" "$SKIP" >"$tmp/$tag.txt" <<'EOF'
import json, re, sys
report, skip = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
for item in report["install"]:
    meta = item["metadata"]
    name = re.sub(r"[-_.]+", "-", meta["name"]).lower()
    if not skip.match(name):
        print(f"{name}=={meta['version']}")
EOF
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
    --implementation cp --abi "$tag" --abi abi3 --abi none "${PLATFORMS[@]}" \
    -d "$DEST" -r "$tmp/$tag.txt"
  echo "build_wheelhouse: Python $v: $(tr '\n' ' ' <"$tmp/$tag.txt")"
done
size_check
