#!/usr/bin/env bash
# The hash of the native extension's sources (setup.py and csrc/ C, CUDA and headers, no
# build outputs), in a fixed order: the same on every machine for the same sources.
# scripts/prebuild_sm90a.sh writes it beside the objects it builds; scripts/device_e2e.sh
# uses those objects only when it matches.
set -euo pipefail
cd "$(dirname "$0")/.."
{ cat setup.py; find csrc -type f \( -name '*.c' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) \
    | LC_ALL=C sort | xargs cat; } | sha256sum | cut -c1-16
