"""4-bit linear at large M: dequantize + cuBLAS, whole weight against row chunks whose
bf16 copy is still in L2 when its GEMM reads it (each chunk's GEMM writes its columns
of y in place: cuBLAS takes the row stride).

    python3 bench/nf4_chunked.py [--M 4608]

Rows (ms, ratio to bf16 F.linear on fresh weights, CUDA-graph replay, weights rotated; a
shape's columns timed in turns, round after round):
  bf16 after a copy   a copy kernel writes the bf16 weight, then F.linear reads it
  whole               ops.linear_4bit as it is (dequantize all, then F.linear)
  chunks C            C row chunks: dequantize chunk c, mm into y[:, chunk c]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from comfy_quant_native import ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ops import DEV, SHAPES, rotated_copies, time_graphs_interleaved  # noqa: E402


def chunked(x, packed, absmax, N, K, chunks):
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    rows = -(-N // chunks)  # K % 64 == 0 here: every chunk starts on an absmax block
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        w = ops.dequantize_4bit(packed[n0 * K // 2:n1 * K // 2], absmax[n0 * K // 64:n1 * K // 64], "nf4", 64,
                                (n1 - n0, K), x.dtype)
        torch.mm(x, w.t(), out=y[:, n0:n1])
    return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, default=4608)
    args = ap.parse_args()
    M, reps = args.M, 10
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, M = {M}")
    print("| K, N | bf16 | bf16 after a copy | whole | chunks 2 | chunks 3 | chunks 4 | chunks 6 | chunks 8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for K, N in SHAPES:
        w = (torch.randn(N, K, device=DEV) * 0.02).to(torch.bfloat16)
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        p, a = ops.quantize_4bit(w, "nf4", 64)
        ref = ops.linear_4bit(x, p, a, "nf4", 64, (N, K))
        for c in (2, 3, 4, 6, 8):
            got = chunked(x, p, a, N, K, c).float()
            err = float((got - ref.float()).norm() / ref.float().norm())
            assert err < 1e-2, f"chunks {c}: differs from the whole-weight path ({err})"
        wb = rotated_copies(w)
        src = w.clone()
        ps = rotated_copies(p)
        calls = [(lambda i: F.linear(x, wb[i]), len(wb)),
                 (lambda i: F.linear(x, wb[i].copy_(src)), len(wb)),
                 (lambda i: ops.linear_4bit(x, ps[i], a, "nf4", 64, (N, K)), len(ps))]
        calls += [(lambda i, c=c: chunked(x, ps[i], a, N, K, c), len(ps)) for c in (2, 3, 4, 6, 8)]
        # in turns: the card's clock falls as it heats (gpu_ops.time_graphs_interleaved);
        # timed one after another, "bf16 after a copy" (second) read 9-21% slow in run 8
        t_bf16, *cells = time_graphs_interleaved(calls, reps)
        row = " | ".join(f"{t:.4f} ({t / t_bf16:.2f}x)" for t in cells)
        print(f"| {K}, {N} | {t_bf16:.4f} | {row} |", flush=True)
        del calls, wb, ps


if __name__ == "__main__":
    main()
