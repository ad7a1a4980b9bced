#!/usr/bin/env bash
# Two builds timed in turns in one device call (the calls of a session drift by 3-5%, so
# only an in-call comparison is trusted), from the repository root:
#     bash scripts/device_ab.sh [bench script arguments...]
# The bench script: BENCH (default bench/skinny_launch.py; e.g. bench/w8a8_parts.py).
# Builds: .devcarry/prebuilt (the one under test, scripts/prebuild_sm90a.sh) and the
# baseline in .devcarry/old/prebuilt (in a worktree of the old commit:
# `bash scripts/prebuild_sm90a.sh <repo>/.devcarry/old`) or .devcarry/old itself; carry
# both. First the streamed and 4-bit tests on the build under test (TESTS="": all of
# tests/test_cuda.py; TESTS=expr: -k expr), then ROUNDS (default 2) turns of new, old.
# Output: $OUT/ab.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=${DEVCARRY:-$PWD/.devcarry}
OUTDIR=${OUT:-$PWD/ab_out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$CARRY/bnb${PYTHONPATH:+:$PYTHONPATH}"
use() { cp "$1/_C.abi3.so" "$1/_cuda_kernels.so" comfy_quant_native/; }
OLD=$CARRY/old/prebuilt
[ -f "$OLD/_cuda_kernels.so" ] || OLD=$CARRY/old
use "$CARRY/prebuilt"
if [ -n "${TESTS+set}" ] && [ -z "$TESTS" ]; then sel=(); else sel=(-k "${TESTS:-streamed or 4bit}"); fi
python3 -m pytest -q -x tests/test_cuda.py "${sel[@]}" 2>&1 | tail -3
for _ in $(seq "${ROUNDS:-2}"); do
    for b in "$CARRY/prebuilt" "$OLD"; do
        use "$b"
        echo "## $b" | tee -a "$OUTDIR/ab.txt"
        python3 "${BENCH:-bench/skinny_launch.py}" "$@" 2>&1 | tee -a "$OUTDIR/ab.txt"
    done
done
use "$CARRY/prebuilt"
