#!/usr/bin/env bash
# The GPU kernel checks and benchmark on a GPU machine, from the repository root:
#
#     bash scripts/device_kernels.sh [pytest -k expression] [-- bench/gpu_ops.py arguments...]
#
# Uses .devcarry/prebuilt (scripts/prebuild_sm90a.sh) when its SOURCE_HASH matches the
# sources, else builds for sm_90a here; puts .devcarry/bnb (a trimmed bitsandbytes with its
# CUDA library) on PYTHONPATH for the bit-exactness tests and the bnb column; runs
# tests/test_cuda.py, then bench/gpu_ops.py. Output under $OUT (default ./kernels_out).
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=${DEVCARRY:-$PWD/.devcarry}
OUTDIR=${OUT:-$PWD/kernels_out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$CARRY/bnb${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
KEXPR=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then KEXPR=$1; shift; fi
[ "${1:-}" = "--" ] && shift
start=$(date +%s)
hash=$(bash scripts/source_hash.sh)
if [ -f "$CARRY/prebuilt/SOURCE_HASH" ] && [ "$(cat "$CARRY/prebuilt/SOURCE_HASH")" = "$hash" ]; then
    cp "$CARRY/prebuilt/_C.abi3.so" "$CARRY/prebuilt/_cuda_kernels.so" comfy_quant_native/
    echo "# native extension: prebuilt (sources $hash)"
else
    echo "# native extension: building for sm_90a (sources $hash)"
    COMFY_QUANT_CUDA=1 COMFY_QUANT_CUDA_ARCHS=90a MAX_JOBS=16 "$PY" setup.py build_ext --inplace \
        >"$OUTDIR/build.log" 2>&1 || { tail -40 "$OUTDIR/build.log"; exit 1; }
fi
echo "# ready in $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
"$PY" -m pytest -q -x -p no:cacheprovider -W ignore::DeprecationWarning tests/test_cuda.py ${KEXPR:+-k "$KEXPR"} 2>&1 | tail -15
echo "# tests done at $(( $(date +%s) - start )) s"
"$PY" bench/gpu_ops.py --json "$OUTDIR/gpu_ops.json" "$@" 2>&1 | tee "$OUTDIR/gpu_ops.md"
echo "# done at $(( $(date +%s) - start )) s"
