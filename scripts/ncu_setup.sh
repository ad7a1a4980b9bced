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
# A report's details, its per-SASS-instruction source page (csv) and the lines of the
# details that match a pattern, under a title:
#     ncu_report <report path without .ncu-rep> <tag> <title> <grep -E pattern>
ncu_report() {
    "$NCU" -i "$1.ncu-rep" --print-details all >"$OUTDIR/ncu_$2.txt" 2>&1
    "$NCU" -i "$1.ncu-rep" --page source --print-source sass --csv >"$OUTDIR/sass_$2.csv" 2>&1
    echo "## $3"
    grep -m 50 -E "$4" "$OUTDIR/ncu_$2.txt"
}
# the csv files in one archive (the device returns at most 8 files); empty error logs dropped
ncu_pack() { (cd "$OUTDIR" && tar czf sass.tgz sass_*.csv && rm -f sass_*.csv && find . -name 'err_*.txt' -empty -delete); }
