"""GPU benchmark of comfy-quant-native's CUDA kernels: builds nothing, checks correctness,
then prints ratio tables against bf16 F.linear (cuBLAS) measured in the same run.

    python3 bench/gpu_ops.py [--quick] [--json out.json] [--variants]

Timing: each measured op is captured R times into one CUDA graph and the graph is
replayed (median of several replays), so launch gaps and Python overhead stay out of
the numbers; the R calls rotate over enough copies of the weight that nothing is served
from L2 (a model's ~500 linears never find their weights in L2 either). At M >= 256 the
methods of a shape are timed in turns, round after round (the card's clock falls as it
heats; time_graphs_interleaved). Rows:
  bf16      F.linear with a bf16 weight (cuBLAS)
  ours      comfy_quant_native ops on the CUDA backend (the path ops.py picks; for
            W8A8 the activation quantization kernel is included)
  eager     plain-PyTorch dequantize (reference.py) to bf16 + F.linear
  bnb       bitsandbytes.matmul_4bit (4-bit)
  int_mm    torch._int_mm on int8 operands (no quantization or scaling counted; M > 16)
Floors: bytes that must move at the measured copy bandwidth (dequantize/quantize; and
the nf4 linear at M <= 16: its packed weight, absmax, x and y, the "nf4 floor" column);
at M >= 256, 2 M N K operations at the tensor cores' dense peak at the card's highest SM
clock ("bf16 MMA floor", "int8 MMA floor"; sm_80 and sm_90 only: mma_peaks()).
A call also has a fixed cost no byte count explains (bench/skinny_launch.py: ~1.2 us for a
trivial kernel in this timing, ~4 us for our smallest 4-bit call).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from comfy_quant_native import ops, reference  # noqa: E402

DEV = "cuda"
SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]  # (K, N), Flux
TOKENS = [1, 16, 256, 4608]
L2_DEFEAT = 256 << 20  # bytes of distinct weights cycled through per graph


# ----------------------------------------------------------------------------- timing
class GraphTimer:
    """fn(i) (i = copy index) captured `reps` times into one CUDA graph after a warm-up,
    under the kernel knobs `knobs` (launches read them when captured); replay(n) times n
    replays of it (ms a call each); out is what the last captured call returned (its
    tensors rewritten by every replay). graph is None where the calls could not be
    captured."""

    def __init__(self, fn, n_copies: int, reps: int, knobs: dict | None = None):
        self.fn, self.n_copies, self.reps, self.knobs = fn, n_copies, reps, knobs or {}
        self.out = None
        with kernel_variants(**self.knobs):
            self._capture()

    def _capture(self):
        fn, n_copies, reps = self.fn, self.n_copies, self.reps
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(min(n_copies, 3)):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                for r in range(reps):
                    self.out = fn(r % n_copies)
        except Exception as e:  # noqa: BLE001 - not capturable: the caller times it eagerly
            print(f"  (graph capture failed: {str(e)[:120]}; eager timing)", flush=True)
            torch.cuda.synchronize()
            self.graph, self.out = None, None
            return
        self.graph.replay()
        torch.cuda.synchronize()

    def replay(self, n: int) -> list[float]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(n):
            start.record()
            self.graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / self.reps)
        return times


def time_graph(fn, n_copies: int, reps: int, replays: int = 7) -> float:
    """Median ms per call of fn(i) (i = copy index), captured `reps` times in a graph."""
    t = GraphTimer(fn, n_copies, reps)
    if t.graph is None:
        return -time_eager(fn, n_copies, reps)
    ms = statistics.median(t.replay(replays))
    del t
    return ms


def time_graphs_interleaved(calls, reps: int, rounds: int = 5, replays: int = 2) -> list[float]:
    """Median ms per call of each (fn, n_copies) or (fn, n_copies, knobs) of calls (knobs:
    GraphTimer's), all captured first and then replayed in turn, round after round. Long
    compute-bound calls (M = 4608) heat the card and its clock falls within a run: timed
    one after another, the same bf16 GEMM measured 0.438 ms first and 0.503 ms second
    (run 41, 12288 -> 3072), so whichever column came later looked slower. In turns, each
    sees the same clocks."""
    timers = [GraphTimer(fn, n, reps, *knobs) for fn, n, *knobs in calls]
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for t, out in zip(timers, times):
            if t.graph is not None:
                out += t.replay(replays)
    result = []
    for t, out in zip(timers, times):
        if t.graph is None:
            with kernel_variants(**t.knobs):
                result.append(-time_eager(t.fn, t.n_copies, reps))
        else:
            result.append(statistics.median(out))
    del timers
    return result


def time_eager(fn, n_copies: int, reps: int) -> float:
    for i in range(3):
        fn(i % n_copies)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for r in range(reps):
            fn(r % n_copies)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    return max(2, min(64, math.ceil(L2_DEFEAT / max(nbytes, 1))))


def rotated_copies(t: torch.Tensor, nbytes: int | None = None) -> list[torch.Tensor]:
    """Clones of t for time_graph to visit in turn (fn(copies[i])), so that every call
    reads its operand from DRAM, not L2: copies_for(nbytes) of them, nbytes being t's own
    bytes unless the caller passes the call's whole footprint."""
    return [t.clone() for _ in range(copies_for(t.numel() * t.element_size() if nbytes is None else nbytes))]


def copy_bandwidth() -> float:
    """GB/s of 1 GiB device-to-device streams, bytes read + written: the larger of a
    copy_ (cudaMemcpy) and an elementwise kernel (a + 1)."""
    a = torch.empty(1 << 28, dtype=torch.float32, device=DEV).uniform_()
    b = torch.empty_like(a)
    best = 0.0
    for fn in (lambda i: b.copy_(a), lambda i: torch.add(a, 1.0, out=b)):
        ms = time_graph(fn, 1, 10)
        best = max(best, 2 * 4 * a.numel() / (ms * 1e-3) / 1e9)
    return best


# ----------------------------------------------------------------------------- correctness
def check_correctness() -> list[str]:
    """Bit-exact quantize/dequantize and linear error on one Flux-sized case each."""
    bad = []
    w = torch.randn(3072, 1024, dtype=torch.bfloat16) * 0.02
    for cb in ("nf4", "fp4"):
        rp, ra = reference.quantize_4bit(w, cb, 64)
        p, a = ops.quantize_4bit(w.to(DEV), cb, 64)
        if not (torch.equal(p.cpu(), rp) and torch.equal(a.cpu(), ra)):
            bad.append(f"quantize {cb}")
        ref = reference.dequantize_4bit(rp, ra, cb, 64, w.shape, torch.bfloat16)
        got = ops.dequantize_4bit(p, a, cb, 64, w.shape, torch.bfloat16)
        if not torch.equal(got.cpu().view(torch.int16), ref.view(torch.int16)):
            bad.append(f"dequantize {cb}")
        for M in (1, 16, 4608):
            x = torch.randn(M, 1024, dtype=torch.bfloat16)
            yr = reference.linear_4bit(x.float(), rp, ra, cb, 64, 3072, 1024)
            y = ops.linear_4bit(x.to(DEV), p, a, cb, 64, (3072, 1024)).float().cpu()
            err = float((y - yr).norm() / yr.norm())
            if not err < 1e-2:
                bad.append(f"linear {cb} M={M} rel err {err:.2e}")
    for layout, g in (("int8_row", None), ("int8_lode", 128), ("int8_block", 128)):
        rq, rs = reference.quantize_int8(w, layout, g)
        q, s = ops.quantize_int8(w.to(DEV), layout, g)
        if not (torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)):
            bad.append(f"quantize {layout}")
        ref = reference.dequantize_int8(rq, rs, layout, g, torch.bfloat16)
        got = ops.dequantize_int8(q, s, layout, g, torch.bfloat16)
        if not torch.equal(got.cpu().view(torch.int16), ref.view(torch.int16)):
            bad.append(f"dequantize {layout}")
        for M in (1, 16, 4608):
            x = torch.randn(M, 1024, dtype=torch.bfloat16)
            yr = reference.linear_int8(x.float(), rq, rs, layout, g)
            y = ops.linear_int8(x.to(DEV), q, s, layout, g).float().cpu()
            err = float((y - yr).norm() / yr.norm())
            if not err < 1e-2:
                bad.append(f"W8A8 {layout} M={M} rel err {err:.2e}")
    return bad


# ----------------------------------------------------------------------------- benchmarks
def bench_dequant_quant(bw: float, rows: list[dict], shapes) -> None:
    for K, N in shapes:
        w = (torch.randn(N, K, device=DEV) * 0.02).to(torch.bfloat16)
        n = N * K
        for cb in ("nf4", "fp4"):
            p, a = ops.quantize_4bit(w, cb, 64)
            nbytes = p.numel() + 4 * a.numel() + 2 * n
            ps = rotated_copies(p, p.numel() + 4 * a.numel())
            ms = time_graph(lambda i: ops.dequantize_4bit(ps[i], a, cb, 64, (N, K), torch.bfloat16), len(ps), 50)
            rows.append(dict(op="dequantize", layout=cb, K=K, N=N, ms=ms, bytes=nbytes, floor_ms=nbytes / bw / 1e6))
        for layout, g in (("int8_block", 128), ("int8_lode", 128), ("int8_row", None)):
            q, s = ops.quantize_int8(w, layout, g)
            nbytes = q.numel() + 4 * s.numel() + 2 * n
            qs = rotated_copies(q)
            ms = time_graph(lambda i: ops.dequantize_int8(qs[i], s, layout, g, torch.bfloat16), len(qs), 50)
            rows.append(dict(op="dequantize", layout=layout, K=K, N=N, ms=ms, bytes=nbytes, floor_ms=nbytes / bw / 1e6))
    # quantize one 3072 x 12288 weight (N = 3072 out, K = 12288 in, as Flux's 12288->3072)
    N, K = 3072, 12288
    C = copies_for(2 * N * K)
    ws = [(torch.randn(N, K, device=DEV) * 0.02).to(torch.bfloat16) for _ in range(C)]
    for cb in ("nf4", "fp4"):
        nbytes = 2 * N * K + N * K // 2 + 4 * (N * K // 64)
        # _quantize_4bit checks finite absmax on the GPU: time the kernel path without that sync
        ms = time_graph(lambda i: _quant4_kernel_only(ws[i], cb), C, 20)
        rows.append(dict(op="quantize", layout=cb, K=K, N=N, ms=ms, bytes=nbytes, floor_ms=nbytes / bw / 1e6))
    for layout, g in (("int8_block", 128), ("int8_lode", 128), ("int8_row", None)):
        nbytes = 3 * N * K
        ms = time_graph(lambda i: _quant8_kernel_only(ws[i], layout, g), C, 20)
        rows.append(dict(op="quantize", layout=layout, K=K, N=N, ms=ms, bytes=nbytes, floor_ms=nbytes / bw / 1e6))


def _quant4_kernel_only(x, cb):
    from comfy_quant_native import layouts as L

    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(math.ceil(n / 64), dtype=torch.float32, device=x.device)
    ops._native(ops._C.quantize_4bit, x, x.data_ptr(), L.DTYPE_CODES[x.dtype], packed.data_ptr(), absmax.data_ptr(),
                n, 64, L.CODEBOOK_CODES[cb])
    return packed


def _quant8_kernel_only(x, layout, g):
    from comfy_quant_native import layouts as L

    N, K = x.shape
    gs = L.check_group_size(layout, g, K)
    gn, gk = L.int8_tile(layout, gs, K)
    return ops._quantize_int8_tiles(x, gn, gk, "x")  # no finite-scale check ("x")


def bench_linear(rows: list[dict], shapes, tokens, have_bnb: bool) -> None:
    for K, N in shapes:
        w = (torch.randn(N, K, device=DEV) * 0.02).to(torch.bfloat16)
        bias = None
        p, a = ops.quantize_4bit(w, "nf4", 64)
        int8 = {lay: ops.quantize_int8(w, lay, g) for lay, g in
                (("int8_row", None), ("int8_lode", 128), ("int8_block", 128))}
        groups = {"int8_row": None, "int8_lode": 128, "int8_block": 128}
        if have_bnb:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bf

            bp, bstate = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        for M in tokens:
            x = (torch.randn(M, K, device=DEV)).to(torch.bfloat16)
            reps = 50 if M <= 16 else (20 if M <= 256 else 10)

            calls = []  # (method, fn(i), copies), timed below

            def add(method, fn, t, nbytes=None):
                cs = rotated_copies(t, nbytes)
                calls.append((method, lambda i, fn=fn, cs=cs: fn(cs[i]), len(cs)))

            add("bf16", lambda wi: F.linear(x, wi, bias), w)
            if M >= 256:  # the same bf16 weight every call (partly L2-resident, as ours' fresh one)
                calls.append(("bf16 one weight", lambda i: F.linear(x, w, bias), 1))
            add("ours nf4", lambda pi: ops.linear_4bit(x, pi, a, "nf4", 64, (N, K), bias), p,
                p.numel() + 4 * a.numel())
            add("eager nf4", lambda pi: F.linear(x, reference.dequantize_4bit(pi, a, "nf4", 64, (N, K),
                                                                             torch.bfloat16), bias), p)
            if have_bnb:
                add("bnb nf4", lambda pi: bnb.matmul_4bit(x, pi.t(), bstate), bp)
            for lay, (q, s) in int8.items():  # (timed after the loop: bind lay and s now)
                add(f"ours {lay}", lambda qi, s=s, lay=lay: ops.linear_int8(x, qi, s, lay, groups[lay], bias), q)
            if M > 16:
                xq, _ = ops.quantize_int8_act(x, K)
                q = int8["int8_row"][0]
                add("int_mm", lambda qi: torch._int_mm(xq, qi.t()), q)
            if M >= 256:
                add("ours nf4 dequant only", lambda pi: ops.dequantize_4bit(pi, a, "nf4", 64, (N, K),
                                                                            torch.bfloat16), p)
            if M >= 256:  # compute-bound: in turns (time_graphs_interleaved)
                times = time_graphs_interleaved([(fn, n) for _, fn, n in calls], reps)
            else:
                times = [time_graph(fn, n, reps) for _, fn, n in calls]
            for (method, _, _), ms in zip(calls, times):
                rows.append(dict(op="linear", K=K, N=N, M=M, method=method, ms=ms))
            del x, calls


@contextlib.contextmanager
def kernel_variants(**knobs):
    """Forces CUDA kernel knobs (ops.CUDA_KNOBS) for the block, then restores them."""
    before = {k: ops.cuda_kernel_variant(k, v) for k, v in knobs.items()}
    try:
        yield
    finally:
        for k, v in before.items():
            ops.cuda_kernel_variant(k, v)


def gemm_alone(xq, xs, s, N: int, gn: int, gk: int):
    """The int8 GEMM of ops.linear_int8 without its activation quantize: qi -> y [M, N]
    bf16 from ready xq [M, K] / xs and the weight's scales s (with the K-split workspace
    ops.linear_int8 would pass)."""
    from comfy_quant_native import layouts as L

    M, K = xq.shape

    def gemm(qi):
        y = torch.empty(M, N, dtype=torch.bfloat16, device=DEV)
        work = ops.gemm_int8_workspace(y.device, M)
        ops._native(ops._C.gemm_int8, y, xq.data_ptr(), xs.data_ptr(), qi.data_ptr(), s.data_ptr(), 0, y.data_ptr(),
                    L.DTYPE_CODES[torch.bfloat16], M, N, K, xs.shape[1], gn, gk,
                    optional=ops.gemm_int8_workspace_args(work))
        return y

    return gemm


def bench_skinny_4bit(rows: list[dict], K: int, N: int, ps: list, a, M: int) -> None:
    """The two small-M 4-bit kernels forced in turn (streamed: sm_90 only), each also on one
    weight reused every call (served from L2: what is left when DRAM is not the limit)."""
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    C = len(ps)
    for name, path, tokens in (("streamed", 3, 0), ("streamed, tokens staged", 3, 1),
                               ("streamed, tokens in registers", 3, 2), ("staged", 2, 0)):
        try:
            with kernel_variants(linear_4bit=path, stream_xreg=tokens):
                ms = time_graph(lambda i: ops.linear_4bit(x, ps[i], a, "nf4", 64, (N, K)), C, 50)
                l2 = time_graph(lambda i: ops.linear_4bit(x, ps[0], a, "nf4", 64, (N, K)), 1, 50)
        except NotImplementedError:
            continue  # streamed: this card or these tokens
        rows.append(dict(op="variant", K=K, N=N, M=M, method=f"nf4 skinny {name}", ms=ms))
        rows.append(dict(op="variant", K=K, N=N, M=M, method=f"nf4 skinny {name}, one weight (L2)", ms=l2))
    if M == 1 and torch.cuda.get_device_capability()[0] >= 9:
        for stages in (2, 4):  # the streamed kernel's ring, shallower than its default (up to 8)
            with kernel_variants(linear_4bit=3, stream_stages=stages):
                ms = time_graph(lambda i: ops.linear_4bit(x, ps[i], a, "nf4", 64, (N, K)), C, 50)
            rows.append(dict(op="variant", K=K, N=N, M=M, method=f"nf4 skinny streamed, {stages} stages", ms=ms))
        # probes (wrong results): the stream alone (no decode or MMA) with absmax, from DRAM and
        # from L2, and weights only; the decode and MMAs alone (no loads)
        for probe, what, copies in ((1, "weights + absmax", C), (1, "weights + absmax, one weight (L2)", 1),
                                    (2, "weights only", C), (3, "compute alone", C)):
            with kernel_variants(linear_4bit=3, skinny_probe=probe):
                ms = time_graph(lambda i: ops.linear_4bit(x, ps[i], a, "nf4", 64, (N, K)), copies, 50)
            rows.append(dict(op="variant", K=K, N=N, M=M, method=f"nf4 skinny streamed probe: {what}", ms=ms))


def bench_variants(rows: list[dict], only_4bit: bool = False) -> None:
    """Kernel variants, forced: the small-M 4-bit kernels (tile / split of the staged one),
    int8 GEMM paths."""
    for K, N in SHAPES:
        w = (torch.randn(N, K, device=DEV) * 0.02).to(torch.bfloat16)
        p, a = ops.quantize_4bit(w, "nf4", 64)
        ps = rotated_copies(p)
        C = len(ps)
        for M in (1, 16):
            bench_skinny_4bit(rows, K, N, ps, a, M)
            if only_4bit:
                continue
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
            for tile in (1, 2, 4):
                for split in (0, 1, 2, 4, 8):
                    with kernel_variants(linear_4bit=2, skinny_tile=tile, split_k=split):
                        ms = time_graph(lambda i: ops.linear_4bit(x, ps[i], a, "nf4", 64, (N, K)), C, 50)
                    rows.append(dict(op="variant", K=K, N=N, M=M,
                                     method=f"nf4 skinny staged NT={tile} S={split or 'auto'}", ms=ms))
            # where the time goes: loads alone (probe: no decode, no MMA; wrong results) and
            # one weight reused every call (served from L2, no DRAM)
            with kernel_variants(linear_4bit=2, skinny_probe=1):
                ms = time_graph(lambda i: ops.linear_4bit(x, ps[i], a, "nf4", 64, (N, K)), C, 50)
            rows.append(dict(op="variant", K=K, N=N, M=M, method="nf4 skinny staged probe: loads only", ms=ms))
            ms = time_graph(lambda i: ops.linear_4bit(x, ps[0], a, "nf4", 64, (N, K)), 1, 50)
            rows.append(dict(op="variant", K=K, N=N, M=M, method="nf4 skinny one weight (L2)", ms=ms))
        if only_4bit:
            continue
        x = torch.randn(4608, K, device=DEV, dtype=torch.bfloat16)
        for lay, g in (("int8_row", None), ("int8_lode", 128), ("int8_block", 128)):
            q, s = ops.quantize_int8(w, lay, g)
            xq, xs = ops.quantize_int8_act(x, 128 if lay == "int8_block" else K)
            paths = (("mma80", 3), ("sm90", 4), ("sm90 multicast", 5))
            if "gemm_int8=" in os.environ.get("COMFY_QUANT_CUDA_VARIANTS", ""):
                paths = paths[:1]  # the wgmma kernel was switched off for this run
            for name, path in paths:
                from comfy_quant_native import layouts as L

                gs = L.check_group_size(lay, g, K)
                gemm = gemm_alone(xq, xs, s, N, *L.int8_tile(lay, gs, K))
                qs = [q, q.clone()]
                with kernel_variants(gemm_int8=path):
                    ms = time_graph(lambda i: gemm(qs[i]), 2, 10)
                tops = 2 * 4608 * N * K / (ms * 1e-3) / 1e12
                rows.append(dict(op="variant", K=K, N=N, M=4608, method=f"gemm {lay} {name} ({tops:.0f} TOPS)", ms=ms))


# ----------------------------------------------------------------------------- report
# dense tensor-core operations a clock an SM (an FMA is 2): (bf16 -> f32, int8 -> s32)
MMA_OPS_PER_CLOCK = {(8, 0): (2048, 4096), (9, 0): (4096, 8192)}


def mma_peaks() -> dict | None:
    """{"bf16": ops/s, "int8": ops/s} at the highest SM clock nvidia-smi reports (the clock
    under load is lower, so the floor is a lower bound), or None on other cards."""
    props = torch.cuda.get_device_properties(0)
    per_clock = MMA_OPS_PER_CLOCK.get((props.major, props.minor))
    if per_clock is None:
        return None
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout
        hz = float(out.split()[0]) * 1e6
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None
    sms = props.multi_processor_count
    return {"bf16": per_clock[0] * sms * hz, "int8": per_clock[1] * sms * hz}


def nf4_linear_bytes(M: int, K: int, N: int, group: int = 64) -> int:
    """Bytes an nf4 linear must move: packed weight, float32 absmax, bf16 x and y."""
    return N * K // 2 + 4 * (N * K // group) + 2 * M * K + 2 * M * N


def print_tables(rows, bw, header, peaks: dict | None = None):
    print(header)
    print(f"copy bandwidth (read + write): {bw:.0f} GB/s")
    if peaks:
        print(f"tensor-core dense peak at the highest SM clock: bf16 {peaks['bf16'] / 1e12:.0f} TFLOPS, "
              f"int8 {peaks['int8'] / 1e12:.0f} TOPS")
    print("\n## dequantize / quantize (bf16), vs copy bandwidth")
    print("| op | layout | N x K | ms | GB/s | % copy BW | floor ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["op"] in ("dequantize", "quantize"):
            gbs = r["bytes"] / (abs(r["ms"]) * 1e-3) / 1e9
            print(f"| {r['op']} | {r['layout']} | {r['N']}x{r['K']} | {r['ms']:.4f} | {gbs:.0f} | {100 * gbs / bw:.0f}% "
                  f"| {r['floor_ms']:.4f} |")
    lin = [r for r in rows if r["op"] == "linear"]
    methods = []
    for r in lin:
        if r["method"] not in methods:
            methods.append(r["method"])
    if any(r["M"] <= 16 for r in lin) and "ours nf4" in methods:
        lin = lin + [dict(r, method="nf4 floor", ms=nf4_linear_bytes(r["M"], r["K"], r["N"]) / (bw * 1e9) * 1e3)
                     for r in lin if r["method"] == "ours nf4" and r["M"] <= 16]
        methods.append("nf4 floor")
    if peaks and any(r["M"] >= 256 for r in lin):
        for kind in ("bf16", "int8"):
            name = f"{kind} MMA floor"
            lin = lin + [dict(r, method=name, ms=2 * r["M"] * r["N"] * r["K"] / peaks[kind] * 1e3)
                         for r in lin if r["method"] == "bf16" and r["M"] >= 256]
            methods.append(name)
    print("\n## linear: ms (ratio to bf16 cuBLAS, same run); negative ms = eager timing (capture failed)")
    print("| K, N | M | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for K, N in SHAPES:
        for M in TOKENS:
            sel = {r["method"]: r["ms"] for r in lin if r["K"] == K and r["N"] == N and r["M"] == M}
            if not sel:
                continue
            base = sel.get("bf16")
            cells = []
            for m in methods:
                if m not in sel:
                    cells.append("")
                elif m == "bf16":
                    cells.append(f"{sel[m]:.4f}")
                else:
                    cells.append(f"{sel[m]:.4f} ({abs(sel[m]) / base:.2f}x)")
            print(f"| {K}, {N} | {M} | " + " | ".join(cells) + " |")
    var = [r for r in rows if r["op"] == "variant"]
    if var:
        print("\n## variants")
        for r in var:
            print(f"K={r['K']} N={r['N']} M={r['M']} {r['method']}: {r['ms']:.4f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one shape")
    ap.add_argument("--variants", action="store_true", help="also time forced kernel variants")
    ap.add_argument("--variants-4bit", action="store_true", help="only the small-M 4-bit kernels, forced in turn")
    ap.add_argument("--json", help="write all rows here")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="M values, e.g. 1,16")
    ap.add_argument("--linear-only", action="store_true", help="skip the dequantize/quantize rows")
    ap.add_argument("--quant-only", action="store_true", help="only the dequantize/quantize rows")
    args = ap.parse_args()
    backends = ops.list_backends()
    if backends["cuda"] is not None:
        sys.exit(f"CUDA backend unavailable: {backends['cuda']}")
    props = torch.cuda.get_device_properties(0)
    header = (f"# {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), torch {torch.__version__}, "
              f"{datetime.date.today().isoformat()}")
    bad = check_correctness()
    print("correctness:", "PASS" if not bad else "FAIL: " + "; ".join(bad), flush=True)
    try:
        import bitsandbytes  # noqa: F401

        have_bnb = True
    except Exception as e:  # noqa: BLE001
        print(f"bitsandbytes unavailable ({e}); its column is left out")
        have_bnb = False
    bw = copy_bandwidth()
    shapes = SHAPES[1:2] if args.quick else SHAPES
    rows: list[dict] = []
    if not args.linear_only:
        bench_dequant_quant(bw, rows, shapes)
        print("dequant/quant done", flush=True)
    if not args.quant_only:
        bench_linear(rows, shapes, [int(t) for t in args.tokens.split(",")], have_bnb)
        print("linear done", flush=True)
    if args.variants or args.variants_4bit:
        bench_variants(rows, only_4bit=args.variants_4bit)
    peaks = mma_peaks()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, bw=bw, peaks=peaks, rows=rows, correctness=bad),
                                              indent=1))
    print_tables(rows, bw, header, peaks)
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
