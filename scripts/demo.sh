#!/usr/bin/env bash
# The main job on the built-in default model (no download): quantize it in every
# layout, report size, error and speed against bf16, save and reload.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m comfy_quant_native demo "$@"
