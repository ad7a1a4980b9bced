"""int8 CPU kernels per SIMD level, same run: GB/s of quantize / dequantize / linear and
the ratio to the reference C level, plus torch's float32/bf16 linear for scale.

    python3 bench/cpu_int8_levels.py [--threads N] [--shapes 3072x3072,3072x12288] [--m 1,16,256]

Bytes counted: quantize reads x and writes q; dequantize reads q and writes y (both
called on preallocated tensors); linear counts the int8 weight once (N*K bytes) per call;
"W8A8 op" is ops.linear_int8(act_quant=True) including the activation quantization.
A benchmark, not a test; the ref level is skipped at M >= 256 (minutes of scalar code).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from comfy_quant_native import layouts as L  # noqa: E402
from comfy_quant_native import ops  # noqa: E402

C = ops._C


def best_time(fn, min_s=0.3, reps_max=200):
    fn()
    times, t_start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - t_start < min_s and len(times) < reps_max):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--shapes", default="3072x3072,3072x12288")
    ap.add_argument("--m", default="1,16,256")
    ap.add_argument("--layouts", default="int8_block,int8_lode,int8_row")
    ap.add_argument("--levels", default=",".join(C.cpu_levels()))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    levels = args.levels.split(",")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
          f"{time.strftime('%Y-%m-%d')}, load {os.getloadavg()[0]:.2f}")
    print(f"{'op':<28}{'shape':>12}{'M':>5} " + "".join(f"{lv:>12}" for lv in levels) + "   (GB/s; xN = vs ref)")
    default = C.cpu_level()
    for shape in args.shapes.split(","):
        N, K = (int(s) for s in shape.split("x"))
        w = torch.randn(N, K)
        for layout in args.layouts.split(","):
            g = None if layout == "int8_row" else 128
            q, s = ops.quantize_int8(w, layout, g)
            rows = []
            gn, gk = L.int8_tile(layout, g, K)
            # quantize / dequantize: the kernels on preallocated tensors (a fresh 37 MB
            # torch.empty per call costs page faults, not kernel time)
            for dt in (torch.float32, torch.bfloat16):
                wd, qo, so, yo = w.to(dt), torch.empty_like(q), torch.empty_like(s), torch.empty(N, K, dtype=dt)
                code = L.DTYPE_CODES[dt]
                rows.append((f"quantize {layout} {str(dt)[6:]}", 1, N * K * (wd.element_size() + 1),
                             lambda wd=wd, qo=qo, so=so, code=code: C.quantize_int8(
                                 wd.data_ptr(), code, qo.data_ptr(), so.data_ptr(), N, K, gn, gk, 0, 0, args.threads)))
                rows.append((f"dequantize {layout} {str(dt)[6:]}", 1, N * K * (wd.element_size() + 1),
                             lambda yo=yo, code=code: C.dequantize_int8(
                                 q.data_ptr(), s.data_ptr(), yo.data_ptr(), code, N, K, gn, gk, 0, 0, args.threads)))
            for M in (int(m) for m in args.m.split(",")):
                x = torch.randn(M, K)
                y = torch.empty(M, N)
                rows.append((f"W8A8 op {layout}", M, N * K, lambda x=x: ops.linear_int8(x, q, s, layout, g, None, True)))

                def fused(x=x, y=y, M=M):
                    C.linear_int8(x.data_ptr(), 0, q.data_ptr(), s.data_ptr(), 0, y.data_ptr(), M, N, K,
                                  gn, gk, 0, 0, args.threads)
                rows.append((f"linear weight-only {layout}", M, N * K, fused))
            for name, M, nbytes, fn in rows:
                cells, base, best = [], None, None
                for lv in levels:
                    C.set_cpu_level(lv)
                    if lv == "ref" and M >= 256:
                        cells.append(f"{'-':>12}")  # scalar GEMM takes minutes
                        continue
                    t = best_time(fn, min_s=0.2 if lv == "ref" else 0.4)
                    gbs = nbytes / t / 1e9
                    base = base or (t if lv == "ref" else None)
                    best = t if best is None else min(best, t)
                    cells.append(f"{gbs:7.2f}" + (f" x{base / t:<3.0f}" if base and lv != "ref" else "    "))
                ops_note = f"  {2 * M * N * K / best / 1e9:6.0f} GOP/s" if "linear" in name or "W8A8" in name else ""
                print(f"{name:<28}{shape:>12}{M:>5} " + "".join(cells) + ops_note)
            C.set_cpu_level(default)
        for M in (int(m) for m in args.m.split(",")):
            x = torch.randn(M, K)
            for dt in (torch.float32, torch.bfloat16):
                wd, xd = w.to(dt), x.to(dt)
                t = best_time(lambda: torch.nn.functional.linear(xd, wd))
                print(f"{'torch linear ' + str(dt)[6:]:<28}{shape:>12}{M:>5}  {N * K * wd.element_size() / t / 1e9:7.2f} GB/s"
                      f"  {2 * M * N * K / t / 1e9:8.1f} GFLOP/s")


if __name__ == "__main__":
    main()
