"""One call of the W8A8 GEMM alone per layout, for a profiler (Nsight Compute):

    ncu --clock-control none --profile-from-start off -k regex:gemm_int8 \
        python3 bench/w8a8_profile.py [--K 3072 --N 12288 --M 4608] [--knob gemm_probe=1]

Warms up outside the profiled range, then runs each layout's GEMM once between
cudaProfilerStart and cudaProfilerStop (torch.cuda.profiler), so only those launches are
profiled. Prints each call's time from CUDA events (without the profiler's clock control,
the same as a plain run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from comfy_quant_native import ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from w8a8_parts import layout_gemm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, default=4608)
    ap.add_argument("--K", type=int, default=3072)
    ap.add_argument("--N", type=int, default=12288)
    ap.add_argument("--layouts", default="int8_row,int8_lode,int8_block")
    ap.add_argument("--knob", action="append", default=[], help="name=value (ops.CUDA_KNOBS), repeatable")
    args = ap.parse_args()
    for item in args.knob:
        k, _, v = item.partition("=")
        ops.cuda_kernel_variant(k, int(v))
    M, K, N = args.M, args.K, args.N
    w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    gemms = []
    for lay in args.layouts.split(","):
        q, _, _, gemm = layout_gemm(w, x, lay)
        for _ in range(3):
            gemm(q)
        gemms.append((lay, gemm, q))
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.profiler.start()
    for lay, gemm, q in gemms:
        start.record()
        gemm(q)
        end.record()
        end.synchronize()
        print(f"{lay} M={M} K={K} N={N}: {start.elapsed_time(end):.4f} ms", flush=True)
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
