"""CUDA kernels (csrc/cuda) against the reference, on fresh random inputs of awkward shapes.

Quantize / dequantize: bit-identical to the CPU reference (and NF4/FP4 dequantize to
bitsandbytes' CUDA kernels where bitsandbytes imports with CUDA). Linear: relative error
against the float32 reference within bf16/f16 rounding. Each kernel path is forced in
turn (ops.cuda_kernel_variant) so that every compiled path is checked, not only the one
the dispatcher picks. Outputs land in memory poisoned with 0xFF bytes first (NaN / -1),
so an element that no thread writes shows up. Skipped without CUDA (conftest.py).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from comfy_quant_native import layouts as L
from comfy_quant_native import ops, reference

pytestmark = pytest.mark.cuda
DEV = "cuda"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def poison():
    """Fill the caching allocator's free memory with 0xFF so torch.empty returns garbage."""
    junk = torch.empty(64 << 20, dtype=torch.uint8, device=DEV)
    junk.fill_(0xFF)
    del junk


@contextlib.contextmanager
def variant(knob: str, value: int):
    before = ops.cuda_kernel_variant(knob, value)
    try:
        yield
    finally:
        ops.cuda_kernel_variant(knob, before)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        view = {4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output (unwritten element?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def tol(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1.5e-2


def weight(N, K, dtype=torch.float32):
    """Random weight with a spread of row scales, a zero row and a constant row."""
    w = torch.randn(N, K) * torch.rand(N, 1).mul(4).exp()
    if N > 2:
        w[1] = 0.0
        w[2] = -1.25
    return w.to(dtype)


# ----------------------------------------------------------------------------- 4-bit
SHAPES_4BIT = [(1, 1), (1, 7), (3, 21), (63, 1), (65, 1), (1, 4096 + 33), (5, 129), (32, 96), (7, 1000),
               (9, 2000 + 8)]  # the last: blocks of 8192 values (4 chunks of 8 a thread) and a partial one


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
@pytest.mark.parametrize("group", [32, 64, 128, 4096])
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_4bit_bit_exact(codebook, group, dtype):
    for shape in SHAPES_4BIT + [(group + 1,), (group - 1,)]:
        x = weight(shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1, dtype).reshape(shape)
        ref_p, ref_a = reference.quantize_4bit(x, codebook, group)
        poison()
        p, a = ops.quantize_4bit(x.to(DEV), codebook, group)
        assert same_bits(a, ref_a), (shape, "absmax")
        assert same_bits(p, ref_p), (shape, "packed")


def test_quantize_4bit_unaligned_input():
    base = torch.randn(1 + 3 * 77, dtype=torch.bfloat16)
    x = base[1:]  # 2-byte offset: the scalar-load path
    ref = reference.quantize_4bit(x, "nf4", 64)
    got = ops.quantize_4bit(base.to(DEV)[1:], "nf4", 64)
    assert same_bits(got[0], ref[0]) and same_bits(got[1], ref[1])


def test_quantize_4bit_rejects_nonfinite():
    x = torch.randn(4, 64, device=DEV)
    x[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.quantize_4bit(x, "nf4", 64)


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
@pytest.mark.parametrize("group", [32, 64, 256])
@pytest.mark.parametrize("dtype", FLOATS)
def test_dequantize_4bit_bit_exact(codebook, group, dtype):
    for n in (1, 7, 31, 32, 33, 64 * 5 + 17, 40000 + 3):
        packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8)
        absmax = torch.rand(math.ceil(n / group)) * 3
        absmax[0] = 0.0
        ref = reference.dequantize_4bit(packed, absmax, codebook, group, (n,), dtype)
        poison()
        got = ops.dequantize_4bit(packed.to(DEV), absmax.to(DEV), codebook, group, (n,), dtype)
        assert same_bits(got, ref), n
        # an unaligned packed tensor takes the scalar path
        buf = torch.cat([torch.zeros(1, dtype=torch.uint8), packed]).to(DEV)
        got = ops.dequantize_4bit(buf[1:], absmax.to(DEV), codebook, group, (n,), dtype)
        assert same_bits(got, ref), (n, "unaligned")


def _bnb():
    try:
        import bitsandbytes.functional as bf
    except Exception as e:  # pragma: no cover - depends on the install
        pytest.skip(f"bitsandbytes unavailable: {e}")
    return bf


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_4bit_matches_bitsandbytes_cuda(codebook, dtype):
    bf = _bnb()
    w = weight(96, 3 * 64 + 64, dtype).to(DEV)
    packed, state = bf.quantize_4bit(w, blocksize=64, quant_type=codebook)
    ref = bf.dequantize_4bit(packed, state)
    ours = ops.dequantize_4bit(packed.reshape(-1), state.absmax, codebook, 64, tuple(w.shape), dtype)
    assert same_bits(ours, ref), "dequantize differs from bitsandbytes' CUDA kernel"
    # quantize: the same codes, except (a) groups whose absmax is 0, where bitsandbytes
    # writes another code (both dequantize to 0), and (b) values within float rounding of
    # a midpoint: bitsandbytes' CUDA thresholds are decimal literals, ours the float32
    # midpoints of formats.h
    p, a = ops.quantize_4bit(w, codebook, 64)
    assert same_bits(a, state.absmax)
    ours_codes = torch.stack([p >> 4, p & 15], 1).reshape(-1)
    bnb_codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)
    flat = w.float().reshape(-1, 64)
    scaled = (flat * torch.where(a > 0, 1.0 / a, torch.zeros_like(a))[:, None]).reshape(-1)
    table = L.codebook_table(codebook)
    mids = L.midpoints(table.sort().values if codebook == "nf4" else
                       torch.tensor(L.FP4_MAG_SORTED, dtype=torch.float64).float()).to(DEV)
    probe = scaled if codebook == "nf4" else scaled.abs()
    near = (probe[:, None] - mids[None, :]).abs().min(1).values < 1e-6
    zero_group = (a == 0).repeat_interleave(64)
    differ = (ours_codes != bnb_codes) & ~near & ~zero_group
    assert int(differ.sum()) == 0, f"{int(differ.sum())} codes differ from bitsandbytes"


def test_dequantize_absmax_bit_exact():
    G = 256 * 3 + 11
    absmax = torch.rand(G) * 2
    codes, nested, code, offset = reference.quantize_absmax_nested(absmax)
    ref = reference.dequantize_absmax_nested(codes, nested, code, offset)
    got = ops.dequantize_absmax_nested(codes.to(DEV), nested.to(DEV), code.to(DEV), float(offset))
    assert same_bits(got, ref)


def linear_4bit_raw(xd, pd, ad, bd, y, group, codebook):
    """The launcher itself (any M, forced variants; no op-level checks) on device tensors,
    which the caller keeps alive until it has run; y is [M, N] in x's dtype."""
    (M, K), N = xd.shape, y.shape[1]
    ops._C.linear_4bit(xd.data_ptr(), L.DTYPE_CODES[xd.dtype], pd.data_ptr(), ad.data_ptr(),
                       0 if bd is None else bd.data_ptr(), y.data_ptr(), M, N, K, group,
                       L.CODEBOOK_CODES[codebook], 1, torch.cuda.current_stream().cuda_stream, 1)


def linear_4bit_case(M, N, K, group, codebook, dtype, with_bias):
    """A random 4-bit linear on the CPU: (w, packed, absmax, x, bias, reference y)."""
    w = weight(N, K)
    packed, absmax = reference.quantize_4bit(w, codebook, group)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    ref = reference.linear_4bit(x.float(), packed, absmax, codebook, group, N, K,
                                None if bias is None else bias.float())
    return w, packed, absmax, x, bias, ref


LINEAR_SHAPES = [(1, 8, 64), (3, 65, 128), (16, 200, 256), (17, 64, 192), (33, 24, 128), (5, 13, 63), (2, 40, 1000)]


@pytest.mark.parametrize("path", [0, 1, 2])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_linear_4bit(path, dtype, group):
    for M, N, K in LINEAR_SHAPES:
        _, packed, absmax, x, bias, ref = linear_4bit_case(M, N, K, group, "nf4", dtype, N % 2)
        poison()
        y = torch.empty(M, N, dtype=dtype, device=DEV)
        # the launcher takes any M; keep every device tensor alive until it has run
        xd, pd, ad = x.to(DEV), packed.to(DEV), absmax.to(DEV)
        bd = None if bias is None else bias.to(DEV)
        with variant("linear_4bit", path):
            linear_4bit_raw(xd, pd, ad, bd, y, group, "nf4")
            torch.cuda.synchronize()
        assert rel_err(y, ref) < tol(dtype), (M, N, K)


@pytest.mark.parametrize("tile", [1, 2, 4])
@pytest.mark.parametrize("split", [1, 3, 8])
def test_linear_4bit_skinny_variants(tile, split):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("skinny kernels need sm_80")
    M, N, K = 11, 3 * 64 + 8, 8 * 3 * 128
    w = weight(N, K)
    packed, absmax = reference.quantize_4bit(w, "fp4", 128)
    x = torch.randn(M, K).to(torch.bfloat16)
    ref = reference.linear_4bit(x.float(), packed, absmax, "fp4", 128, N, K)
    with variant("skinny_tile", tile), variant("split_k", split):
        y = ops.linear_4bit(x.to(DEV), packed.to(DEV), absmax.to(DEV), "fp4", 128, (N, K))
    assert rel_err(y, ref) < tol(torch.bfloat16)


# (group, K): several batches of chunks a warp with an odd batch count, a partial last
# batch, chunk == group (absmax as one vector a batch) and chunk < group (scalar absmax)
SKINNY_LONG_K = [(32, 32 * 4 * 3), (32, 32 * 9), (64, 64 * 4 * 5), (64, 64 * 7), (128, 128 * 2 * 3),
                 (128, 128 * 5), (256, 256 * 3)]


@pytest.mark.parametrize("group,K", SKINNY_LONG_K)
@pytest.mark.parametrize("split", [0, 2, 3])
def test_linear_4bit_skinny_batches(group, K, split):
    """The skinny kernel's shared-memory stages on long K (full and partial last stage),
    every split, M up to 2 tiles, several row tiles a block, absmax at an odd offset."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("skinny kernels need sm_80")
    for M, N, dtype, codebook in [(1, 200, torch.bfloat16, "nf4"), (8, 72, torch.float16, "fp4"),
                                  (9, 65, torch.bfloat16, "fp4"), (16, 264, torch.float16, "nf4"),
                                  (21, 40, torch.bfloat16, "nf4")]:
        _, packed, absmax, x, bias, ref = linear_4bit_case(M, N, K, group, codebook, dtype, M % 2)
        xd, pd = x.to(DEV), packed.to(DEV)
        # absmax 16-byte aligned (vector path) and at an odd float offset (scalar path)
        holder = torch.zeros(absmax.numel() + 1, device=DEV)
        holder[1:] = absmax.to(DEV)
        bd = None if bias is None else bias.to(DEV)
        for ad in (absmax.to(DEV), holder[1:]):
            poison()
            y = torch.empty(M, N, dtype=dtype, device=DEV)
            with variant("linear_4bit", 2), variant("split_k", split):
                linear_4bit_raw(xd, pd, ad, bd, y, group, codebook)
            torch.cuda.synchronize()
            assert rel_err(y, ref) < tol(dtype), (M, N, K, group, split, ad.data_ptr() % 16)


# (M, N, K, group): the streamed kernel's cases: one stage a tile (K <= 4096) and several
# with a shorter last one (K = 12544: 3 stages of 3328 and one of 2560), 8-row tail tiles
# (an odd number of octets a block) and partial ones (N % 8), fewer octets than SMs and
# several tiles a block, 1-16 tokens (9-16: two token tiles, tokens in registers), every
# chunk width (group 32, 64, 128 and 256), warps with 0-6 chunks (tokens in registers), K
# split over clusters of 2, 4 and 8 (tokens in registers, a row over 48 chunks)
STREAM_CASES = [(1, 3072, 3072, 64), (1, 1, 256, 64), (2, 13, 512, 32), (8, 2000, 1024, 64),
                (2, 1031, 12544, 64), (7, 40, 2048, 128), (8, 1100, 3072, 64), (1, 300, 4096, 256),
                (2, 129, 12288, 64), (6, 24, 1024, 32), (1, 3080, 12288, 64),
                (16, 3080, 3072, 64), (9, 1031, 1536, 32), (12, 200, 2048, 64), (16, 24, 256, 64),
                (13, 129, 1280, 32), (11, 40, 2560, 64),
                (16, 3072, 12288, 64), (9, 1031, 6144, 64), (1, 200, 12288, 64), (14, 5000, 3584, 32),
                (3, 64, 8192, 32)]


def stream_plan(M, N, K, group, tokens_in_registers, forced_split=0, absmax_rows=False):
    """The K split over a cluster and the layout that linear4_stream takes for (M, N, K,
    group) on this card, as (split, k of a stage, stages), or None where it refuses:
    csrc/cuda/linear4.cu, stream_split, run_stream_variant and stream_layout (absmax_rows:
    knob stream_ab = 1)."""
    q, nbytes = 4 * group, (16 if group >= 128 else 8 if group == 64 else 4)
    if M > (16 if tokens_in_registers and nbytes <= 8 else 8):
        return None
    props = torch.cuda.get_device_properties(0)

    def fits(ks):
        return K % ks == 0 and (K // ks) % q == 0 and (
            not tokens_in_registers or K // ks // (8 * nbytes) <= 48)

    def stage_k(Kl, cap):
        J = -(-Kl // cap)
        return -(-(-(-Kl // J)) // q) * q

    def layout(ks):
        Kl, octets = K // ks, -(-N // 8)
        groups = min(props.multi_processor_count // ks, octets)
        tiles = (-(-octets // groups) + 1) // 2
        nt = 2 if M > 8 else 1
        cw = 8  # consumer warps (STREAM_CW)
        off_part = 256 + 65536 + 2 * cw * 8 * nt * 16 * 4 + (0 if tokens_in_registers else M * (2 * Kl + 16))
        off_st = -(-(off_part + (tiles * 1024 if ks > 1 else 0)) // 128) * 128
        room = props.shared_memory_per_block_optin - off_st
        cap = Kl if tokens_in_registers else 4096
        while True:
            ksl = stage_k(Kl, cap)
            J = -(-Kl // ksl)
            whole = J == 1 and ks == 1 and nt == 1 and not absmax_rows  # the stage's absmax in one copy
            stages = room // (16 * (ksl // 2 + 4 * nbytes) + 64 * (ksl // group + (0 if whole else 4)))
            if tokens_in_registers or stages >= 3 or cap // 2 < 1024 or cap // 2 < q:
                break
            cap //= 2
        ok = stages >= 3 and (J == 1 or not tokens_in_registers)
        return (ks, ksl, min(stages, 8)) if ok else None

    if 1 <= forced_split <= 8 and fits(forced_split):
        return layout(forced_split)
    ks = next((s for s in (1, 2, 4, 8) if fits(s)), 0)
    if ks == 0:
        return None
    best = layout(ks)
    if tokens_in_registers:
        return best
    s = 2 * ks
    while s <= 8 and (best is None or best[1] < stage_k(K // best[0], 4096)):
        got = layout(s) if fits(s) else None
        if got and (best is None or got[1] > best[1]):
            best = got
        s *= 2
    return best


def stream_fits(M, N, K, group, tokens_in_registers, forced_split=0, absmax_rows=False):
    """Whether linear4_stream takes (M, N, K, group) with its tokens staged in shared
    memory or in registers (K split over a cluster where a row has more than 48 chunks)."""
    return stream_plan(M, N, K, group, tokens_in_registers, forced_split, absmax_rows) is not None


def streamed_variants(case, dtype, codebook, runs):
    """A random 4-bit linear case (M, N, K, group) through linear_4bit_raw once per run
    (name, knobs forced, fits; fits False: it must refuse); every output against the
    reference (error measured against the size of the products: one output can be a
    near-zero sum) and against the first run's. The outputs that ran, by name."""
    M, N, K, group = case
    w, packed, absmax, x, bias, ref = linear_4bit_case(M, N, K, group, codebook, dtype, N % 2)
    xd, pd, ad = x.to(DEV), packed.to(DEV), absmax.to(DEV)
    bd = None if bias is None else bias.to(DEV)
    mag = x.float().abs() @ w.abs().t() + (0.0 if bias is None else bias.float().abs()) + 1e-3
    outs = {}
    for name, knobs, fits in runs:
        poison()
        y = torch.empty(M, N, dtype=dtype, device=DEV)
        with contextlib.ExitStack() as forced:
            for k, v in knobs.items():
                forced.enter_context(variant(k, v))
            if not fits:
                with pytest.raises(NotImplementedError, match="no kernel"):
                    linear_4bit_raw(xd, pd, ad, bd, y, group, codebook)
                continue
            linear_4bit_raw(xd, pd, ad, bd, y, group, codebook)
        torch.cuda.synchronize()
        outs[name] = y
        assert ((y.float().cpu() - ref).abs() / mag).max().item() < tol(dtype), (name, case)
    # same decode and products, sums in another order: within a few float32 roundings of
    # y's magnitude, far below the bf16/f16 rounding of y itself
    scale = ref.abs().max().item() + 1.0
    first = outs[runs[0][0]]
    for name, y in outs.items():
        assert (y.float() - first.float()).abs().max().item() <= 2 ** -6 * scale, (name, case)
    return outs


@pytest.mark.parametrize("case", STREAM_CASES, ids=str)
@pytest.mark.parametrize("dtype,codebook", [(torch.bfloat16, "nf4"), (torch.float16, "fp4")])
def test_linear_4bit_streamed(case, dtype, codebook):
    """The sm_90 streamed kernel, forced (knob 3 refuses rather than falling back), with
    its tokens staged in shared memory and in registers, its absmax copied row by row, and
    a block's one-octet tile last instead of first (forced in turn; each refuses what it
    cannot take): the same result as the staged kernel up to float32 summation order, and
    against the reference."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the streamed kernel needs sm_90")
    M, N, K, group = case
    runs = [("staged kernel", {"linear_4bit": 2}, True)]
    for name, tokens, ab, half in (("streamed, tokens staged", 1, 0, 0), ("streamed, tokens in registers", 2, 0, 0),
                                   ("streamed, absmax row by row", 1, 1, 0),
                                   ("streamed, one-octet tile last", 2, 0, 1)):
        runs.append((name, {"linear_4bit": 3, "stream_xreg": tokens, "stream_ab": ab, "stream_half": half},
                     stream_fits(M, N, K, group, tokens == 2, absmax_rows=ab == 1)))
    outs = streamed_variants(case, dtype, codebook, runs)
    assert len(outs) >= 2, ("no streamed variant ran", case)


# (M, N, K, group, split): K split over a cluster with the tokens staged (each block stages
# its slice of them): one stage a slice, several (8 tokens at K = 12288 in 2: 2048-k
# stages), odd N and partial octets, a cluster of 8 with one tile, and the automatic
# choice (0) where whole tokens leave short stages only (4 and 8 tokens at K = 12288: a
# split in 2 and in 4)
STREAM_SPLIT_CASES = [(1, 3072, 3072, 64, 2), (8, 1031, 12288, 64, 2), (3, 300, 6144, 128, 4),
                      (2, 129, 8192, 32, 8), (5, 24, 1024, 64, 2), (4, 3072, 12288, 64, 0),
                      (8, 1031, 12288, 64, 0), (7, 2000, 4096, 256, 2)]


@pytest.mark.parametrize("case", STREAM_SPLIT_CASES, ids=str)
def test_linear_4bit_streamed_k_split_tokens_staged(case):
    """The streamed kernel with its tokens staged and K split over a cluster (forced by
    knob split_k, or 0: the automatic choice): against the reference and the staged
    kernel, as test_linear_4bit_streamed. The split is the layout mirror's (stream_plan):
    forced, it must be taken; automatic, these cases must split."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the streamed kernel needs sm_90")
    M, N, K, group, split = case
    plan = stream_plan(M, N, K, group, False, split)
    assert plan is not None, case
    # forced: taken; automatic: a split on a card with the H100/H200's shared memory
    big = torch.cuda.get_device_properties(0).shared_memory_per_block_optin >= 227 * 1024
    assert plan[0] == split or (split == 0 and (plan[0] > 1 or not big)), (plan, case)
    streamed_variants((M, N, K, group), torch.bfloat16, "nf4",
                      [("staged kernel", {"linear_4bit": 2}, True),
                       ("streamed, K split", {"linear_4bit": 3, "stream_xreg": 1, "split_k": split}, True)])


def test_linear_4bit_streamed_refuses_what_it_cannot_run():
    """Forced, the streamed kernel says so when the groups or the tokens do not fit, and
    the automatic choice then takes the staged kernel (same result)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the streamed kernel needs sm_90")
    for M, N, K, group in [(17, 8, 256, 64), (9, 8, 256, 128), (1, 8, 64 * 3, 64), (9, 8, 64 * 48 * 9, 64)]:
        w = weight(N, K)
        packed, absmax = reference.quantize_4bit(w, "nf4", group)
        x = torch.randn(M, K).to(torch.bfloat16)
        y = torch.empty(M, N, dtype=torch.bfloat16, device=DEV)
        xd, pd, ad = x.to(DEV), packed.to(DEV), absmax.to(DEV)
        with variant("linear_4bit", 3), pytest.raises(NotImplementedError, match="no kernel"):
            linear_4bit_raw(xd, pd, ad, None, y, group, "nf4")
        ref = reference.linear_4bit(x.float(), packed, absmax, "nf4", group, N, K)
        if M <= 16:
            got = ops.linear_4bit(xd, pd, ad, "nf4", group, (N, K))
            assert rel_err(got, ref) < tol(torch.bfloat16)


@pytest.mark.parametrize("M", [1, 16, 100])
def test_linear_4bit_op_paths(M):
    """The public op: fused for M <= 16, dequantize + cuBLAS above."""
    N, K = 96, 256
    w = weight(N, K)
    packed, absmax = reference.quantize_4bit(w, "nf4", 64)
    x = torch.randn(2, M, K, dtype=torch.float16)
    ref = reference.linear_4bit(x.float(), packed, absmax, "nf4", 64, N, K)
    y = ops.linear_4bit(x.to(DEV), packed.to(DEV), absmax.to(DEV), "nf4", 64, (N, K))
    assert y.shape == (2, M, N) and y.dtype == torch.float16
    assert rel_err(y, ref) < tol(torch.float16)


# ----------------------------------------------------------------------------- int8
INT8_SHAPES = [(1, 1), (1, 33), (7, 5), (130, 129), (64, 512), (257, 300), (3, 1024 + 8), (2, 3072), (3, 4088),
               (2, 8200), (3, 12288), (2, 16384), (2, 16392),  # row widths of each row-kernel's P
               (257, 264)]  # one-pass tiles: a partial tile in both directions, rows a multiple of 8


@pytest.mark.parametrize("layout,group", [("int8_block", 128), ("int8_block", 32), ("int8_lode", 128),
                                          ("int8_lode", 256), ("int8_lode", 512), ("int8_row", None)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_quantize_dequantize_bit_exact(layout, group, dtype):
    for N, K in INT8_SHAPES:
        w = weight(N, K, dtype)
        ref_q, ref_s = reference.quantize_int8(w, layout, group)
        poison()
        q, s = ops.quantize_int8(w.to(DEV), layout, group)
        assert same_bits(s, ref_s), (N, K, "scale")
        assert same_bits(q, ref_q), (N, K, "q")
        for out in FLOATS:
            ref = reference.dequantize_int8(ref_q, ref_s, layout, group, out)
            poison()
            got = ops.dequantize_int8(q, s, layout, group, out)
            assert same_bits(got, ref), (N, K, out)


@pytest.mark.parametrize("group_k", [32, 128, 256, 3072, 5000, 12296])
@pytest.mark.parametrize("K,dtype", [(3072, torch.bfloat16), (12296, torch.bfloat16), (12296, torch.float16),
                                     (1000, torch.float32)])
def test_int8_activation_quantize_bit_exact(group_k, K, dtype):
    x = torch.randn(37, K, dtype=dtype) * 3
    x[5, 17] = 0.0
    x[6] = 0.0  # a zero row: scale 0, codes 0
    ref = reference.quantize_int8_act(x, group_k)
    poison()
    got = ops.quantize_int8_act(x.to(DEV), group_k)
    assert same_bits(got[0], ref[0]) and same_bits(got[1], ref[1])


def test_int8_quantize_near_ties_bit_exact():
    """Values at and a few ulp around (k + 1/2) * scale: where x * (1 / scale) and the
    IEEE quotient x / scale may round to different integers (the kernels divide there)."""
    rows = []
    for amax in (1.0, 3.7, 1e-3, 5e4, 2.5e-36, 1e-37):  # the last: a subnormal scale
        scale = torch.tensor(amax, dtype=torch.float32) / 127
        mid = (torch.arange(-127, 127, dtype=torch.float32) + 0.5) * scale
        vals = [mid]
        up, down = mid, mid
        for _ in range(3):
            up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
            vals += [up, down]
        row = torch.cat(vals).clamp(-amax, amax)
        row = torch.cat([row, torch.tensor([amax]), torch.zeros(2048 - row.numel() - 1)])
        rows.append(row)
    x = torch.stack(rows)
    for got, ref in ((ops.quantize_int8_act(x.to(DEV), 2048), reference.quantize_int8_act(x, 2048)),
                     (ops.quantize_int8_act(x.bfloat16().to(DEV), 2048), reference.quantize_int8_act(x.bfloat16(), 2048)),
                     (ops.quantize_int8(x.to(DEV), "int8_row", None), reference.quantize_int8(x, "int8_row", None))):
        assert same_bits(got[1], ref[1]) and same_bits(got[0], ref[0])


def test_int8_quantize_rejects_nonfinite():
    w = torch.randn(8, 256, device=DEV)
    w[3, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.quantize_int8(w, "int8_lode", 128)


GEMM_PATHS = {"generic": 1, "skinny": 2, "mma80": 3, "sm90": 4, "sm90_multicast": 5}
GEMM_SHAPES = [(1, 64, 256), (16, 136, 512), (17, 72, 384), (200, 264, 512), (300, 128, 1024), (5, 40, 1000),
               (131, 203, 384), (129, 520, 256)]  # odd N (element tail), a partial 256-wide tile


@pytest.mark.parametrize("path", list(GEMM_PATHS))
@pytest.mark.parametrize("layout,group", [("int8_row", None), ("int8_lode", 128), ("int8_lode", 256),
                                          ("int8_lode", 512), ("int8_block", 128), ("int8_block", 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_w8a8_linear(path, layout, group, dtype):
    if path.startswith("sm90") and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma kernel: sm_90 only")
    for M, N, K in GEMM_SHAPES:
        w = weight(N, K)
        q, s = reference.quantize_int8(w, layout, group)
        x = torch.randn(M, K).to(dtype)
        bias = torch.randn(N).to(dtype) if M % 2 else None
        ref = reference.linear_int8(x.float(), q, s, layout, group, None if bias is None else bias.float())
        poison()
        with variant("gemm_int8", GEMM_PATHS[path]):
            y = ops.linear_int8(x.to(DEV), q.to(DEV), s.to(DEV), layout, group,
                                None if bias is None else bias.to(DEV))
        # the activation quantization is bit-identical, so only the sums differ: float32
        # paths agree to float32 rounding, 16-bit outputs to their own rounding
        assert rel_err(y, ref) < tol(dtype), (path, M, N, K)


@pytest.mark.parametrize("layout,group", [("int8_row", None), ("int8_lode", 128), ("int8_lode", 256),
                                          ("int8_block", 128), ("int8_block", 256)])
@pytest.mark.parametrize("N", [2304, 2300])  # y by bulk tensor stores / by the consumers (N % 8 != 0)
@pytest.mark.parametrize("stages", [0, 4])  # knob gemm_stages (one K-group): 0 default (here 3), 4 y box by box
def test_w8a8_wgmma_many_tiles_per_cta(layout, group, N, stages):
    """More tiles than SMs: the persistent wgmma kernel takes several tiles a CTA, its
    stage and epilogue-buffer phases wrap; partial last tiles in N and M."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma kernel: sm_90 only")
    M, K = 2100, 640
    w = weight(N, K)
    q, s = reference.quantize_int8(w, layout, group)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    bias = torch.randn(N, dtype=torch.bfloat16)
    qd, sd, xd, bd = q.to(DEV), s.to(DEV), x.to(DEV), bias.to(DEV)
    with variant("gemm_int8", GEMM_PATHS["generic"]):
        ref = ops.linear_int8(xd, qd, sd, layout, group, bd)
    poison()
    with variant("gemm_int8", GEMM_PATHS["sm90"]), variant("gemm_stages", stages):
        y = ops.linear_int8(xd, qd, sd, layout, group, bd)
    # same activation codes and int32 sums; only the float order of the scales differs
    assert rel_err(y, ref) < tol(torch.bfloat16)
    if layout == "int8_row":  # acc * (xs * ws) + bias in both: bit for bit
        assert same_bits(y, ref)


def tail_split_parts(M: int, N: int, K: int, sms: int, BN: int = 256) -> int:
    """The K parts of the sm90 W8A8 kernel's split of a partly filled round of 128 x BN
    tiles (gemm_int8_sm90.cu, run_wgmma; BN 256 for one K-group, 192 with per-group
    scales), 0 where it takes none: mirrored here so that the test knows where the kernel
    must split."""
    tiles, ktiles = -(-M // 128) * -(-N // BN), -(-K // 128)
    r = tiles % sms if tiles > sms else tiles
    s = min(sms // r if r else 0, ktiles // 8)
    return s if r and s >= 2 else 0


def tail_split_case(M: int, N: int, K: int, layout: str, group, BN: int):
    """Skips where the sm90 kernel takes no K split of M x N x K on this card; else a
    random case (CPU: x, q, s, bias; on the device: xd, qd, sd, bd) and the kernel's
    result without the split (knob gemm_tail = 1)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma kernel: sm_90 only")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if not tail_split_parts(M, N, K, sms, BN):
        pytest.skip(f"no K split for {M} x {N} x {K} on {sms} SMs")
    q, s = reference.quantize_int8(weight(N, K), layout, group)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    bias = torch.randn(N, dtype=torch.bfloat16)
    dev = tuple(t.to(DEV) for t in (x, q, s, bias))
    with variant("gemm_int8", GEMM_PATHS["sm90"]), variant("gemm_tail", 1):
        unsplit = ops.linear_int8(dev[0], dev[1], dev[2], layout, group, dev[3])
    return (x, q, s, bias), dev, unsplit


@pytest.mark.parametrize("M,N,K", [(2100, 2304, 2048), (2100, 2300, 2048), (4608, 3072, 3072), (1000, 4400, 4096),
                                   (256, 3072, 3072), (300, 1004, 3072)])
def test_w8a8_wgmma_tail_split(M, N, K):
    """One K-group: a partly filled round of tiles (the last of several, or the only one)
    split over K across the idle CTAs (knob gemm_tail = 2 requires it, so the test fails
    where the split was not taken), part 0 adding the later parts' int32 sums: the same
    bits as without the split. On 132 SMs: 153 tiles (21 in the tail, 2 parts of 8
    K-tiles), the same with N % 8 != 0 (y by the consumers), 432 (36, 3 parts), 144 (12,
    4 parts) with partial tiles in M and N; one round: 24 tiles in 3 parts, 12 in 3."""
    (x, q, s, bias), (xd, qd, sd, bd), ref = tail_split_case(M, N, K, "int8_row", None, BN=256)
    poison()
    with variant("gemm_int8", GEMM_PATHS["sm90"]), variant("gemm_tail", 2):
        y = ops.linear_int8(xd, qd, sd, "int8_row", None, bd)
        torch.cuda.synchronize()
        y2 = ops.linear_int8(xd, qd, sd, "int8_row", None, bd)  # the flags start at zero again
        with variant("gemm_stages", 4):  # y box by box (the default where K >= 8192)
            y3 = ops.linear_int8(xd, qd, sd, "int8_row", None, bd)
    assert same_bits(y, ref) and same_bits(y2, ref) and same_bits(y3, ref)
    assert rel_err(y, reference.linear_int8(x.float(), q, s, "int8_row", None, bias.float())) < tol(torch.bfloat16)


@pytest.mark.parametrize("layout,group", [("int8_lode", 128), ("int8_lode", 512), ("int8_block", 128),
                                          ("int8_block", 256)])
@pytest.mark.parametrize("M,N,K", [(4608, 3072, 3072), (520, 2300, 2048), (256, 1000, 2560)])
def test_w8a8_wgmma_tail_split_promoted(layout, group, M, N, K):
    """Per-group scales: the partly filled round's 128 x 192 tiles split over K, each part
    promoting its own K-tiles, part 0 adding the later parts' float32 sums. On 132 SMs:
    576 tiles, 48 in 2 parts of 12 K-tiles; 60 tiles (partial in M and N, N % 8 != 0) in 2
    parts; one round of 12 tiles in 2 parts of 10 K-tiles, which cut a group of 512 (4
    K-tiles; a part's share of a group takes the group's scale). Equal to the unsplit
    kernel up to float32 rounding before the bf16 output, the same bits on a second call."""
    (x, q, s, bias), (xd, qd, sd, bd), ref = tail_split_case(M, N, K, layout, group, BN=192)
    poison()
    with variant("gemm_int8", GEMM_PATHS["sm90"]), variant("gemm_tail", 2):
        y = ops.linear_int8(xd, qd, sd, layout, group, bd)
        torch.cuda.synchronize()
        y2 = ops.linear_int8(xd, qd, sd, layout, group, bd)  # the flags start at zero again
    assert same_bits(y, y2)
    assert rel_err(y, ref) < 2.0 ** -8  # a part lost or added twice: ~0.5
    assert rel_err(y, reference.linear_int8(x.float(), q, s, layout, group, bias.float())) < tol(torch.bfloat16)


def test_w8a8_wgmma_tail_split_refused_where_it_does_not_apply():
    """K = 128 is one K-tile: nothing to split, so the required split is refused."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma kernel: sm_90 only")
    q, s = ops.quantize_int8(weight(256, 128).to(DEV), "int8_row", None)
    x = torch.randn(300, 128, dtype=torch.bfloat16, device=DEV)
    assert tail_split_parts(300, 256, 128, torch.cuda.get_device_properties(0).multi_processor_count) == 0
    with variant("gemm_int8", GEMM_PATHS["sm90"]), variant("gemm_tail", 2), pytest.raises(NotImplementedError):
        ops.linear_int8(x, q, s, "int8_row", None)


@pytest.mark.parametrize("group", [128, 256, 512])
def test_w8a8_wgmma_promotion_at_the_largest_sums(group):
    """Every K-group's int32 sum at its largest, 127 * 128 * group (weight codes of -128,
    which a file may hold, against activation codes of -127), through the promotion to
    float32; exact in float32 up to 2^24, so the result is the reference's to rounding."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma kernel: sm_90 only")
    M, N, K = 130, 264, 2048
    q = torch.full((N, K), -128, dtype=torch.int8)
    s = torch.rand(N, K // group) + 0.5
    x = -torch.ones(M, K) * torch.arange(1, M + 1, dtype=torch.float32)[:, None]
    ref = reference.linear_int8(x, q, s, "int8_lode", group)
    poison()
    with variant("gemm_int8", GEMM_PATHS["sm90"]):
        y = ops.linear_int8(x.to(DEV), q.to(DEV), s.to(DEV), "int8_lode", group)
    assert rel_err(y, ref) < 1e-6


@pytest.mark.parametrize("layout,group", [("int8_row", None), ("int8_lode", 128), ("int8_block", 128)])
def test_w8a8_generic_matches_cpu_bit_for_bit(layout, group):
    """The generic kernel does the reference's float32 operations in its order."""
    M, N, K = 9, 33, 384
    w = weight(N, K)
    q, s = reference.quantize_int8(w, layout, group)
    x = torch.randn(M, K)
    ref = reference.linear_int8(x, q, s, layout, group)
    with variant("gemm_int8", 1):
        y = ops.linear_int8(x.to(DEV), q.to(DEV), s.to(DEV), layout, group)
    assert same_bits(y, ref)


@pytest.mark.parametrize("M", [1, 16, 40])
def test_int8_weight_only(M):
    N, K = 72, 320
    w = weight(N, K)
    q, s = reference.quantize_int8(w, "int8_lode", 64)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    ref = reference.linear_int8(x.float(), q, s, "int8_lode", 64, act_quant=False)
    y = ops.linear_int8(x.to(DEV), q.to(DEV), s.to(DEV), "int8_lode", 64, act_quant=False)
    assert rel_err(y, ref) < tol(torch.bfloat16)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("tokens", [8, 600])  # the fused kernels / dequantize + the compiler's GEMM
def test_torch_compile_inductor_matches_eager(tokens):
    """Our ops under torch.compile (inductor, fullgraph) on the GPU: the fused kernels
    for few tokens, and above the fused range our dequantize feeding inductor's GEMM."""
    torch._dynamo.reset()
    N, K = 192, 256
    w = weight(N, K).to(DEV)
    p, a = ops.quantize_4bit(w, "nf4", 64)
    q, s = ops.quantize_int8(w, "int8_row", None)
    b = torch.randn(N, device=DEV, dtype=torch.bfloat16)

    def block(x):
        h = ops.linear_4bit(x, p, a, "nf4", 64, (N, K), b)
        h = h + ops.linear_int8(x, q, s, "int8_row", None, b, act_quant=False)
        return torch.nn.functional.gelu(h + ops.linear_int8(x, q, s, "int8_row", None, None, act_quant=True))

    x = torch.randn(2, tokens // 2, K, device=DEV, dtype=torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True)
    assert rel_err(compiled(x), block(x)) < tol(torch.bfloat16)


# ----------------------------------------------------------------------------- graphs
def captured(run):
    """run() warmed up on a side stream (as CUDA graph capture asks), then captured into a
    graph: (the graph, the outputs of the captured run)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = run()
    return g, outs


def test_cuda_graph_capture_replays():
    """Launchers neither allocate nor synchronize: the ops capture into a CUDA graph."""
    N, K = 256, 512
    w = weight(N, K).to(DEV)
    packed, absmax = ops.quantize_4bit(w, "nf4", 64)
    q, s = ops.quantize_int8(w, "int8_lode", 128)
    x1 = torch.randn(1, K, dtype=torch.bfloat16, device=DEV)
    x2 = torch.randn(300, K, dtype=torch.bfloat16, device=DEV)
    # int8_row with more tiles than SMs: on sm_90 the last round's K split, its workspace
    # allocated and its flags zeroed inside the graph (replayed twice below)
    qr, sr = ops.quantize_int8(weight(2304, 2048).to(DEV), "int8_row", None)
    x3 = torch.randn(2100, 2048, dtype=torch.bfloat16, device=DEV)

    def run():
        return (ops.linear_4bit(x1, packed, absmax, "nf4", 64, (N, K)),
                ops.linear_4bit(x2, packed, absmax, "nf4", 64, (N, K)),
                ops.linear_int8(x2, q, s, "int8_lode", 128),
                ops.linear_int8(x1, q, s, "int8_lode", 128),
                ops.linear_int8(x3, qr, sr, "int8_row", None))

    eager = run()
    g, outs = captured(run)
    x1.copy_(torch.randn_like(x1))
    x2.copy_(torch.randn_like(x2))
    x3.copy_(torch.randn_like(x3))
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    fresh = run()
    for a, b in zip(outs, fresh):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0], eager[0])


@pytest.mark.parametrize("layout,M,K,N", [("nf4", 1, 3072, 3072), ("nf4", 16, 3072, 1000), ("nf4", 2, 12288, 520),
                                           ("int8_row", 1, 3072, 1000), ("int8_lode", 16, 1024, 520),
                                           ("int8_block", 300, 1024, 776), ("int8_row", 2100, 2048, 2304)],
                         ids=str)
def test_early_launch_reads_what_the_kernel_before_wrote(layout, M, K, N):
    """Kernels launched early (PDL, sm_90: the skinny W8A8 GEMM and the wgmma one with row
    scales, after our activation quantize; the streamed 4-bit linear with knob pdl = 2)
    start while the stream's previous kernel still runs; they must still see everything
    it writes. Each call's tokens and weights are written by the copy kernels just before
    it (eagerly and in a replayed graph, where the calls follow one another with no gap);
    every output must be bit for bit the one of its own inputs computed alone, with PDL
    and without (knob pdl = 1). The last case takes the W8A8 K split, whose workspace
    flags a memset zeroes between the two kernels."""
    group = 64 if layout == "nf4" else 128
    pdl_on = 2 if layout == "nf4" else 0
    ws = [weight(N, K).to(DEV) for _ in range(2)]
    if layout == "nf4":
        quants = [ops.quantize_4bit(w, "nf4", group) for w in ws]
    else:
        quants = [ops.quantize_int8(w, layout, None if layout == "int8_row" else group) for w in ws]

    def op(x, wq, sc):
        if layout == "nf4":
            return ops.linear_4bit(x, wq, sc, "nf4", group, (N, K))
        return ops.linear_int8(x, wq, sc, layout, None if layout == "int8_row" else group)

    xs = [torch.randn(M, K, dtype=torch.bfloat16, device=DEV) for _ in range(3)]
    wq, sc = torch.empty_like(quants[0][0]), torch.empty_like(quants[0][1])
    x = torch.empty_like(xs[0])
    alone = {}
    with variant("pdl", 1):
        for i in range(6):
            alone[i] = op(xs[i % 3], *quants[i % 2])
            torch.cuda.synchronize()

    def run():
        outs = []
        for i in range(6):
            x.copy_(xs[i % 3])
            wq.copy_(quants[i % 2][0])
            sc.copy_(quants[i % 2][1])
            outs.append(op(x, wq, sc))
        return outs

    for pdl in (pdl_on, 1):
        with variant("pdl", pdl):
            for outs in (run(), run()):
                for i, y in enumerate(outs):
                    assert torch.equal(y, alone[i]), (pdl, i)
            g, outs = captured(run)
        for _ in range(3):
            for y in outs:
                y.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            for i, y in enumerate(outs):
                assert torch.equal(y, alone[i]), ("graph", pdl, i)


# ----------------------------------------------------------------------------- devices
def test_ops_refuse_tensors_on_cpu_and_cuda_mixed():
    packed, absmax = reference.quantize_4bit(weight(8, 64), "nf4", 64)
    q, s = reference.quantize_int8(weight(24, 96), "int8_lode", 32)
    with pytest.raises(ValueError, match=r"dequantize_4bit: expected all tensors on one device, "
                                         r"got packed on cuda:\d, absmax on cpu"):
        ops.dequantize_4bit(packed.to(DEV), absmax, "nf4", 64, (8, 64))
    with pytest.raises(ValueError, match=r"linear_int8: .* got x on cpu, qweight on cuda:\d, weight_scale on cuda:\d"):
        ops.linear_int8(torch.randn(3, 96), q.to(DEV), s.to(DEV), "int8_lode", 32)


needs_two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                    reason="needs 2 CUDA devices")


@needs_two_gpus
def test_ops_refuse_tensors_on_two_gpus():
    q, s = reference.quantize_int8(weight(24, 96), "int8_lode", 32)
    with pytest.raises(ValueError, match=r"got x on cuda:0, qweight on cuda:1, weight_scale on cuda:1, bias on cuda:0"):
        ops.linear_int8(torch.randn(3, 96, device="cuda:0"), q.to("cuda:1"), s.to("cuda:1"), "int8_lode", 32,
                        torch.randn(24, device="cuda:0"))


@needs_two_gpus
def test_ops_run_on_the_tensors_device_not_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: the launchers run on the CUDA runtime's
    current device, so every op must make cuda:1 current for its launch (and put cuda:0
    back). Each op runs first on cuda:0 and then on cuda:1, so per-device state set up
    once per process (function attributes, device facts) shows up too. W8A8: below."""
    N, K, g = 72, 320, 64
    w = weight(N, K)
    ref_p, ref_a = reference.quantize_4bit(w, "nf4", g)
    ref_q, ref_s = reference.quantize_int8(w, "int8_lode", g)
    codes, nested, qmap, offset = reference.quantize_absmax_nested(torch.rand(300) * 2)
    bias = torch.randn(N)
    with torch.cuda.device(0):
        for dev in ("cuda:0", "cuda:1"):
            p, a = ops.quantize_4bit(w.to(dev), "nf4", g)
            assert p.device == torch.device(dev) and same_bits(p, ref_p) and same_bits(a, ref_a), dev
            got = ops.dequantize_4bit(p, a, "nf4", g, (N, K), torch.bfloat16)
            assert same_bits(got, reference.dequantize_4bit(ref_p, ref_a, "nf4", g, (N, K), torch.bfloat16)), dev
            q, s = ops.quantize_int8(w.to(dev), "int8_lode", g)
            assert same_bits(q, ref_q) and same_bits(s, ref_s), dev
            got = ops.dequantize_int8(q, s, "int8_lode", g, torch.float16)
            assert same_bits(got, reference.dequantize_int8(ref_q, ref_s, "int8_lode", g, torch.float16)), dev
            got = ops.dequantize_absmax_nested(codes.to(dev), nested.to(dev), qmap.to(dev), float(offset))
            assert same_bits(got, reference.dequantize_absmax_nested(codes, nested, qmap, offset)), dev
            x = torch.randn(37, K, dtype=torch.bfloat16)
            xq, xs = ops.quantize_int8_act(x.to(dev), g)
            rq, rs = reference.quantize_int8_act(x, g)
            assert xq.device == torch.device(dev) and same_bits(xq, rq) and same_bits(xs, rs), dev
            for M in (1, 16, 200):  # fused small-M kernels, and dequantize + cuBLAS / the large GEMMs
                x = torch.randn(M, K, dtype=torch.bfloat16)
                ref = reference.linear_4bit(x.float(), ref_p, ref_a, "nf4", g, N, K, bias)
                y = ops.linear_4bit(x.to(dev), p, a, "nf4", g, (N, K), bias.to(dev))
                assert y.device == torch.device(dev) and rel_err(y, ref) < tol(torch.bfloat16), (dev, M)
                ref = reference.linear_int8(x.float(), ref_q, ref_s, "int8_lode", g, bias, act_quant=False)
                y = ops.linear_int8(x.to(dev), q, s, "int8_lode", g, bias.to(dev), act_quant=False)
                assert rel_err(y, ref) < tol(torch.bfloat16), (dev, M, "weight-only")
            torch.cuda.synchronize(dev)
            assert torch.cuda.current_device() == 0, dev


@needs_two_gpus
@pytest.mark.parametrize("path", list(GEMM_PATHS))
def test_w8a8_runs_on_the_tensors_device_not_the_current_one(path):
    """W8A8 linear (activation quantization + GEMM) on cuda:0, then on cuda:1 while cuda:0
    is current, for each GEMM kernel."""
    if path.startswith("sm90") and torch.cuda.get_device_capability(1) != (9, 0):
        pytest.skip("wgmma kernel: sm_90 only")
    N, K, g = 72, 320, 64
    q, s = reference.quantize_int8(weight(N, K), "int8_lode", g)
    bias = torch.randn(N)
    with torch.cuda.device(0), variant("gemm_int8", GEMM_PATHS[path]):
        for dev in ("cuda:0", "cuda:1"):
            for M in (1, 16, 200):
                x = torch.randn(M, K, dtype=torch.bfloat16)
                ref = reference.linear_int8(x.float(), q, s, "int8_lode", g, bias)
                y = ops.linear_int8(x.to(dev), q.to(dev), s.to(dev), "int8_lode", g, bias.to(dev))
                assert y.device == torch.device(dev) and rel_err(y, ref) < tol(torch.bfloat16), (dev, M)
            torch.cuda.synchronize(dev)
            assert torch.cuda.current_device() == 0, dev
