"""Where a W8A8 linear at large M spends its time: the whole op against its parts, each
timed alone in the same run (CUDA-graph replay, bench/gpu_ops.py's timer; a shape's rows
in turns, round after round).

    python3 bench/w8a8_parts.py [--M 4608] [--layouts int8_row,int8_lode,int8_block] [--shape K,N]

Rows per (K, N, layout), ms and ratio to bf16 F.linear on fresh weights:
  op          ops.linear_int8 (activation quantize + GEMM), weights rotated past L2
  act quant   ops.quantize_int8_act alone
  gemm cold   the GEMM alone on ready xq / xs, weights rotated past L2
  gemm warm   the GEMM alone on one weight reused every call
  gemm cold, knobs   with --alt knob=value: the GEMM alone with those kernel knobs (A/B)
  op, knobs   with --alt: the op with those knobs
  op - parts  op minus (act quant + gemm cold): what the sum does not explain
--timeline: instead, where CTA 0's two consumer warpgroups spend a K-tile (knob gemm_probe =
4, per-group scales: lode and block): the SM's clock when the stage is ready (p0), the MMAs
issued (p1) and done (p2), and the group promoted and the stage released (p3), for the
first 128 K-tiles. With --alt gemm_probe=1: the same without the promotion.
--ksweep: the GEMM alone (int8_row) at M x N for K from 128 up, to split its time into
a per-tile fixed part and a per-K-step part (time = rounds x (fixed + K/128 x step)).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from comfy_quant_native import layouts as L  # noqa: E402
from comfy_quant_native import ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ops import (DEV, SHAPES, gemm_alone, kernel_variants, rotated_copies, time_graph,  # noqa: E402
                     time_graphs_interleaved)

GROUPS = {"int8_row": None, "int8_lode": 128, "int8_block": 128}


def layout_gemm(w, x, lay: str):
    """w quantized to ``lay`` and x's activation quantize: (q, s, act_k, gemm), gemm(q) the
    W8A8 GEMM alone (gpu_ops.gemm_alone) on that xq / xs."""
    N, K = w.shape
    g = GROUPS[lay]
    q, s = ops.quantize_int8(w, lay, g)
    gs = L.check_group_size(lay, g, K)
    act_k = L.act_group_k(lay, gs, K)
    xq, xs = ops.quantize_int8_act(x, act_k)
    return q, s, act_k, gemm_alone(xq, xs, s, N, *L.int8_tile(lay, gs, K))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, default=4608)
    ap.add_argument("--layouts", default="int8_row,int8_lode,int8_block")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shape", help="K,N: only this shape (default: gpu_ops.SHAPES)")
    ap.add_argument("--ksweep", type=int, default=0, help="N for a K sweep of the int8_row GEMM")
    ap.add_argument("--timeline", action="store_true")
    ap.add_argument("--alt", action="append", default=[],
                    help="knob=value (ops.CUDA_KNOBS), repeatable: two more columns, the GEMM alone and the op "
                         "with them")
    args = ap.parse_args()
    M, reps = args.M, args.reps
    if args.ksweep:
        ksweep(M, args.ksweep, reps)
        return
    alt = dict((k, int(v)) for k, _, v in (item.partition("=") for item in args.alt))
    if args.timeline:
        K, N = (int(v) for v in (args.shape or "3072,12288").split(","))
        for lay in args.layouts.split(","):
            if GROUPS[lay]:
                timeline(M, K, N, lay, alt)
        return
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, M = {M}")
    alt_col = f" gemm cold, {', '.join(args.alt)} | op, {', '.join(args.alt)} |" if alt else ""
    print(f"| K, N | layout | bf16 | op | act quant | gemm cold | gemm warm |{alt_col} op - parts | gemm cold TOPS |")
    print("|---|---|---|---|---|---|---|" + "---|" * (4 if alt else 2))
    shapes = [tuple(int(v) for v in args.shape.split(","))] if args.shape else SHAPES
    for K, N in shapes:
        w = (torch.randn(N, K, device=DEV) * 0.02).to(torch.bfloat16)
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        ws_bf16 = rotated_copies(w)
        calls = [(lambda i: F.linear(x, ws_bf16[i]), len(ws_bf16))]
        lays = args.layouts.split(",")
        for lay in lays:  # bound now (default arguments), timed after the loop
            g = GROUPS[lay]
            q, s, act_k, gemm = layout_gemm(w, x, lay)
            qs = rotated_copies(q)

            def op(i, qs=qs, s=s, lay=lay, g=g):
                return ops.linear_int8(x, qs[i], s, lay, g)

            def cold(i, gemm=gemm, qs=qs):
                return gemm(qs[i])

            calls += [(op, len(qs)), (lambda i, act_k=act_k: ops.quantize_int8_act(x, act_k), 1),
                      (cold, len(qs)), (lambda i, gemm=gemm, qs=qs: gemm(qs[0]), 1)]
            if alt:
                calls += [(cold, len(qs), alt), (op, len(qs), alt)]
        # in turns: the card's clock falls as it heats (gpu_ops.time_graphs_interleaved)
        times = time_graphs_interleaved(calls, reps)
        t_bf16 = times[0]

        def c(t):
            return f"{t:.4f} ({t / t_bf16:.2f}x)"

        per = 6 if alt else 4
        for j, lay in enumerate(lays):
            t_op, t_aq, t_cold, t_warm = times[1 + per * j: 5 + per * j]
            tops = 2 * M * N * K / (t_cold * 1e-3) / 1e12
            extra = f" {c(times[5 + per * j])} | {c(times[6 + per * j])} |" if alt else ""
            print(f"| {K}, {N} | {lay} | {t_bf16:.4f} | {c(t_op)} | {c(t_aq)} | {c(t_cold)} | {c(t_warm)} |{extra}"
                  f" {t_op - t_aq - t_cold:+.4f} | {tops:.0f} |", flush=True)
        del calls, ws_bf16, w, x
        torch.cuda.empty_cache()


TL_REC = 128  # K-tiles a consumer warpgroup stamps (gemm_int8_sm90.cu, Sm90Cfg::TL_REC)


def timeline(M: int, K: int, N: int, lay: str, alt: dict) -> None:
    """CTA 0's consumer warpgroups, K-tile by K-tile (knob gemm_probe = 4, with ``alt``'s
    other knobs): cycles between the four points of a K-tile (the module docstring names
    them) and from the last to the next K-tile's first; and how far apart the two
    warpgroups' third points lie. Medians over K-tiles 8..127 of 5 calls."""
    w = (torch.randn(N, K, device=DEV) * 0.02).to(torch.bfloat16)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    q, _, _, gemm = layout_gemm(w, x, lay)
    knobs = dict(alt)
    knobs["gemm_probe"] = 4 | alt.get("gemm_probe", 0)  # other probe bits kept (ops.CUDA_KNOBS)
    samples = []
    with kernel_variants(**knobs):
        for _ in range(6):
            y = gemm(q)
            torch.cuda.synchronize()
            words = y[:16, :192].contiguous().view(torch.int32)[:, :96].reshape(-1)[:2 * TL_REC * 4]
            samples.append(words.cpu().tolist())
    rows = []
    for words in samples[1:]:
        st = [[[words[(wg * TL_REC + i) * 4 + j] % (1 << 32) for j in range(4)] for i in range(TL_REC)]
              for wg in range(2)]
        t0 = min(st[0][0][0], st[1][0][0])
        rel = [[[(v - t0) % (1 << 32) for v in k] for k in wgst] for wgst in st]
        for i in range(8, TL_REC - 1):
            for wg in range(2):
                a, b = rel[wg][i], rel[wg][i + 1]
                rows.append((wg, b[0] - a[0], a[1] - a[0], a[2] - a[1], a[3] - a[2], b[0] - a[3],
                             rel[1][i][2] - rel[0][i][2]))
    med = statistics.median
    print(f"# {lay}, {K} -> {N}, M = {M}, knobs {alt or '-'}: CTA 0's K-tiles 8..{TL_REC - 1}, cycles (medians; "
          "mean in brackets)")
    print("| warpgroup | period | p0 -> p1 | p1 -> p2 | p2 -> p3 | p3 -> next p0 | warpgroup 1's p2 after 0's |")
    print("|---|---|---|---|---|---|---|")
    for wg in range(2):
        r = [row[1:] for row in rows if row[0] == wg]
        cols = [f"{med(c):.0f} ({statistics.fmean(c):.0f})" for c in zip(*r)]
        print(f"| {wg} | " + " | ".join(cols) + " |")
    first = samples[-1]
    print("K-tiles 0-11 of the last call (p0 / p1 / p2 / p3, cycles from the first p0):")
    t0 = min(first[0], first[TL_REC * 4])
    for wg in range(2):
        print(f"  warpgroup {wg}: " + "  ".join(
            "/".join(str((first[(wg * TL_REC + i) * 4 + j] - t0) % (1 << 32)) for j in range(4)) for i in range(12)))
    sys.stdout.flush()


def ksweep(M: int, N: int, reps: int) -> None:
    print(f"# K sweep, int8_row GEMM alone, M = {M}, N = {N} ({torch.cuda.get_device_name()})")
    print("| K | ms | TOPS | us per 128x256 tile round |")
    print("|---|---|---|---|")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rounds = math.ceil(math.ceil(M / 128) * math.ceil(N / 256) / sms)
    for K in (128, 256, 512, 1024, 2048, 3072, 6144, 12288):
        w = (torch.randn(N, K, device=DEV) * 0.02).to(torch.bfloat16)
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        q, s = ops.quantize_int8(w, "int8_row", None)
        xq, xs = ops.quantize_int8_act(x, K)
        qs = rotated_copies(q)
        gemm = gemm_alone(xq, xs, s, N, 1, K)
        t = time_graph(lambda i: gemm(qs[i]), len(qs), reps)
        print(f"| {K} | {t:.4f} | {2 * M * N * K / (t * 1e-3) / 1e12:.0f} | {1e3 * t / rounds:.2f} |", flush=True)
        del qs, w, x


if __name__ == "__main__":
    main()
