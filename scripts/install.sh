#!/usr/bin/env bash
# Install comfy-quant-native and what its tests need into the current Python, against
# an already-installed torch (CPU build 2.13.0 when none is installed). Idempotent.
# Never lets pip resolve torch itself: that would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q "numpy" "safetensors>=0.4" "tqdm>=4.60" "pytest>=7" "hypothesis>=6" \
    "bitsandbytes>=0.45" "comfy-kitchen>=0.2"
# --no-build-isolation: build against the torch that is here; --no-deps: deps are above.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
