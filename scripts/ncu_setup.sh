# Sourced by the Nsight Compute scripts (scripts/device_ncu_*.sh) on the device machine:
# the repository root as working directory, the prebuilt extension in place
# (scripts/prebuild_sm90a.sh), OUTDIR ($OUT, default ./ncu_out) and NCU (the ncu binary).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARRY=${DEVCARRY:-$PWD/.devcarry}
OUTDIR=${OUT:-$PWD/ncu_out}
mkdir -p "$OUTDIR"
cp "$CARRY/prebuilt/_C.abi3.so" "$CARRY/prebuilt/_cuda_kernels.so" comfy_quant_native/
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
