"""The AVX512-BF16 4-bit linear for bfloat16 activations (level avx512bf16,
csrc/cpu/nf4_fp4_bf16.c) against reference.py: weights rounded to bf16 as dequantize
writes them, float32 sums, y rounded once to bf16. Awkward shapes (one row, odd N and K,
groups straddling rows, partial last groups, K < group, panel and k-block tails), both
kernel shapes (streaming GEMV for few rows, decoded panels for more), bias or none,
nf4 and fp4; the level and the routing of ops.linear_4bit; chunking-independence."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from comfy_quant_native import layouts as L
from comfy_quant_native import ops, reference

C = ops._C
BF16 = L.DTYPE_CODES[torch.bfloat16]
F32 = L.DTYPE_CODES[torch.float32]
CODEBOOKS = ("nf4", "fp4")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def bf16_kernel_reason() -> str | None:
    """Why this machine cannot run the bf16 kernel (None: it can)."""
    if C is None:
        return "native extension not built"
    if "avx512bf16" not in C.cpu_levels():
        return f"CPU level avx512bf16 not supported here (AVX512-BF16 + VBMI + VNNI); levels: {C.cpu_levels()}"
    return None


needs_bf16 = pytest.mark.skipif(bf16_kernel_reason() is not None, reason=str(bf16_kernel_reason()))


@pytest.fixture
def bf16_level():
    """Runs the test at level avx512bf16 (whatever COMFY_QUANT_CPU chose), then restores."""
    before = C.cpu_level()
    C.set_cpu_level("avx512bf16")
    yield
    C.set_cpu_level(before)


# ----------------------------------------------------------------------------- the level
@pytest.mark.skipif(C is None, reason="native extension not built")
def test_level_follows_cpu_features():
    """avx512bf16 is offered exactly where the CPU has AVX512-BF16, VBMI and VNNI (AVX-512
    base included), and only that level serves linear_4bit_bf16."""
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare the detection with")
    want = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi"} <= flags
    assert ("avx512bf16" in C.cpu_levels()) == want, (sorted(flags & {"avx512_bf16", "avx512vbmi"}), C.cpu_levels())
    before = C.cpu_level()
    try:
        for level in C.cpu_levels():
            C.set_cpu_level(level)
            served = C.cpu_kernels()["linear_4bit_bf16"]
            assert served == ("avx512bf16" if level == "avx512bf16" else None), (level, served)
            assert ops.cpu_bf16_linear() == (level == "avx512bf16")
            assert C.cpu_kernels()["linear_4bit"] in ("ref", "avx2", "avx512")
    finally:
        C.set_cpu_level(before)


@needs_bf16
def test_default_level_takes_bf16_path():
    """Without COMFY_QUANT_CPU the module picks the highest level, so bf16 x takes the bf16
    kernel; the fused threshold for bf16 is then the avx512bf16 one."""
    import os

    if os.environ.get("COMFY_QUANT_CPU"):
        pytest.skip(f"COMFY_QUANT_CPU={os.environ['COMFY_QUANT_CPU']} forces the level")
    assert C.cpu_level() == "avx512bf16"
    assert C.cpu_kernels()["linear_4bit_bf16"] == "avx512bf16" and ops.cpu_bf16_linear()
    assert ops.fused_max_m("nf4", "cpu", torch.bfloat16) == ops.FUSED_MAX_M_4BIT["cpu_avx512bf16"][torch.bfloat16]
    assert ops.fused_max_m("nf4", "cpu", torch.float32) == ops.FUSED_MAX_M_4BIT["cpu"][torch.float32]


# ----------------------------------------------------------------------------- helpers
def want_bf16(x, packed, absmax, codebook, group, N, K, bias):
    """Reference: dequantize to bf16 (reference.py), F.linear in float32, + float32 bias."""
    wd = reference.dequantize_4bit(packed, absmax, codebook, group, (N, K), torch.bfloat16).float()
    return F.linear(x.float(), wd, None if bias is None else bias.float()), wd


def kernel(x, packed, absmax, codebook, group, N, K, bias, nthreads=2, poison=True):
    """_C.linear_4bit on bf16 x into a NaN-poisoned bf16 y."""
    M = x.shape[0]
    y = torch.full((M, N), float("nan") if poison else 0.0, dtype=torch.bfloat16)
    b = None if bias is None else bias.float().contiguous()
    C.linear_4bit(x.data_ptr(), BF16, packed.data_ptr(), absmax.data_ptr(), 0 if b is None else b.data_ptr(),
                  y.data_ptr(), M, N, K, group, L.CODEBOOK_CODES[codebook], 0, 0, nthreads)
    return y


def check_close(y, want, x, wd, bias, what):
    """|y - want| <= half a bf16 ulp of the result (2^-8 relative) + float32 summation
    error (as tests/test_nf4_fp4.py's linear_tolerance) on the sum of |x| |w| (+ |bias|)."""
    assert y.dtype == torch.bfloat16 and not bool(torch.isnan(y).any()), f"{what}: NaN left in y"
    mag = x.float().abs() @ wd.abs().t()
    if bias is not None:
        mag = mag + bias.float().abs()
    tol = want.abs() * 2**-8 + mag * 2e-6 + 1e-6
    err = (y.float() - want).abs()
    bad = err > tol
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        raise AssertionError(f"{what}: {int(bad.sum())} outside tolerance; first at {i}: got "
                             f"{y.reshape(-1)[i].item()} want {want.reshape(-1)[i].item()} tol {tol.reshape(-1)[i].item()}")


# M, N, K, group: M < 8 streams (GEMV; rows of whole 64-blocks where K % 64 == 0 and
# group >= 64, chunk by chunk otherwise), M >= 8 decodes panels of 32 columns x 256 k (GEMM)
CASES = [
    (1, 1, 1, 32), (1, 5, 7, 32), (1, 3, 31, 64), (1, 40, 3072, 64), (1, 7, 4097, 4096),
    (1, 9, 192, 64), (2, 33, 640, 128), (5, 65, 256, 256), (3, 5, 128, 32), (6, 3, 64, 4096),
    (2, 13, 33, 32), (3, 9, 64, 64), (4, 33, 129, 128), (5, 17, 100, 32), (7, 3, 4096, 4096),
    (8, 11, 65, 64), (8, 32, 256, 64), (9, 8, 3071, 64), (12, 31, 257, 32), (13, 33, 511, 256),
    (16, 64, 512, 64), (20, 6, 300, 128), (25, 37, 555, 32), (40, 70, 1000, 4096), (64, 96, 768, 1024),
]


# ----------------------------------------------------------------------------- vs reference
@needs_bf16
@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_matches_reference(bf16_level, codebook):
    for M, N, K, group in CASES:
        w = torch.randn(N, K) * torch.exp2(torch.randint(-3, 4, (N, 1)).float())
        packed, absmax = ops.quantize_4bit(w, codebook, group)
        x = torch.randn(M, K).to(torch.bfloat16)
        for bias in (None, torch.randn(N)):
            want, wd = want_bf16(x, packed, absmax, codebook, group, N, K, bias)
            y = kernel(x, packed, absmax, codebook, group, N, K, bias)
            check_close(y, want, x, wd, bias, f"{codebook} M={M} N={N} K={K} g={group} bias={bias is not None}")


@needs_bf16
@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_exact_sums_are_bit_exact(bf16_level, codebook):
    """Where every float32 sum is exact (x in {-1, 0, 1}, absmax in {1, 2}, bias on a
    1/16 grid, K <= 128: all terms on a grid of 2^-15 below 2^9), y must be the reference's
    bits: this pins down the bf16 rounding of the weights (round(table * absmax), not
    round(table) * absmax) and the one RNE rounding of y."""
    for M, N, K, group in [(1, 37, 128, 32), (1, 37, 128, 64), (3, 5, 127, 64), (5, 9, 128, 128), (8, 33, 97, 32),
                           (13, 40, 128, 128), (30, 3, 65, 64)]:
        n = N * K
        packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8)
        absmax = torch.randint(1, 3, (-(-n // group),)).float()
        x = torch.randint(-1, 2, (M, K)).to(torch.bfloat16)
        for bias in (None, torch.randint(-64, 65, (N,)).float() / 16):
            want, _ = want_bf16(x, packed, absmax, codebook, group, N, K, bias)
            y = kernel(x, packed, absmax, codebook, group, N, K, bias)
            diff = y.view(torch.int16) != want.to(torch.bfloat16).view(torch.int16)
            assert not bool(diff.any()), f"{codebook} M={M} N={N} K={K} g={group}: {int(diff.sum())} differ"
            # the weights really are rounded to bf16: the float32-weight sum differs somewhere
            w32 = reference.dequantize_4bit(packed, absmax, codebook, group, (N, K), torch.float32)
            assert not torch.equal(x.float() @ w32.t(), want if bias is None else want - bias)


@needs_bf16
def test_random_shapes(bf16_level):
    rng = random.Random(torch.initial_seed())
    for _ in range(40):
        M = rng.choice([1, 2, 3, 5, 7, 8, 9, 11, 12, 17, 24, 33])
        N, K = rng.randint(1, 80), rng.randint(1, 700)
        if rng.random() < 0.3:
            K = 64 * rng.randint(1, 12)  # whole 64-blocks
        group, codebook = rng.choice([32, 64, 128, 256, 1024]), rng.choice(CODEBOOKS)
        packed, absmax = ops.quantize_4bit(torch.randn(N, K), codebook, group)
        x = torch.randn(M, K).to(torch.bfloat16)
        bias = torch.randn(N) if rng.random() < 0.5 else None
        want, wd = want_bf16(x, packed, absmax, codebook, group, N, K, bias)
        check_close(kernel(x, packed, absmax, codebook, group, N, K, bias), want, x, wd, bias,
                    f"{codebook} M={M} N={N} K={K} g={group}")


@needs_bf16
def test_threads_never_change_results(bf16_level):
    """Any column chunking gives the same bits (each column's sum order depends on M only)."""
    for M, N, K, group in [(1, 200, 333, 64), (5, 130, 520, 32), (20, 257, 300, 128)]:
        packed, absmax = ops.quantize_4bit(torch.randn(N, K), "nf4", group)
        x = torch.randn(M, K).to(torch.bfloat16)
        bias = torch.randn(N)
        ys = [kernel(x, packed, absmax, "nf4", group, N, K, bias, nthreads=t) for t in (0, 1, 2, 3, 7)]
        for t, y in zip((1, 2, 3, 7), ys[1:]):
            assert torch.equal(y.view(torch.int16), ys[0].view(torch.int16)), f"M={M}: nthreads {t} differs"


# ----------------------------------------------------------------------------- through ops
@needs_bf16
@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_ops_routes_bf16_x_to_bf16_kernel(bf16_level, codebook, monkeypatch):
    """ops.linear_4bit on bf16 x returns the bf16 kernel's bits at level avx512bf16 (any
    leading shape, bias in any float dtype, passed as float32), and the float32 kernel's at
    avx512vnni; float32 x keeps the float32 kernel at both levels."""
    monkeypatch.setitem(ops.FUSED_MAX_M_4BIT, "cpu_avx512bf16", {torch.bfloat16: 1 << 30})
    monkeypatch.setitem(ops.FUSED_MAX_M_4BIT, "cpu", dict.fromkeys(L.FLOAT_DTYPES, 1 << 30))
    N, K, group = 45, 200, 64
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), codebook, group)
    for lead in [(1,), (2, 3), (4, 5)]:
        x = torch.randn(*lead, K).to(torch.bfloat16)
        bias = torch.randn(N, dtype=torch.bfloat16)
        y = ops.linear_4bit(x, packed, absmax, codebook, group, (N, K), bias)
        assert y.shape == (*lead, N) and y.dtype == torch.bfloat16
        direct = kernel(x.reshape(-1, K), packed, absmax, codebook, group, N, K, bias)
        assert torch.equal(y.reshape(-1, N).view(torch.int16), direct.view(torch.int16)), lead
        before = C.cpu_level()
        C.set_cpu_level("avx512vnni")
        try:
            y32 = ops.linear_4bit(x, packed, absmax, codebook, group, (N, K), bias)
        finally:
            C.set_cpu_level(before)
        f32 = torch.empty(x.numel() // K, N)
        xf, bf = x.reshape(-1, K).float(), bias.float()
        C.linear_4bit(xf.data_ptr(), F32, packed.data_ptr(), absmax.data_ptr(), bf.data_ptr(), f32.data_ptr(),
                      xf.shape[0], N, K, group, L.CODEBOOK_CODES[codebook], 0, 0, 2)
        assert torch.equal(y32.reshape(-1, N), f32.to(torch.bfloat16)), lead
    xf = torch.randn(3, K)
    assert ops.linear_4bit(xf, packed, absmax, codebook, group, (N, K)).dtype == torch.float32


@needs_bf16
def test_ops_above_threshold_dequantizes(bf16_level, monkeypatch):
    """Above FUSED_MAX_M_4BIT['cpu_avx512bf16'] bf16 x goes through dequantize + torch GEMM
    and still agrees with the reference (bf16 GEMM: a looser bound)."""
    monkeypatch.setitem(ops.FUSED_MAX_M_4BIT, "cpu_avx512bf16", {torch.bfloat16: 4})
    N, K = 24, 96
    packed, absmax = ops.quantize_4bit(torch.randn(N, K), "nf4", 64)
    x = torch.randn(9, K).to(torch.bfloat16)
    y = ops.linear_4bit(x, packed, absmax, "nf4", 64, (N, K))
    want, wd = want_bf16(x, packed, absmax, "nf4", 64, N, K, None)
    assert bool(((y.float() - want).abs() <= (x.float().abs() @ wd.abs().t()) * 2**-6).all())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.skipif(C is None, reason="native extension not built")
def test_bf16_rejected_below_level():
    """Below avx512bf16 the CPU binding refuses bf16 x with a message naming the level."""
    packed, absmax = ops.quantize_4bit(torch.randn(8, 64), "nf4", 64)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    y = torch.zeros(2, 8, dtype=torch.bfloat16)
    before = C.cpu_level()
    try:
        for level in C.cpu_levels():
            if level == "avx512bf16":
                continue
            C.set_cpu_level(level)
            with pytest.raises(ValueError, match=rf"bfloat16 \(code {BF16}\) at CPU level avx512bf16; got code {BF16} at level {level}"):
                C.linear_4bit(x.data_ptr(), BF16, packed.data_ptr(), absmax.data_ptr(), 0, y.data_ptr(),
                              2, 8, 64, 64, 0, 0, 0, 1)
    finally:
        C.set_cpu_level(before)


@needs_bf16
def test_bf16_kernel_checks_arguments(bf16_level):
    packed, absmax = ops.quantize_4bit(torch.randn(8, 64), "nf4", 64)
    x = torch.zeros(4096, dtype=torch.bfloat16)
    y = torch.zeros(2, 8, dtype=torch.bfloat16)
    f16 = L.DTYPE_CODES[torch.float16]
    with pytest.raises(ValueError, match=r"CPU kernel takes float32 \(code 0\), or bfloat16"):
        C.linear_4bit(x.data_ptr(), f16, packed.data_ptr(), absmax.data_ptr(), 0, y.data_ptr(), 2, 8, 64, 64, 0, 0, 0, 1)
    with pytest.raises(ValueError, match=r"x: pointer .* 2-byte"):
        C.linear_4bit(x.data_ptr() + 1, BF16, packed.data_ptr(), absmax.data_ptr(), 0, y.data_ptr(), 2, 8, 64, 64, 0, 0, 0, 1)
    with pytest.raises(ValueError, match=r"bias: pointer .* 4-byte"):  # the CPU bias is float32
        C.linear_4bit(x.data_ptr(), BF16, packed.data_ptr(), absmax.data_ptr(), x.data_ptr() + 2, y.data_ptr(),
                      2, 8, 64, 64, 0, 0, 0, 1)
    with pytest.raises(ValueError, match=r"group size must be a power of two"):
        C.linear_4bit(x.data_ptr(), BF16, packed.data_ptr(), absmax.data_ptr(), 0, y.data_ptr(), 2, 8, 64, 48, 0, 0, 0, 1)
