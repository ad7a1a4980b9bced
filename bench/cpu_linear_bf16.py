"""4-bit linear on bfloat16 activations, CPU: our AVX512-BF16 kernel against bitsandbytes'
CPU backend and torch's dense bf16 GEMM, same run, with ratio tables.

    python3 bench/cpu_linear_bf16.py [--shapes 3072x3072,3072x12288,12288x3072] [--m 1,16,256]
        [--layouts nf4] [--threads N] [--crossover-m 1,2,4,...] [--min-s 0.6] [--rounds 3]

Shapes are N x K (out x in features); group size 64. Rows (one each, milliseconds):
  ours        ops.linear_4bit(bf16 x) with the fused kernel forced on: at level avx512bf16
              the vdpbf16ps kernel (bf16 y), as a user calls it (torch allocates y)
  f32 kernel  the same at level avx512vnni: x and y converted to float32 around the
              float32-FMA kernel (what bf16 x ran before level avx512bf16, up to 8 rows)
  deq+mm      ops.dequantize_4bit to bf16 + F.linear (what bf16 x ran above 8 rows)
  bnb         bitsandbytes nn.Linear4bit forward, eval, no grad (its AVX512-BF16 gemv on a
              weight it repacks on the first call; bf16 absmax)
  torch bf16  F.linear on the dense bf16 weight (no quantization: the GEMM alone)
Each cell: the implementations timed in turn, --rounds times (median of calls within a
round, median over rounds). Ratios are other / ours (> 1: ours is faster). --crossover-m adds fused vs deq+mm through
ops for ops.FUSED_MAX_M_4BIT["cpu_avx512bf16"]. A benchmark, not a test: results go to
docs/BENCHMARKS.md by hand, with the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from comfy_quant_native import ops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_kernels import median_time as _median_time  # noqa: E402


def median_time(fn, min_s: float) -> float:
    """Median of >= 3 calls over about min_s seconds (bench/cpu_kernels.py's timer)."""
    return _median_time(fn, min_s=min_s, reps_max=400)

C = ops._C
GROUP = 64
BF16 = torch.bfloat16


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


class forced:
    """Fused kernel at every M (or never), and optionally another CPU level, for a block."""

    def __init__(self, fused: bool, level: str | None = None):
        self.fused, self.level = fused, level

    def __enter__(self):
        self.saved = {k: dict(v) for k, v in ops.FUSED_MAX_M_4BIT.items() if k.startswith("cpu")}
        for k in self.saved:
            for dt in ops.FUSED_MAX_M_4BIT[k]:
                ops.FUSED_MAX_M_4BIT[k][dt] = 1 << 30 if self.fused else 0
        self.before = C.cpu_level()
        if self.level:
            C.set_cpu_level(self.level)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            ops.FUSED_MAX_M_4BIT[k].update(v)
        C.set_cpu_level(self.before)


def bench_shape(layout, N, K, ms, min_s, rounds, rows):
    import bitsandbytes as bnb

    w = torch.randn(N, K)
    packed, absmax = ops.quantize_4bit(w, layout, GROUP)
    wb = w.to(BF16)
    layer = bnb.nn.Linear4bit(K, N, bias=False, quant_type=layout, compute_dtype=BF16)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=layout, blocksize=GROUP)
    layer = layer.to("cpu").eval()
    has_bf16 = "avx512bf16" in C.cpu_levels()
    lin = lambda x: ops.linear_4bit(x, packed, absmax, layout, GROUP, (N, K))  # noqa: E731
    for M in ms:
        x = torch.randn(M, K).to(BF16)
        impls = {}
        if has_bf16:
            impls["ours"] = (forced(True, "avx512bf16"), lambda: lin(x))
        impls["f32 kernel"] = (forced(True, "avx512vnni" if has_bf16 else None), lambda: lin(x))
        impls["deq+mm"] = (forced(False), lambda: lin(x))
        impls["bnb"] = (contextlib.nullcontext(), lambda: layer(x))
        impls["torch bf16"] = (contextlib.nullcontext(), lambda: F.linear(x, wb))
        # Round robin, median over rounds: a burst of load from other processes then hits
        # one round of every implementation rather than all the calls of one.
        times = {k: [] for k in impls}
        with torch.no_grad():
            for _ in range(rounds):
                for k, (ctx, fn) in impls.items():
                    with ctx:
                        times[k].append(median_time(fn, min_s / rounds))
        t = {k: statistics.median(v) for k, v in times.items()}
        rows.append((layout, f"{N}x{K}", M, t))
        print(f"{layout} {N}x{K} M={M}: " + "  ".join(f"{k} {v * 1e3:.3f} ms" for k, v in t.items()), flush=True)


def crossover(N, K, ms, min_s):
    w = torch.randn(N, K)
    packed, absmax = ops.quantize_4bit(w, "nf4", GROUP)
    out = []
    for M in ms:
        x = torch.randn(M, K).to(BF16)
        t = {}
        with torch.no_grad():
            for name, fused in (("fused", True), ("deq+mm", False)):
                with forced(fused):
                    t[name] = median_time(lambda: ops.linear_4bit(x, packed, absmax, "nf4", GROUP, (N, K)), min_s)
        out.append((M, t))
        print(f"crossover {N}x{K} M={M}: fused {t['fused'] * 1e3:.2f} ms, deq+mm {t['deq+mm'] * 1e3:.2f} ms", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="3072x3072,3072x12288,12288x3072")
    ap.add_argument("--m", default="1,16,256")
    ap.add_argument("--layouts", default="nf4")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--crossover-m", default="", help="e.g. 8,16,32,64,128,256,512 (on the last shape)")
    ap.add_argument("--min-s", type=float, default=0.6, help="seconds per implementation and cell, over all rounds")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds per cell (median over rounds)")
    args = ap.parse_args()
    if C is None:
        sys.exit(f"native extension not built: {ops.list_backends()['cpu']}")
    try:
        import bitsandbytes
    except ImportError:
        sys.exit("bitsandbytes is not installed")
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"threads {args.threads}, CPU levels {C.cpu_levels()}, {datetime.date.today()}, load {load0[0]:.2f}")
    if "avx512bf16" not in C.cpu_levels():
        print("# this CPU has no level avx512bf16: the 'ours' rows are missing (bf16 x runs the f32 kernel)")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(m) for m in args.m.split(",")]
    rows = []
    for layout in args.layouts.split(","):
        for N, K in shapes:
            bench_shape(layout, N, K, ms, args.min_s, args.rounds, rows)
    cross = crossover(*shapes[-1], [int(m) for m in args.crossover_m.split(",")], args.min_s) if args.crossover_m else []
    load1 = os.getloadavg()

    print("\n## ms per call (bf16 x, group 64); ratio = other / ours (> 1: ours faster)")
    print("| layout | shape | M | ours | f32 kernel | deq+mm | bnb | torch bf16 | bnb / ours | torch bf16 / ours | old path / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for layout, shape, M, t in rows:
        ours = t.get("ours")
        old = t["f32 kernel"] if M <= 8 else t["deq+mm"]  # what ops ran for bf16 x before
        cells = [layout, shape, str(M)] + [f"{t[k] * 1e3:.3f}" if k in t else "-" for k in
                                           ("ours", "f32 kernel", "deq+mm", "bnb", "torch bf16")]
        cells += [f"{t[k] / ours:.2f}" if ours else "-" for k in ("bnb", "torch bf16")]
        cells.append(f"{old / ours:.2f}" if ours else "-")
        print("| " + " | ".join(cells) + " |")
    if cross:
        print(f"\n## fused vs dequantize + torch GEMM through ops, nf4 {shapes[-1][0]}x{shapes[-1][1]} (ms)")
        print("| M | fused | deq+mm | deq+mm / fused |")
        print("|---|---|---|---|")
        for M, t in cross:
            print(f"| {M} | {t['fused'] * 1e3:.2f} | {t['deq+mm'] * 1e3:.2f} | {t['deq+mm'] / t['fused']:.2f} |")
    print(f"\nload average before {load0[0]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
