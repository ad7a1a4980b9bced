"""CPU kernels of every layout against reference.py and bitsandbytes' CPU backend, same
run: GB/s of quantize, dequantize and linear on Flux-sized weights, the machine's memcpy
bandwidth, the fused-linear crossover of the 4-bit path, and a ratio table last.

    python3 bench/cpu_kernels.py [--shapes 3072x3072,3072x12288] [--m 1,16,256]
        [--layouts nf4,fp4,int8_block,int8_lode,int8_row] [--threads N] [--quick]

Implementations (one row each):
  ours        comfy_quant_native.ops on the native CPU backend (default SIMD level), called
              as a user calls it: outputs allocated by torch on every call
  ours kernel the same _C kernel writing into preallocated tensors (quantize/dequantize):
              what the kernel costs without torch.empty's page faults
  reference   ops under use_backend("reference"): reference.py, plain PyTorch
  bnb         bitsandbytes (CPU): functional.quantize_4bit / dequantize_4bit, and
              nn.Linear4bit's forward in eval mode (its AVX512-BF16 gemv on a repacked weight)
  dense f32   torch F.linear on the unquantized float32 weight (scale only)
GB/s counts bytes read + bytes written once per call: quantize = input + packed data +
scales; dequantize = packed data + scales + output; linear = quantized weight + x + y.
Times are medians over repeats (>= 0.4 s or 3 calls, after a warm-up call). This is a
benchmark, not a test: results go to docs/BENCHMARKS.md by hand, with the load.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from comfy_quant_native import layouts as L  # noqa: E402
from comfy_quant_native import ops  # noqa: E402

C = ops._C
FOUR_BIT_GROUP = 64
INT8_GROUP = 128


def median_time(fn, min_s=0.4, reps_max=30, reps_min=3) -> float:
    fn()
    times, start = [], time.perf_counter()
    while len(times) < reps_min or (time.perf_counter() - start < min_s and len(times) < reps_max):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - lscpu missing: say so
        return "unknown CPU (no lscpu)"


def memcpy_bandwidth(mb=256) -> dict[str, float]:
    """GB/s (read + written) of a large copy: torch copy_ into a preallocated tensor
    (torch's threads), libc memcpy (one thread; non-temporal stores at this size), and
    clone(), which also pays for a fresh allocation's page faults."""
    a = torch.ones(mb * 2**20 // 4)
    b = torch.zeros_like(a)
    n = a.numel() * 4
    libc = ctypes.CDLL(None)
    libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return {
        "copy_": 2 * n / median_time(lambda: b.copy_(a)) / 1e9,
        "memcpy": 2 * n / median_time(lambda: libc.memcpy(b.data_ptr(), a.data_ptr(), n)) / 1e9,
        "clone": 2 * n / median_time(lambda: a.clone()) / 1e9,
    }


@contextlib.contextmanager
def backend(name):
    if name == "reference":
        with ops.use_backend("reference"):
            yield
    else:
        yield


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class Results:
    def __init__(self):
        self.rows = []  # (op, layout, shape, variant, impl, seconds, bytes, flops)

    def add(self, op, layout, shape, variant, impl, seconds, nbytes_, flops=0):
        self.rows.append((op, layout, shape, variant, impl, seconds, nbytes_, flops))
        gbs = nbytes_ / seconds / 1e9
        extra = f"{flops / seconds / 1e9:9.1f} GFLOP/s" if flops else ""
        print(f"{op:<11}{layout:<11}{shape:>11} {variant:<10}{impl:<12}{seconds * 1e3:10.3f} ms {gbs:8.2f} GB/s{extra}",
              flush=True)

    def get(self, op, layout, shape, variant, impl):
        for r in self.rows:
            if r[:5] == (op, layout, shape, variant, impl):
                return r
        return None


# ----------------------------------------------------------------------------- per layout
def bench_four_bit(res, layout, N, K, ms, impls, reps):
    shape = f"{N}x{K}"
    g = FOUR_BIT_GROUP
    w32 = torch.randn(N, K)
    code = L.CODEBOOK_CODES[layout]
    packed, absmax = ops.quantize_4bit(w32, layout, g)
    qbytes = nbytes(packed, absmax)
    import bitsandbytes.functional as BF

    ours_impls = [i for i in impls if i != "bnb"]
    for dt in (torch.bfloat16, torch.float32):
        w = w32.to(dt)
        v = str(dt)[6:]
        io = nbytes(w) + qbytes
        for impl in ours_impls:
            with backend(impl):
                t = median_time(lambda: ops.quantize_4bit(w, layout, g), **reps(impl))
            res.add("quantize", layout, shape, v, "ours" if impl == "native" else impl, t, io)
        p2, a2 = torch.empty_like(packed), torch.empty_like(absmax)
        t = median_time(lambda: C.quantize_4bit(w.data_ptr(), L.DTYPE_CODES[dt], p2.data_ptr(), a2.data_ptr(),
                                                w.numel(), g, code, 0, 0, torch.get_num_threads()))
        res.add("quantize", layout, shape, v, "ours kernel", t, io)
        if "bnb" in impls:
            t = median_time(lambda: BF.quantize_4bit(w, blocksize=g, quant_type=layout), **reps("bnb"))
            res.add("quantize", layout, shape, v, "bnb", t, io)

    for dt in (torch.bfloat16, torch.float32):
        v = str(dt)[6:]
        io = qbytes + N * K * dt.itemsize
        for impl in ours_impls:
            with backend(impl):
                t = median_time(lambda: ops.dequantize_4bit(packed, absmax, layout, g, (N, K), dt), **reps(impl))
            res.add("dequantize", layout, shape, v, "ours" if impl == "native" else impl, t, io)
        y = torch.empty(N, K, dtype=dt)
        y.fill_(0)  # fault the pages in once
        t = median_time(lambda: C.dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), y.data_ptr(), L.DTYPE_CODES[dt],
                                                  N * K, g, code, 0, 0, torch.get_num_threads()))
        res.add("dequantize", layout, shape, v, "ours kernel", t, io)
        if "bnb" in impls:
            qs = BF.QuantState(absmax=absmax, shape=torch.Size((N, K)), blocksize=g, quant_type=layout, dtype=dt,
                               code=BF.get_4bit_type(layout, device="cpu"))
            pk = packed.view(-1, 1)
            t = median_time(lambda: BF.dequantize_4bit(pk, qs), **reps("bnb"))
            res.add("dequantize", layout, shape, v, "bnb", t, io)

    bnb_layer = None
    if "bnb" in impls:
        import bitsandbytes as bnb

        bnb_layer = bnb.nn.Linear4bit(K, N, bias=False, quant_type=layout)
        bnb_layer.weight = bnb.nn.Params4bit(w32.clone(), requires_grad=False, quant_type=layout, blocksize=g)
        bnb_layer = bnb_layer.to("cpu").eval()
    for M in ms:
        x = torch.randn(M, K)
        io = qbytes + nbytes(x) + M * N * 4
        flops = 2 * M * N * K
        for impl in ours_impls:
            if impl == "reference" and M > 16 and N * K > 3072 * 3072:
                continue  # seconds per call, and the dequantize + matmul rows say the same
            with backend(impl), torch.no_grad():
                t = median_time(lambda: ops.linear_4bit(x, packed, absmax, layout, g, (N, K)), **reps(impl))
            res.add("linear", layout, shape, f"M={M}", "ours" if impl == "native" else impl, t, io, flops)
        if bnb_layer is not None:
            with torch.no_grad():
                t = median_time(lambda: bnb_layer(x), **reps("bnb"))
            res.add("linear", layout, shape, f"M={M}", "bnb", t, io, flops)
        if layout == "nf4":
            with torch.no_grad():
                t = median_time(lambda: F.linear(x, w32))
            res.add("linear", "dense", shape, f"M={M}", "dense f32", t, nbytes(w32, x) + M * N * 4, flops)


def bench_int8(res, layout, N, K, ms, impls, reps):
    shape = f"{N}x{K}"
    g = None if layout == "int8_row" else INT8_GROUP
    w32 = torch.randn(N, K)
    q, s = ops.quantize_int8(w32, layout, g)
    qbytes = nbytes(q, s)
    gn, gk = L.int8_tile(layout, g, K)
    for dt in (torch.bfloat16, torch.float32):
        w = w32.to(dt)
        v = str(dt)[6:]
        io = nbytes(w) + qbytes
        for impl in impls:
            with backend(impl):
                t = median_time(lambda: ops.quantize_int8(w, layout, g), **reps(impl))
            res.add("quantize", layout, shape, v, "ours" if impl == "native" else impl, t, io)
        q2, s2 = torch.empty_like(q), torch.empty(math.ceil(N / gn), math.ceil(K / gk))
        t = median_time(lambda: C.quantize_int8(w.data_ptr(), L.DTYPE_CODES[dt], q2.data_ptr(), s2.data_ptr(),
                                                N, K, gn, gk, 0, 0, torch.get_num_threads()))
        res.add("quantize", layout, shape, v, "ours kernel", t, io)
    for dt in (torch.bfloat16, torch.float32):
        v = str(dt)[6:]
        io = qbytes + N * K * dt.itemsize
        for impl in impls:
            with backend(impl):
                t = median_time(lambda: ops.dequantize_int8(q, s, layout, g, dt), **reps(impl))
            res.add("dequantize", layout, shape, v, "ours" if impl == "native" else impl, t, io)
        y = torch.empty(N, K, dtype=dt)
        y.fill_(0)
        t = median_time(lambda: C.dequantize_int8(q.data_ptr(), s.data_ptr(), y.data_ptr(), L.DTYPE_CODES[dt],
                                                  N, K, gn, gk, 0, 0, torch.get_num_threads()))
        res.add("dequantize", layout, shape, v, "ours kernel", t, io)
    for M in ms:
        x = torch.randn(M, K)
        io = qbytes + nbytes(x) + M * N * 4
        for impl in impls:
            if impl == "reference" and M > 16 and N * K > 3072 * 3072:
                continue
            with backend(impl), torch.no_grad():  # W8A8: ops' default for int8
                t = median_time(lambda: ops.linear_int8(x, q, s, layout, g), **reps(impl))
            res.add("linear", layout, shape, f"M={M}", "ours" if impl == "native" else impl, t, io, 2 * M * N * K)


def bench_crossover(res, N, K, ms):
    """4-bit linear through ops with the fused kernel forced on, and forced off
    (dequantize to x's dtype + torch GEMM): where ops.FUSED_MAX_M_4BIT['cpu'] should sit."""
    shape = f"{N}x{K}"
    w = torch.randn(N, K)
    packed, absmax = ops.quantize_4bit(w, "nf4", FOUR_BIT_GROUP)
    limits = ops.FUSED_MAX_M_4BIT["cpu"]
    before = dict(limits)
    try:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for M in ms:
                x = torch.randn(M, K, dtype=dt)
                for name, limit in (("fused", 1 << 30), ("deq+mm", 0)):
                    limits[dt] = limit
                    with torch.no_grad():
                        t = median_time(lambda: ops.linear_4bit(x, packed, absmax, "nf4", FOUR_BIT_GROUP, (N, K)))
                    res.add("crossover", f"nf4 {str(dt)[6:]}", shape, f"M={M}", name, t, nbytes(packed, absmax),
                            2 * M * N * K)
    finally:
        limits.update(before)


# ----------------------------------------------------------------------------- report
def ratio_table(res, bw):
    print("\n## Ratios (same run). speed-up = other's time / ours; % BW = GB/s / memcpy GB/s")
    print(f"memcpy bandwidth (read + write): copy_ {bw['copy_']:.1f} GB/s, libc memcpy {bw['memcpy']:.1f} GB/s "
          f"-> {max(bw['copy_'], bw['memcpy']):.1f} GB/s; clone() with a fresh allocation {bw['clone']:.1f} GB/s")
    best = max(bw["copy_"], bw["memcpy"])
    print(f"| op | layout | shape | variant | ours ms | vs reference | vs bnb | ours GB/s (% BW) | kernel GB/s (% BW) |")
    print("|---|---|---|---|---|---|---|---|---|")
    seen = []
    for op, layout, shape, variant, impl, *_ in res.rows:
        key = (op, layout, shape, variant)
        if impl != "ours" or key in seen:
            continue
        seen.append(key)
        ours = res.get(*key, "ours")
        ref = res.get(*key, "reference")
        bnb = res.get(*key, "bnb")
        ker = res.get(*key, "ours kernel")
        gbs = ours[6] / ours[5] / 1e9
        cells = [op, layout, shape, variant, f"{ours[5] * 1e3:.3f}",
                 f"{ref[5] / ours[5]:.1f}x" if ref else "",
                 f"{bnb[5] / ours[5]:.2f}x" if bnb else "",
                 f"{gbs:.1f} ({gbs / best * 100:.0f}%)"]
        if ker:
            kg = ker[6] / ker[5] / 1e9
            cells.append(f"{kg:.1f} ({kg / best * 100:.0f}%)")
        else:
            cells.append("")
        print("| " + " | ".join(cells) + " |")
    cross = [r for r in res.rows if r[0] == "crossover"]
    if cross:
        print("\n## 4-bit fused linear vs dequantize + torch GEMM through ops (ms; ratio > 1: fused wins)")
        print("| x dtype | shape | M | fused | deq+mm | deq+mm / fused |")
        print("|---|---|---|---|---|---|")
        for r in cross:
            if r[4] == "fused":
                other = res.get("crossover", r[1], r[2], r[3], "deq+mm")
                print(f"| {r[1][4:]} | {r[2]} | {r[3][2:]} | {r[5] * 1e3:.2f} | {other[5] * 1e3:.2f} | {other[5] / r[5]:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="3072x3072,3072x12288")
    ap.add_argument("--m", default="1,16,256")
    ap.add_argument("--layouts", default=",".join(L.LAYOUTS))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--crossover-m", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--quick", action="store_true", help="first shape only, no reference, no crossover")
    args = ap.parse_args()
    if C is None:
        sys.exit(f"native extension not built: {ops.list_backends()['cpu']}")
    torch.set_num_threads(args.threads)
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.quick:
        shapes = shapes[:1]
    impls = ["native"] + ([] if args.quick else ["reference"]) + (["bnb"] if bnb_version else [])
    ms = [int(m) for m in args.m.split(",")]

    def reps(impl):  # the reference takes up to seconds a call: three calls are enough
        return {"min_s": 0.0, "reps_max": 3} if impl == "reference" else {}

    load0 = os.getloadavg()
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, bitsandbytes {bnb_version}, "
          f"threads {args.threads}, CPU level {C.cpu_level()}, {datetime.date.today()}, "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    bw = memcpy_bandwidth()
    print(f"# memcpy GB/s (read + write): copy_ {bw['copy_']:.1f}, libc memcpy {bw['memcpy']:.1f}, clone {bw['clone']:.1f}")
    res = Results()
    for N, K in shapes:
        for layout in args.layouts.split(","):
            if layout in L.FOUR_BIT:
                bench_four_bit(res, layout, N, K, ms, impls, reps)
            else:
                bench_int8(res, layout, N, K, ms, [i for i in impls if i != "bnb"], reps)
    if not args.quick:
        N, K = shapes[-1]
        bench_crossover(res, N, K, [int(m) for m in args.crossover_m.split(",")])
    bw_after = memcpy_bandwidth()
    for k in bw:
        bw[k] = max(bw[k], bw_after[k])
    load1 = os.getloadavg()
    ratio_table(res, bw)
    print(f"\nload average before {load0[0]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
