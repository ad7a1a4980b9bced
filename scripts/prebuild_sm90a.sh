#!/usr/bin/env bash
# Builds the native extension for the device machine (H100/H200, sm_90a) here, where nvcc
# runs, into .devcarry/prebuilt/ with the sources' hash, so that scripts/device_e2e.sh
# spends no device time compiling. Builds in a temporary copy of the tracked sources (the
# working tree's own objects are left alone). _C is abi3: built by any Python >= 3.10 here,
# it loads in the device's Python 3.12.
#     bash scripts/prebuild_sm90a.sh [.devcarry]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=$(realpath -m "${1:-.devcarry}")/prebuilt
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/src"
cp -r setup.py pyproject.toml csrc comfy_quant_native "$TMP/src/"
rm -f "$TMP/src/comfy_quant_native/"*.so
hash=$(bash scripts/source_hash.sh)
(cd "$TMP/src" && COMFY_QUANT_CUDA=1 COMFY_QUANT_CUDA_ARCHS=90a python3 setup.py build_ext --inplace >"$TMP/build.log" 2>&1) \
    || { tail -40 "$TMP/build.log"; exit 1; }
mkdir -p "$DEST"
cp "$TMP/src/comfy_quant_native/_C.abi3.so" "$TMP/src/comfy_quant_native/_cuda_kernels.so" "$DEST/"
echo "$hash" >"$DEST/SOURCE_HASH"
{ echo "built $(date -Iseconds) from $(git rev-parse --short HEAD 2>/dev/null || echo '?') (sources $hash)";
  nvcc --version | tail -1; python3 --version; } >"$DEST/BUILT_FROM"
ls -la "$DEST"
