"""What a small linear costs beside its bytes, on the GPU: the 4-bit streamed kernel
(1-16 tokens) under kernel knobs, by default with and without programmatic dependent
launch (PDL), against bf16 F.linear (cuBLAS), timed in turns in one run
(bench/gpu_ops.py's graphs: 50 calls a graph, the weights rotated so that every call
reads DRAM).

    python3 bench/skinny_launch.py [--tokens 1,16] [--variants "pdl=2;pdl=1"] [--timeline | --blocks]

--variants: a column each, knobs (ops.CUDA_KNOBS) as k=v[,k=v], ';' between columns
(knob pdl: 2 launches the 4-bit kernel early and releases the next early; 1 off, which
is the default for this kernel: see docs/CUDA_NOTES.md, runs 73-75).

Two ways a call can follow another:
  back to back   the graph holds the op 50 times (gpu_ops.py's table): with PDL a call's
                 blocks start as the previous call's blocks leave the SMs
  after x's op   each call's input is written just before it by a torch kernel
                 (torch.mul(x0, 1, out=x)), as in a model, where the kernel before a
                 linear is torch's and never releases its dependents early: the column
                 is (mul + op) - mul alone
--timeline: instead, where block 0 of the kernel spends its time (knob skinny_probe = 4:
the SM's clock at 8 points of the kernel, in y instead of the result), the last of 50
calls in a graph, each after x's op, weights rotated: cycles from the kernel's first
instruction, medians of 9 replays.
--blocks: instead, when each block of the kernel starts and ends (knob skinny_probe = 6:
the global timer, in y), the same last call: the spread of the starts (the launch) and
of the ends (the blocks' imbalance), us from the first start, medians of 9 replays.
The first rows are the smallest calls (one 8-row octet, then one octet an SM): their
time is the fixed cost of a call in this timing, the part no byte count explains.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_quant_native import ops, reference  # noqa: E402
from gpu_ops import (GraphTimer, copy_bandwidth, nf4_linear_bytes, rotated_copies,  # noqa: E402
                     time_graphs_interleaved)

DEV = "cuda"
REPS = 50


def case(M: int, K: int, N: int, variants: list[dict]) -> tuple[list[float], list[float], float]:
    """(bf16 and ours under each variant back to back), (the same after x's op), mul alone; us"""
    torch.manual_seed(0)
    w = torch.randn(N, K, dtype=torch.bfloat16, device=DEV) * 0.02
    packed, absmax = ops.quantize_4bit(w, "nf4", 64)
    ps = rotated_copies(packed, packed.numel() + 4 * absmax.numel())
    ws = rotated_copies(w)
    x0 = torch.randn(M, K, dtype=torch.bfloat16, device=DEV)
    x = x0.clone()
    want = reference.linear_4bit(x.cpu().float(), packed.cpu(), absmax.cpu(), "nf4", 64, N, K).float()
    got = ops.linear_4bit(x, packed, absmax, "nf4", 64, (N, K)).float().cpu()
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert err < 1e-2, f"linear_4bit {M}x{K}->{N}: relative error {err:.2e}"

    def ours(i):
        return ops.linear_4bit(x, ps[i], absmax, "nf4", 64, (N, K))

    def produce(i):
        return torch.mul(x0, 1.0, out=x)

    def produced_ours(i):
        produce(i)
        return ours(i)

    def bf16(i):
        return F.linear(x, ws[i])

    def produced_bf16(i):
        produce(i)
        return bf16(i)

    entries = [(bf16, len(ws))] + [(ours, len(ps), v) for v in variants] + [(produce, 1)]
    entries += [(produced_bf16, len(ws))] + [(produced_ours, len(ps), v) for v in variants]
    t = [1e3 * ms for ms in time_graphs_interleaved(entries, REPS, replays=3)]
    n = 1 + len(variants)
    mul = t[n]
    return t[:n], [v - mul for v in t[n + 1:]], mul


MARKS = ["barriers set", "loads issued (producer)", "decode table built", "tokens in", "first stage in",
         "last tile's products", "y stored"]


def probed_timer(M: int, K: int, N: int, probe: int) -> GraphTimer:
    """50 calls in a graph, each after x's op, weights rotated, under knob skinny_probe =
    probe: the last call's y holds what the probe wrote."""
    torch.manual_seed(0)
    w = torch.randn(N, K, dtype=torch.bfloat16, device=DEV) * 0.02
    packed, absmax = ops.quantize_4bit(w, "nf4", 64)
    ps = rotated_copies(packed, packed.numel() + 4 * absmax.numel())
    x0 = torch.randn(M, K, dtype=torch.bfloat16, device=DEV)
    x = x0.clone()

    def produced_ours(i):
        torch.mul(x0, 1.0, out=x)
        return ops.linear_4bit(x, ps[i], absmax, "nf4", 64, (N, K))

    return GraphTimer(produced_ours, len(ps), REPS, dict(skinny_probe=probe, pdl=1))


def timeline(M: int, K: int, N: int) -> list[float]:
    """Cycles from block 0's first instruction to each of MARKS (knob skinny_probe = 4)."""
    timer = probed_timer(M, K, N, 4)
    rows = []
    for _ in range(9):
        timer.replay(1)
        t = timer.out.reshape(-1)[:16].view(torch.int32).cpu().tolist()[:8]
        rows.append([(v - t[0]) % (1 << 32) for v in t[1:]])
    return [statistics.median(r[i] for r in rows) for i in range(len(MARKS))]


def block_spans(M: int, K: int, N: int) -> list[float]:
    """us from the first block's start: last start, first end, median end, last end, over
    the blocks of the kernel (knob skinny_probe = 6); medians of 9 replays."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    timer = probed_timer(M, K, N, 6)
    rows = []
    for _ in range(9):
        timer.out.view(torch.int32).fill_(-1)  # words no block wrote stay -1 (start == end)
        timer.replay(1)
        words = timer.out.reshape(-1).view(torch.int32)[:2 * sms].cpu().tolist()
        pairs = [(a % (1 << 32), b % (1 << 32)) for a, b in zip(words[0::2], words[1::2]) if a != b]
        t0 = min(a for a, _ in pairs)
        starts = sorted((a - t0) % (1 << 32) for a, _ in pairs)
        ends = sorted((b - t0) % (1 << 32) for _, b in pairs)
        rows.append([starts[-1], ends[0], statistics.median(ends), ends[-1], len(pairs)])
    return [statistics.median(r[i] for r in rows) / (1 if i == 4 else 1e3) for i in range(5)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--variants", default="pdl=2;pdl=1")
    ap.add_argument("--timeline", action="store_true")
    ap.add_argument("--blocks", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available() or ops.list_backends()["cuda"] is not None:
        print("needs a GPU and the CUDA kernels:", ops.list_backends()["cuda"])
        return 1
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if args.timeline:
        print(f"# {torch.cuda.get_device_name()}: block 0 of linear4_stream, cycles from its first instruction")
        print("| M | K -> N | " + " | ".join(MARKS) + " |")
        print("|---" * (2 + len(MARKS)) + "|")
        for M in [int(m) for m in args.tokens.split(",")]:
            for K, N in [(3072, 16), (3072, 8 * sms), (3072, 3072), (3072, 12288), (12288, 3072)]:
                print(f"| {M} | {K} -> {N} | " + " | ".join(f"{v:.0f}" for v in timeline(M, K, N)) + " |", flush=True)
        return 0
    if args.blocks:
        print(f"# {torch.cuda.get_device_name()}: the blocks of linear4_stream, us from the first block's start")
        print("| M | K -> N | blocks | last start | first end | median end | last end |")
        print("|---" * 7 + "|")
        for M in [int(m) for m in args.tokens.split(",")]:
            for K, N in [(3072, 8 * sms), (3072, 3072), (3072, 12288), (12288, 3072)]:
                last_start, first_end, median_end, last_end, n = block_spans(M, K, N)
                print(f"| {M} | {K} -> {N} | {n:.0f} | {last_start:.2f} | {first_end:.2f} | {median_end:.2f} "
                      f"| {last_end:.2f} |", flush=True)
        return 0
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, copy {bw / 1e3:.2f} TB/s")
    variants = [dict((k.strip(), int(v)) for k, _, v in (kv.partition("=") for kv in col.split(",")))
                for col in args.variants.split(";")]
    cols = ["bf16"] + args.variants.split(";")
    print("| M | K -> N | " + " | ".join(cols) + " | after x's op: " + " | ".join(cols)
          + " | mul alone | floor | " + " | ".join(f"{c} / bf16" for c in cols[1:]) + " |")
    print("|---" * (3 + 2 * len(cols) + len(variants) + 1) + "|")
    shapes = [(3072, 8), (3072, 8 * sms), (3072, 3072), (3072, 12288), (12288, 3072)]
    for M in [int(m) for m in args.tokens.split(",")]:
        for K, N in shapes:
            back, after, mul = case(M, K, N, variants)
            floor = nf4_linear_bytes(M, K, N) / (bw * 1e9) * 1e6
            print(f"| {M} | {K} -> {N} | " + " | ".join(f"{v:.2f}" for v in back + after)
                  + f" | {mul:.2f} | {floor:.2f} | " + " | ".join(f"{v / back[0]:.2f}x" for v in back[1:]) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
