#!/usr/bin/env bash
# Nsight Compute on the W8A8 GEMM alone (bench/w8a8_profile.py), and the SASS opcode counts
# of the sm90 wgmma kernels, on the device machine (Firecracker runtime: ncu reads the
# counters there), from the repository root:
#     bash scripts/device_ncu_w8a8.sh [w8a8_profile.py arguments...]
# Uses .devcarry/prebuilt (scripts/prebuild_sm90a.sh). Output under $OUT (default ./ncu_out).
source "$(dirname "$0")/ncu_setup.sh"
# opcode counts of each bf16 wgmma kernel (Function header, then its instructions)
cuobjdump --dump-sass comfy_quant_native/_cuda_kernels.so | awk '
    /Function :/ { fn = ($0 ~ /gemm_int8_wgmma.*nv_bfloat16/) ? $3 : ""; if (fn) print "## " fn; next }
    fn && /\/\*[0-9a-f]+\*\// { op = $2; sub(/;$/, "", op); if (op ~ /^@/) op = $3; n[fn " " op]++ }
    END { for (k in n) print k, n[k] }' | sort >"$OUTDIR/sass_opcodes.txt"
grep -E " (I2F|I2FP|FFMA|FADD|FMUL|IADD3|LDS|HGMMA|F2FP|BAR|WARPSYNC|SYNCS)[^ ]* " "$OUTDIR/sass_opcodes.txt" | head -80
"$NCU" --clock-control none --profile-from-start off -k regex:gemm_int8 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats \
    --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis \
    python3 bench/w8a8_profile.py "$@" >"$OUTDIR/ncu.txt" 2>&1
grep -v "^==PROF==" "$OUTDIR/ncu.txt" | grep -E "gemm_int8_wgmma|ms$|Duration|Throughput|Issue Slots|Issued Ipc|Pipe|Stall|No Eligible|Eligible Warps|Active Warps|L2 Hit|Executed Ipc|One or More" | head -120
