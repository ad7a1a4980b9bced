"""int8 layouts (int8_block, int8_lode, int8_row): every native CPU level against the
plain-PyTorch reference (comfy_quant_native.reference).

Quantize, dequantize, activation quantization and the W8A8 linear are bit-exact: the C
kernels do the reference's float32 operations in the same order (the int32 dots are
exact). The weight-only linear sums in another order and is held to a rigorous float32
error bound (see ``weight_only_bound``).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from comfy_quant_native import layouts as L
from comfy_quant_native import ops, reference

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INT8 = L.INT8
U = 2.0**-24  # float32 unit roundoff


# ----------------------------------------------------------------------------- helpers
def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern, so that equality is exact (-0.0 != 0.0, NaN == NaN)."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return t.contiguous().view(view[t.dtype]) if t.dtype in view else t


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str, any_nan: bool = False) -> None:
    """Bit equality; with any_nan, a NaN matches any NaN (torch itself writes float32 NaN
    as bf16 0x7fc0 in scalar code and 0xffff in vector code)."""
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    diff = bits(got) != bits(want)
    if any_nan and got.is_floating_point():
        diff &= ~(got.isnan() & want.isnan())
    if bool(diff.any()):
        idx = tuple(int(i) for i in diff.nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())} elements differ, first at {idx}: {got[idx]} vs {want[idx]}")


def group_of(layout: str, g: int | None) -> int | None:
    return None if layout == "int8_row" else g


def weight(N: int, K: int, dtype, kind: str = "randn") -> torch.Tensor:
    """Awkward test weights: random with a spread of magnitudes, zeros, constant rows, an outlier."""
    w = torch.randn(N, K) * torch.exp(torch.randn(N, 1))
    if kind == "zeros":
        w = torch.zeros(N, K)
    elif kind == "const":
        w = torch.full((N, K), -0.75)
        w[N // 2:] = 3.0
    elif kind == "outlier":
        big = {torch.float32: 3e38, torch.bfloat16: 3e38, torch.float16: 65504.0}[dtype]
        w[N // 2, K // 2] = -big
    elif kind == "ties":
        # amax 127 in every row -> scale exactly 1.0, so x/scale lands on .5 ties
        w = torch.arange(N * K, dtype=torch.float32).reshape(N, K) % 9 - 4.5
        w[:, 0] = 127.0
    elif kind == "tiny":  # scale underflows to a subnormal or to zero
        w = torch.randn(N, K) * 1e-40
        w[0] = 1e-45
    return w.to(dtype)


def ref_quantize(w, layout, g):
    with ops.use_backend("reference"):
        return ops.quantize_int8(w, layout, g)


# Shapes: 1x1, one row, K = 1, K and N off the vector width and off the group.
SHAPES = [(1, 1), (7, 65), (1, 300), (5, 1), (3, 33), (33, 257), (65, 130), (129, 95)]
GROUPS = [32, 64, 128, 256, 512]


# ----------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", INT8)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_bit_exact(cpu_level, layout, shape, dtype):
    for g in ([None] if layout == "int8_row" else [32, 128]):
        w = weight(*shape, dtype)
        q, s = ops.quantize_int8(w, layout, g)
        qr, sr = ref_quantize(w, layout, g)
        assert q.dtype == torch.int8 and s.shape == L.scale_shape(layout, g, *shape)
        assert_same_bits(q, qr, f"{cpu_level} {layout} g={g} q")
        assert_same_bits(s, sr, f"{cpu_level} {layout} g={g} scale")


@pytest.mark.parametrize("layout", ["int8_block", "int8_lode"])
@pytest.mark.parametrize("g", GROUPS)
def test_quantize_group_edges(cpu_level, layout, g):
    # K and N at the group size and one either side: partial tiles on both axes.
    for N, K in [(g + 1, g - 1), (g - 1, g + 1), (2, g)] if layout == "int8_block" else [(3, g - 1), (2, g + 1), (1, 2 * g)]:
        for dtype in FLOATS:
            w = weight(N, K, dtype)
            q, s = ops.quantize_int8(w, layout, g)
            qr, sr = ref_quantize(w, layout, g)
            assert_same_bits(q, qr, f"{layout} g={g} {N}x{K} {dtype} q")
            assert_same_bits(s, sr, f"{layout} g={g} {N}x{K} {dtype} scale")


@pytest.mark.parametrize("kind", ["zeros", "const", "outlier", "ties", "tiny"])
@pytest.mark.parametrize("layout", INT8)
def test_quantize_special_values(cpu_level, layout, kind):
    g = group_of(layout, 32)
    for dtype in FLOATS:
        if kind == "tiny" and dtype == torch.float16:
            continue  # 1e-40 is zero in float16: same as "zeros"
        w = weight(40, 70, dtype, kind)
        q, s = ops.quantize_int8(w, layout, g)
        qr, sr = ref_quantize(w, layout, g)
        assert_same_bits(q, qr, f"{kind} {dtype} q")
        assert_same_bits(s, sr, f"{kind} {dtype} scale")
        assert int(q.abs().max()) <= 127
        if kind == "zeros":
            assert not bool(q.any()) and not bool(s.any())
        if kind == "ties":  # round half to even: -4.5 -> -4, -3.5 -> -4, 0.5 -> 0, 1.5 -> 2
            assert s.flatten()[0] == 1.0 or layout == "int8_block"


def test_quantize_ties_round_half_even(cpu_level):
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5] + [0.0] * 9])
    q, s = ops.quantize_int8(w, "int8_row", None)
    assert float(s[0]) == 1.0
    assert q[0, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]


@pytest.mark.parametrize("layout", INT8)
def test_quantize_nonfinite_raises(cpu_level, layout):
    g = group_of(layout, 32)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in FLOATS:
            w = weight(40, 70, dtype)
            w[37, 45] = bad
            with pytest.raises(ValueError, match=r"weight.*NaN or Inf"):
                ops.quantize_int8(w, layout, g)


# ----------------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", INT8)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_bit_exact(cpu_level, layout, shape, out_dtype):
    for g in ([None] if layout == "int8_row" else [32, 64]):
        q, s = reference.quantize_int8(weight(*shape, torch.float32), layout, g)
        y = ops.dequantize_int8(q, s, layout, g, out_dtype)
        with ops.use_backend("reference"):
            yr = ops.dequantize_int8(q, s, layout, g, out_dtype)
        assert_same_bits(y, yr, f"{cpu_level} {layout} g={g} -> {out_dtype}")


def test_dequantize_rounding_edges(cpu_level):
    # Scales chosen so that q * scale hits bf16/f16 rounding ties, overflow, subnormals
    # and NaN (a NaN scale must stay NaN with the reference's quiet bit).
    specials = torch.tensor([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 65520 / 127, 1e-40, 2**-24 / 3, 3e38, float("inf"),
                             float("nan"), -0.0, 6e-8, 1 + 2**-11, 1 + 3 * 2**-11, 2**-14 * (1 - 2**-11), 5.0, 0.1])
    N, K, g = specials.numel(), 64, 32
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    q[:, :4] = torch.tensor([1, -1, 127, -127], dtype=torch.int8)
    s = specials[:, None].repeat(1, 2).contiguous()
    for out in FLOATS:
        y = ops.dequantize_int8(q, s, "int8_lode", g, out)
        yr = reference.dequantize_int8(q, s, "int8_lode", g, out)
        assert_same_bits(y, yr, f"special scales -> {out}", any_nan=True)
        before = ops._C.cpu_level()
        ops._C.set_cpu_level("ref")  # across native levels even NaN bits agree
        try:
            y_c = ops.dequantize_int8(q, s, "int8_lode", g, out)
        finally:
            ops._C.set_cpu_level(before)
        assert_same_bits(y, y_c, f"special scales -> {out} vs C ref")


@pytest.mark.parametrize("layout", ["int8_block", "int8_lode"])
@pytest.mark.parametrize("g", GROUPS)
def test_dequantize_group_edges(cpu_level, layout, g):
    for N, K in [(g + 1, g - 1), (1, g + 1), (3, 2 * g)]:
        q, s = reference.quantize_int8(weight(N, K, torch.float32), layout, g)
        for out in FLOATS:
            assert_same_bits(ops.dequantize_int8(q, s, layout, g, out),
                             reference.dequantize_int8(q, s, layout, g, out), f"{layout} g={g} {N}x{K} {out}")


# ----------------------------------------------------------------------------- direct kernel calls
def _c_quantize(w, gn, gk, nthreads, poison=True):
    N, K = w.shape
    q = torch.full((N, K), 0x55, dtype=torch.int8) if poison else torch.empty(N, K, dtype=torch.int8)
    s = torch.full((math.ceil(N / gn), math.ceil(K / gk)), float("nan"))
    ops._C.quantize_int8(w.data_ptr(), L.DTYPE_CODES[w.dtype], q.data_ptr(), s.data_ptr(), N, K, gn, gk, 0, 0, nthreads)
    return q, s


@pytest.mark.parametrize("gn,gk", [(1, 1), (1, 3), (2, 5), (3, 7), (1, 17), (4, 4), (128, 128), (7, 300)])
def test_kernel_any_tile_and_threads(cpu_level, gn, gk):
    """Poisoned outputs, tile sizes the layouts never use, and thread counts 1..5: the
    chunking must not change a bit."""
    w = weight(37, 301, torch.float32)
    qr, sr = reference.quantize_int8_tiles(w, gn, gk)
    for nthreads in (1, 2, 3, 5):
        q, s = _c_quantize(w, gn, gk, nthreads)
        assert_same_bits(q, qr, f"q gn={gn} gk={gk} threads={nthreads}")
        assert_same_bits(s, sr, f"scale gn={gn} gk={gk} threads={nthreads}")
        for out in FLOATS:
            y = torch.full(w.shape, float("nan"), dtype=out)
            ops._C.dequantize_int8(q.data_ptr(), s.data_ptr(), y.data_ptr(), L.DTYPE_CODES[out], *w.shape, gn, gk,
                                   0, 0, nthreads)
            yr = (q.float() * reference._expand_scale(s, gn, gk, *w.shape)).to(out)
            assert_same_bits(y, yr, f"dequant gn={gn} gk={gk} threads={nthreads} {out}")


def _gemm_ref_exact(xq, xs, wq, ws, bias, gn, gk):
    """The W8A8 contract in plain PyTorch: exact int64 dots per K-group, float32 epilogue in order."""
    M, K = xq.shape
    N = wq.shape[0]
    y = torch.zeros(M, N)
    wsr = ws.repeat_interleave(gn, 0)[:N]
    for g in range(math.ceil(K / gk)):
        ks = slice(g * gk, min(K, (g + 1) * gk))
        dot = (xq[:, ks].long() @ wq[:, ks].long().t())
        dot = ((dot + 2**31) % 2**32 - 2**31).float()  # int32 wrap, as the kernels
        xg = xs[:, g if xs.shape[1] > 1 else 0]
        y += dot * (xg[:, None] * wsr[None, :, g])
    return y + bias if bias is not None else y


@pytest.mark.parametrize("M,N,K,gn,gk", [
    (1, 1, 1, 1, 1), (3, 5, 7, 1, 3), (5, 33, 130, 2, 6), (9, 40, 96, 1, 32), (4, 31, 4, 4, 4),
    (6, 70, 1000, 64, 64), (2, 17, 257, 1, 257), (13, 65, 300, 32, 32), (1, 100, 4097, 1, 4097),
    (70, 33, 8200, 32, 32), (150, 20, 4097, 1, 4097),  # more rows than one L2 chunk of the GEMM
    (1, 40, 1000, 32, 32), (1, 20, 100, 1, 6), (2, 50, 300, 3, 64),  # unpacked small-M path, several groups
])
def test_kernel_gemm_int8_full_range(cpu_level, M, N, K, gn, gk):
    """gemm_int8 with every int8 value, -128 included, odd group widths, xs per token and
    per group, 1..3 threads: bit-exact against the exact contract and the C reference."""
    kb = math.ceil(K / gk)
    xq = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    wq = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    xq[0, : min(K, 64)] = -128
    wq[0, : min(K, 64)] = -128
    ws = torch.rand(math.ceil(N / gn), kb) + 0.01
    bias = torch.randn(N)
    for xg in sorted({1, kb}):
        xs = torch.rand(M, xg) + 0.01
        want = _gemm_ref_exact(xq, xs, wq, ws, bias, gn, gk)
        for nthreads in (1, 3):
            y = torch.full((M, N), float("nan"))
            ops._C.gemm_int8(xq.data_ptr(), xs.data_ptr(), wq.data_ptr(), ws.data_ptr(), bias.data_ptr(), y.data_ptr(),
                             0, M, N, K, xg, gn, gk, 0, 0, nthreads)
            assert_same_bits(y, want, f"gemm xs_groups={xg} threads={nthreads}")


def test_kernel_gemm_int32_wraps_like_reference(cpu_level):
    # K = 140000 with every value -128: the true dot 2^14 * K exceeds int32, and every
    # level must wrap it as the reference's int32 accumulator does.
    M, N, K = 2, 3, 140000
    xq = torch.full((M, K), -128, dtype=torch.int8)
    wq = torch.full((N, K), -128, dtype=torch.int8)
    xs, ws = torch.ones(M, 1), torch.ones(N, 1)
    y = torch.empty(M, N)
    ops._C.gemm_int8(xq.data_ptr(), xs.data_ptr(), wq.data_ptr(), ws.data_ptr(), 0, y.data_ptr(), 0, M, N, K, 1, 1, K,
                     0, 0, 2)
    assert_same_bits(y, _gemm_ref_exact(xq, xs, wq, ws, None, 1, K), "wrapped dot")


def weight_only_bound(x2, w):
    """Rigorous float32 bound on |y - exact| for any summation order with or without FMA:
    (K + 2) u sum_k |x_k w_k| (K - 1 roundings of the sum, two of the products and scales),
    plus the reference's own error, hence twice that for the difference of the two."""
    K = x2.shape[-1]
    return 2 * (K + 2) * U * (x2.double().abs() @ w.double().abs().t())


def _c_linear(x, q, s, layout, g, bias, nthreads=2):
    M, K = x.shape
    N = q.shape[0]
    gn, gk = L.int8_tile(layout, g, K)
    y = torch.full((M, N), float("nan"))
    ops._C.linear_int8(x.data_ptr(), 0, q.data_ptr(), s.data_ptr(), 0 if bias is None else bias.data_ptr(),
                       y.data_ptr(), M, N, K, gn, gk, 0, 0, nthreads)
    return y


@pytest.mark.parametrize("layout", INT8)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 17])
def test_kernel_linear_int8_bound(cpu_level, layout, M):
    """The fused weight-only kernel at every M (ops.py uses it only up to ops.fused_max_m)."""
    for N, K in [(1, 1), (7, 65), (37, 300), (64, 1031)]:
        g = group_of(layout, 32)
        q, s = reference.quantize_int8(weight(N, K, torch.float32), layout, g)
        x = torch.randn(M, K)
        bias = torch.randn(N)
        w = reference.dequantize_int8(q, s, layout, g, torch.float32)
        for b in (None, bias):
            y = _c_linear(x, q, s, layout, g, b)
            exact = x.double() @ w.double().t() + (0 if b is None else b.double())
            bound = weight_only_bound(x, w) + (0 if b is None else U * exact.abs())
            assert bool(((y.double() - exact).abs() <= bound).all()), f"{layout} M={M} {N}x{K}"


# ----------------------------------------------------------------------------- linear through ops
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", INT8)
def test_linear_w8a8_bit_exact(cpu_level, layout, dtype):
    """W8A8 (act_quant=True): native == reference bit for bit, since the kernels keep the
    reference's arithmetic (exact int32 dots, float32 epilogue in group order)."""
    for (N, K), g, lead in [((33, 257), 32, (1,)), ((65, 130), 64, (3, 5)), ((7, 1), 32, (2,)), ((40, 512), 128, (17,))]:
        g = group_of(layout, g)
        q, s = reference.quantize_int8(weight(N, K, torch.float32), layout, g)
        x = torch.randn(*lead, K).to(dtype)
        for bias in (None, torch.randn(N).to(dtype)):
            y = ops.linear_int8(x, q, s, layout, g, bias, act_quant=True)
            with ops.use_backend("reference"):
                yr = ops.linear_int8(x, q, s, layout, g, bias, act_quant=True)
            assert y.shape == (*lead, N) and y.dtype == dtype
            assert_same_bits(y, yr, f"W8A8 {layout} {N}x{K} lead={lead} bias={bias is not None}")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", INT8)
def test_linear_weight_only(cpu_level, layout, dtype):
    """Weight-only (act_quant=False) against the reference within the float32 bound of
    weight_only_bound, plus one ulp of the output dtype. Above FUSED_MAX_M_INT8 rows
    ops.py dequantizes to x's dtype for torch's GEMM, which rounds each weight once more
    (relative eps/2), hence eps * |x| @ |w| more on that path."""
    # machine epsilon: both sides round to dtype once and may land one ulp apart
    eps = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    tiny = 2.0**-24 if dtype == torch.float16 else 0.0  # float16 subnormal spacing
    fused_max = ops.FUSED_MAX_M_INT8["cpu"][dtype]
    for (N, K), g, lead in [((33, 257), 32, (1,)), ((65, 130), 64, (3, 2)), ((7, 1), 32, (2,)), ((40, 512), 128, (70,)),
                            ((9, 300), 32, (fused_max,)), ((9, 300), 32, (fused_max + 1,))]:
        g = group_of(layout, g)
        q, s = reference.quantize_int8(weight(N, K, torch.float32), layout, g)
        x = torch.randn(*lead, K).to(dtype)
        bias = torch.randn(N).to(dtype)
        y = ops.linear_int8(x, q, s, layout, g, bias, act_quant=False)
        with ops.use_backend("reference"):
            yr = ops.linear_int8(x, q, s, layout, g, bias, act_quant=False)
        assert y.shape == (*lead, N) and y.dtype == dtype
        x2 = x.reshape(-1, K).float()
        w = reference.dequantize_int8(q, s, layout, g, torch.float32)
        bound = weight_only_bound(x2, w) + 2 * U * (x2.double() @ w.double().t() + bias.double()).abs()
        bound = bound + eps * yr.reshape(-1, N).double().abs() + tiny
        if x2.shape[0] > fused_max:
            bound = bound + eps * (x2.double().abs() @ w.double().abs().t())
        diff = (y.reshape(-1, N).double() - yr.reshape(-1, N).double()).abs()
        assert bool((diff <= bound).all()), f"{layout} {N}x{K} lead={lead}: max excess {(diff - bound).max()}"


def test_linear_noncontiguous_and_empty(cpu_level):
    N, K = 24, 96
    q, s = reference.quantize_int8(weight(N, K, torch.float32), "int8_lode", 32)
    big = torch.randn(5, 2 * K)
    x = big[:, ::2]  # strided view
    w = reference.dequantize_int8(q, s, "int8_lode", 32, torch.float32)
    for act in (True, False):
        y = ops.linear_int8(x, q, s, "int8_lode", 32, None, act)
        with ops.use_backend("reference"):
            yr = ops.linear_int8(x.contiguous(), q, s, "int8_lode", 32, None, act)
        if act:
            assert_same_bits(y, yr, "W8A8 of a strided x")
        else:
            assert bool(((y.double() - yr.double()).abs() <= weight_only_bound(x, w)).all())
        assert ops.linear_int8(torch.randn(0, K), q, s, "int8_lode", 32, None, act).shape == (0, N)


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_quantize_int8_act(cpu_level, dtype):
    for M, K, group_k in [(1, 1, 1), (1, 300, 300), (7, 65, 32), (16, 257, 128), (5, 100, 7)]:
        x = (torch.randn(M, K) * 4).to(dtype)
        xq, xs = ops.quantize_int8_act(x, group_k)
        xqr, xsr = reference.quantize_int8_act(x, group_k)
        assert xs.shape == (M, math.ceil(K / group_k))
        assert_same_bits(xq, xqr, f"act q {M}x{K}/{group_k}")
        assert_same_bits(xs, xsr, f"act scale {M}x{K}/{group_k}")
    q0, s0 = ops.quantize_int8_act(torch.randn(0, 64).to(dtype), 32)
    assert q0.shape == (0, 64) and s0.shape == (0, 2)
    with pytest.raises(ValueError, match="group_k"):
        ops.quantize_int8_act(torch.randn(2, 8), 0)
    bad = torch.randn(3, 40)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"x .*NaN or Inf"):
        ops.quantize_int8_act(bad, 8)


# ----------------------------------------------------------------------------- round trip
@settings(max_examples=60, deadline=None)
@given(
    N=st.integers(1, 40),
    K=st.integers(1, 140),
    layout=st.sampled_from(INT8),
    g=st.sampled_from([32, 64, 128]),
    log_scale=st.floats(-30, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_bound(N, K, layout, g, log_scale, seed):
    """|dequant(quant(w)) - w| <= scale/2 per element (plus float32 rounding of x/scale
    and q*scale), for every native level, in any magnitude range."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * math.exp(log_scale)
    g = group_of(layout, g)
    gn, gk = L.int8_tile(layout, g, K)
    for level in (ops._C.cpu_levels() if ops._C is not None else []) + ["reference"]:
        if level == "reference":
            q, s = reference.quantize_int8(w, layout, g)
            y = reference.dequantize_int8(q, s, layout, g, torch.float32)
        else:
            before = ops._C.cpu_level()
            ops._C.set_cpu_level(level)
            try:
                q, s = ops.quantize_int8(w, layout, g)
                y = ops.dequantize_int8(q, s, layout, g, torch.float32)
            finally:
                ops._C.set_cpu_level(before)
        se = reference._expand_scale(s, gn, gk, N, K).double()
        err = (y.double() - w.double()).abs()
        bound = se * (0.5 + 2**-20) + w.double().abs() * 2**-22 + 2.0**-149
        assert bool((err <= bound).all()), f"{level}: max excess {(err - bound).max()}"
        assert int(q.abs().max()) <= 127
