#!/usr/bin/env bash
# The end-to-end ComfyUI benchmark (bench/e2e_comfyui.py) on a GPU machine that has torch
# but neither ComfyUI nor its extra packages, from the repository root:
#
#     bash scripts/device_e2e.sh [bench/e2e_comfyui.py arguments...]
#
# It needs the folder .devcarry (git-ignored; carry it to the machine):
#   .devcarry/ComfyUI/   a trimmed ComfyUI (COMFYUI_PATH unless set)
#   .devcarry/site/      pure-Python packages the machine lacks: comfy_kitchen (its Python
#                        part: eager backend, no CUDA extension), comfy_aimdo, torchsde,
#                        trampoline, simpleeval
#   .devcarry/prebuilt/  _C.abi3.so and an sm_90a _cuda_kernels.so, with SOURCE_HASH: the
#                        hash of setup.py + csrc/ they were built from (scripts/prebuild_sm90a.sh
#                        makes them on a machine with nvcc; scripts/source_hash.sh)
# The native extension: the prebuilt objects when SOURCE_HASH matches this tree's sources
# (E2E_REBUILD=1 forces a build), else built here for sm_90a.
# Writes $OUT/e2e.md (the report, rewritten after every configuration), $OUT/e2e.json,
# $OUT/e2e.log; $OUT defaults to ./e2e_out. E2E_BUDGET (seconds from this script's start,
# default 540) becomes --time-budget, so that the run ends inside a 10-minute command limit
# (a later --time-budget argument overrides it).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=${DEVCARRY:-$ROOT/.devcarry}
OUTDIR=${OUT:-$ROOT/e2e_out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export COMFYUI_PATH=${COMFYUI_PATH:-$CARRY/ComfyUI}
export PYTHONPATH="$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

start=$(date +%s)
hash=$(bash scripts/source_hash.sh)
if [ -z "${E2E_REBUILD:-}" ] && [ -f "$CARRY/prebuilt/SOURCE_HASH" ] \
        && [ "$(cat "$CARRY/prebuilt/SOURCE_HASH")" = "$hash" ]; then
    cp "$CARRY/prebuilt/_C.abi3.so" "$CARRY/prebuilt/_cuda_kernels.so" comfy_quant_native/
    echo "# native extension: prebuilt (sources $hash)"
else
    echo "# native extension: building for sm_90a (sources $hash; prebuilt: $(cat "$CARRY/prebuilt/SOURCE_HASH" 2>/dev/null || echo none))"
    if ! COMFY_QUANT_CUDA=1 COMFY_QUANT_CUDA_ARCHS=90a "$PY" setup.py build_ext --inplace >"$OUTDIR/build.log" 2>&1; then
        tail -40 "$OUTDIR/build.log"
        echo "# build failed; see $OUTDIR/build.log"
        exit 1
    fi
fi
echo "# ready in $(( $(date +%s) - start )) s"
"$PY" - <<'EOF' || exit 1
import torch, comfy_quant_native.ops as ops
print("# torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("# comfy_quant_native backends", ops.list_backends())
EOF
budget=$(( ${E2E_BUDGET:-540} - ($(date +%s) - start) ))
"$PY" bench/e2e_comfyui.py --out "$OUTDIR/e2e.md" --json "$OUTDIR/e2e.json" \
    --time-budget "$budget" "$@" 2>&1 | tee "$OUTDIR/e2e.log"
