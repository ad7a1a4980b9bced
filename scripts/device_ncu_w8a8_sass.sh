#!/usr/bin/env bash
# Nsight Compute's per-SASS-instruction stall samples of the W8A8 GEMM alone
# (bench/w8a8_profile.py, one layout a case) on the device machine, from the repository root:
#     bash scripts/device_ncu_w8a8_sass.sh "layout [knob=value,...]" ...
# e.g. "int8_lode" "int8_lode gemm_probe=1". For each case: the warp-state and pipe
# sections, and the source page as csv (where each instruction's warps wait). Uses
# .devcarry/prebuilt. Output under $OUT (default ./ncu_out): ncu_<case>.txt, and sass.tgz
# holding sass_<case>.csv (one file: the device returns at most 8).
source "$(dirname "$0")/ncu_setup.sh"
for spec in "$@"; do
    read -r LAYOUT KNOBS <<<"$spec"
    tag="${LAYOUT}${KNOBS:+_${KNOBS//[^a-z0-9]/}}"
    rep="/tmp/w8a8_$tag"
    COMFY_QUANT_CUDA_VARIANTS="${KNOBS:-}" "$NCU" --clock-control none --profile-from-start off \
        -k regex:gemm_int8_wgmma --import-source no -f -o "$rep" \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats \
        --section WarpStateStats --section InstructionStats --section SourceCounters \
        python3 bench/w8a8_profile.py --layouts "$LAYOUT" >/dev/null 2>"$OUTDIR/err_$tag.txt"
    ncu_report "$rep" "$tag" "$spec" "Duration|Elapsed Cycles|Issue Slots|Issued Ipc|No Eligible|Warp Cycles Per Issued|Stall|Pipe"
done
ncu_pack
