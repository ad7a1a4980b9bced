#!/usr/bin/env bash
# Nsight Compute on one W8A8 GEMM launch (int8_row, M x K -> N), on a GPU machine, from
# the repository root, after the extension is in place (scripts/device_kernels.sh):
#
#     bash scripts/device_gemm_profile.sh [K N M]
#     LAYOUT=nf4 KERNEL=linear4_stream bash scripts/device_gemm_profile.sh 3072 12288 1
#
# Prints the speed-of-light, occupancy and warp-state sections, then the 30 SASS lines
# with the most stall samples (source counters; the build has -lineinfo).
set -uo pipefail
cd "$(dirname "$0")/.."
K=${1:-3072}; N=${2:-12288}; M=${3:-4608}
LAYOUT=${LAYOUT:-int8_row}; KERNEL=${KERNEL:-gemm_int8_wgmma}
OUTDIR=${OUT:-$PWD/kernels_out}
mkdir -p "$OUTDIR"
rep="$OUTDIR/${KERNEL}_${K}_${N}_${M}"
ncu --clock-control none -k "regex:$KERNEL" --launch-skip 4 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section SourceCounters \
    --section LaunchStats -f -o "$rep" python3 bench/profile_op.py --K "$K" --N "$N" --M "$M" --layout "$LAYOUT" \
    --calls 8 >/dev/null 2>&1 || echo "ncu failed"
ncu --import "$rep.ncu-rep" --page details 2>&1 | grep -v "^    ---\|^  Section: Source" | head -120
ncu --import "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.sass.csv" 2>/dev/null
python3 - "$rep.sass.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
# a "Kernel Name" row comes first, then the column header ("Address", "Source", ...)
at = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
if at is None:
    sys.exit("no source page")
hdr = rows[at]
col = next((i for i, h in enumerate(hdr) if h.startswith("Warp Stall Sampling (All")), None)
src = hdr.index("Source") if "Source" in hdr else 1
if col is None:
    print("columns:", hdr[:12]); sys.exit()
def num(v):
    try: return float(v.replace(",", ""))
    except ValueError: return 0.0
body = [r for r in rows[at + 1:] if len(r) == len(hdr)]
tot = sum(num(r[col]) for r in body) or 1.0
print(f"# top SASS lines by stall samples (of {tot:.0f})")
for r in sorted(body, key=lambda r: -num(r[col]))[:30]:
    print(f"{100 * num(r[col]) / tot:5.1f}%  {r[src][:110]}")
PY
