#!/usr/bin/env bash
# Nsight Compute on the streamed 4-bit kernel (linear4_stream, M <= 16) on the device
# machine, from the repository root:
#     bash scripts/device_ncu_stream.sh "K N M [knobs]" ...
# e.g. "3072 12288 1" "3072 12288 1 skinny_probe=3". For each case: the sections that say
# where a warp waits (WarpStateStats, SchedulerStats, pipes, shared-memory wavefronts) and
# the per-SASS-instruction stall samples (source page, csv). Uses .devcarry/prebuilt.
# Output under $OUT (default ./ncu_out): ncu_<case>.txt, and sass.tgz holding sass_<case>.csv
# (one file: the device returns at most 8).
source "$(dirname "$0")/ncu_setup.sh"
for spec in "$@"; do
    read -r K N M KNOBS <<<"$spec"
    tag="${K}_${N}_m${M}${KNOBS:+_${KNOBS//[^a-z0-9]/}}"
    rep="/tmp/stream_$tag"
    COMFY_QUANT_CUDA_VARIANTS="${KNOBS:-}" "$NCU" --clock-control none -k regex:linear4_stream \
        --launch-skip 20 --launch-count 1 --import-source no -f -o "$rep" \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats \
        --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis_Tables \
        --section SourceCounters --section LaunchStats --section Occupancy \
        python3 bench/profile_op.py --K "$K" --N "$N" --M "$M" >/dev/null 2>"$OUTDIR/err_$tag.txt"
    ncu_report "$rep" "$tag" "$spec" "Duration|Elapsed Cycles|Issue Slots|Issued Ipc|No Eligible|Eligible Warps|Active Warps Per|Warp Cycles Per Issued|Stall|Shared|Bank|Pipe"
done
ncu_pack
