"""The arithmetic behind the CUDA quantize kernels, checked on the CPU in numpy (float32
ops are IEEE round-to-nearest-even there too), so that CI, with no GPU, guards it:

- int8 (csrc/cuda/int8.cu, quant8): rint(fl(v / s)) without a division a value, from
  r = rn(1 / s), q = rn(v r) and two FMA correction steps q <- rn(q + rn(v - q s) r), then
  rounding by adding 1.5 * 2^23;
- 4-bit (csrc/cuda/quant4.cu, code_cell and Quant4Op): the nearest code from a 256-cell
  table, cell(s) = 8 mantissa bits of fma(s, 1/4, 3).

The GPU tests (tests/test_cuda.py) check the kernels themselves bit for bit.
"""

from fractions import Fraction

import numpy as np
import torch

from comfy_quant_native import reference

F32 = np.float32
MAGIC = F32(1.5 * 2**23)


def _rn32(x: Fraction) -> np.float32:
    """The float32 nearest to the rational x, ties to even."""
    d = F32(float(x))
    best = None
    for c in (np.nextafter(d, F32(-np.inf)), d, np.nextafter(d, F32(np.inf))):
        err = abs(Fraction(float(c)) - x)
        even = (int(np.array(c).view(np.uint32)) & 1) == 0
        if best is None or err < best[0] or (err == best[0] and even):
            best = (err, c)
    return best[1]


def _fma32(a, b, c):
    """rn32(a * b + c) elementwise for float32 arrays: exact in float64 where a * b + c
    fits 53 bits; where the float64 sum lands on a float32 midpoint (a double rounding
    could go the wrong way) it is redone in exact rationals."""
    a, b, c = (np.asarray(t, dtype=F32) for t in (a, b, c))
    prod = a.astype(np.float64) * b.astype(np.float64)  # 48 bits: exact
    s64 = prod + c.astype(np.float64)
    out = s64.astype(F32)
    lo, hi = np.nextafter(out, F32(-np.inf)), np.nextafter(out, F32(np.inf))
    o64 = out.astype(np.float64)
    risky = (s64 == (o64 + lo) / 2) | (s64 == (o64 + hi) / 2) | ~np.isfinite(s64)
    for i in zip(*np.nonzero(risky)):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        out[i] = _rn32(exact)
    return out


def _groups(rng, kind: str, rows: int, width: int = 128) -> np.ndarray:
    if kind == "bf16":
        return (torch.randn(rows, width, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30)))) * 0.02
                ).to(torch.bfloat16).float().numpy()
    if kind == "fp16":
        return (torch.randn(rows, width, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
                ).to(torch.float16).float().numpy()
    return (rng.standard_normal((rows, width)) * np.exp(rng.uniform(-60, 60, (rows, 1)))).astype(F32)


def test_int8_codes_without_division_match_ieee_quotient():
    rng = np.random.default_rng(3)
    for kind in ("bf16", "fp16", "f32"):
        w = _groups(rng, kind, 2000)
        # near ties: (k + 1/2) s and a few ulp around it, in the last rows
        amax = np.abs(w).max(axis=1, keepdims=True).astype(F32)
        s = (amax / F32(127)).astype(F32)
        k = rng.integers(-127, 127, (200, 128))
        tie = ((k + 0.5) * s[-200:].astype(np.float64)).astype(F32)
        tie = np.clip(np.nextafter(tie, np.where(rng.random(tie.shape) < 0.5, F32(-np.inf), F32(np.inf))),
                      -amax[-200:], amax[-200:])
        w[-200:] = tie
        amax = np.abs(w).max(axis=1, keepdims=True).astype(F32)
        s = np.broadcast_to((amax / F32(127)).astype(F32), w.shape)
        assert ((s >= 2.0**-100) & (s <= 2.0**100)).all()
        r = (F32(1) / s).astype(F32)
        q = (w * r).astype(F32)
        for _ in range(2):
            rem = _fma32(-q, s, w)
            q = _fma32(rem, r, q)
        assert np.array_equal(q, (w / s).astype(F32)), kind
        codes = ((q + MAGIC).astype(F32).view(np.uint32).astype(np.int64) & 0xFF).astype(np.uint8).view(np.int8)
        want = np.clip(np.rint((w / s).astype(F32)), -127, 127).astype(np.int8)
        assert np.array_equal(codes, want), kind


def _cell(s: np.ndarray) -> np.ndarray:
    t = _fma32(s, np.full_like(s, 0.25), np.full_like(s, 3.0))
    return (t.view(np.uint32) >> 15) & 255


def test_4bit_code_cells_match_binary_search():
    rng = np.random.default_rng(4)
    for codebook in ("nf4", "fp4"):
        _, mids, _ = reference._tables(codebook)
        mids = mids.numpy().astype(F32)
        cells = _cell(mids)
        assert len(set(cells.tolist())) == len(cells), "two midpoints share a cell"
        below = np.array([(cells < j).sum() for j in range(256)], dtype=np.uint32)
        mid_of = np.full(256, 8.0, dtype=F32)
        mid_of[cells] = mids
        vals = [rng.uniform(-1, 1, 200_000).astype(F32), np.array([-1, 1, 0, -0.0, 1 + 2**-23, -1 - 2**-23], F32)]
        for m in np.concatenate([mids, -mids, (np.arange(96, 161) / 32 - 4).astype(F32)]):
            x = F32(m)
            for direction in (F32(-np.inf), F32(np.inf)):
                y = x
                for _ in range(6):
                    vals.append(np.array([y], F32))
                    y = np.nextafter(y, direction)
        s = np.concatenate(vals)
        want = reference._codes_4bit(torch.from_numpy(s), codebook).numpy().astype(np.uint32)
        a = s if codebook == "nf4" else np.abs(s)
        c = _cell(a)
        rank = below[c] + (a > mid_of[c])
        if codebook == "nf4":
            got = rank
        else:
            got = ((0x32547610 >> (4 * rank.astype(np.uint64))) & 7).astype(np.uint32) | np.where(s < 0, 8, 0)
        assert np.array_equal(got, want), codebook
