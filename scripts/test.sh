#!/usr/bin/env bash
# The test suite: installs what it needs (scripts/install.sh), then runs pytest.
# GPU tests skip without CUDA; ComfyUI tests skip without COMFYUI_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
