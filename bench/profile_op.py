"""One op on rotating weight copies, for a profiler (ncu) to capture a single launch:

    ncu --clock-control none -k regex:linear4_skinny --launch-skip 20 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python3 bench/profile_op.py --K 3072 --N 12288 --M 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from comfy_quant_native import ops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--K", type=int, default=3072)
    ap.add_argument("--N", type=int, default=12288)
    ap.add_argument("--M", type=int, default=1)
    ap.add_argument("--layout", default="nf4")
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()
    K, N, M = args.K, args.N, args.M
    w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    if args.layout in ("nf4", "fp4"):
        p, a = ops.quantize_4bit(w, args.layout, 64)
        copies = [p.clone() for _ in range(max(2, (256 << 20) // p.numel()))]
        for i in range(args.calls):
            ops.linear_4bit(x, copies[i % len(copies)], a, args.layout, 64, (N, K))
    else:
        g = 128 if args.layout != "int8_row" else None
        q, s = ops.quantize_int8(w, args.layout, g)
        copies = [q.clone() for _ in range(max(2, (256 << 20) // q.numel()))]
        for i in range(args.calls):
            ops.linear_int8(x, copies[i % len(copies)], s, args.layout, g)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
