"""Plain-PyTorch implementation of every op: the test oracle, and the fallback when the
native extension is not built. Same names and signatures as the native ops in ops.py.

Semantics (csrc/formats.h is the contract):
- 4-bit: the weight is flattened, cut into groups of ``group_size`` consecutive values;
  code = nearest table entry to x * (1/absmax) by float32 midpoints; two codes a byte,
  element 2j in the high nibble. Dequantized value = table[code] * absmax in float32.
- int8: scale = amax/127 per tile, q = round-half-even(x / scale), 0 where scale == 0.
- Linear: y = x W^T + b computed in float32 and returned in x's dtype; W8A8 quantizes
  x per token (per token per K-group for int8_block), accumulates each K-group exactly
  and adds groups in order: y += dot_g * (x_scale * w_scale).
Inputs are validated by ops.py; functions here assume valid arguments.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import layouts as L


# ----------------------------------------------------------------------------- tables
@lru_cache(maxsize=None)
def _tables(codebook: str):
    table = L.codebook_table(codebook)
    if codebook == "nf4":
        return table, L.midpoints(table), None
    mag = torch.tensor(L.FP4_MAG_SORTED, dtype=torch.float64).to(torch.float32)
    return table, L.midpoints(mag), torch.tensor(L.FP4_MAG_CODE, dtype=torch.uint8)


def _table_on(codebook: str, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return _tables_on_device(codebook, torch.device(device))


@lru_cache(maxsize=None)
def _tables_on_device(codebook: str, device: torch.device):
    """Once per device, not a host-to-device copy a call (which also kept the reference
    ops out of CUDA graphs)."""
    table, mids, magcode = _tables(codebook)
    return (
        table.to(device),
        mids.to(device),
        None if magcode is None else magcode.to(device),
    )


def _codes_4bit(scaled: torch.Tensor, codebook: str) -> torch.Tensor:
    """Nearest 4-bit code (uint8) of each normalized value."""
    _, mids, magcode = _table_on(codebook, scaled.device)
    if codebook == "nf4":
        return torch.bucketize(scaled, mids).to(torch.uint8)
    # FP4 is sign-magnitude: magnitude by midpoints (ties toward zero), sign bit if x < 0.
    idx = torch.bucketize(scaled.abs(), mids)
    return magcode[idx] | ((scaled < 0).to(torch.uint8) << 3)


def _check_finite(amax: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(amax).all()):
        bad = int((~torch.isfinite(amax)).nonzero()[0, 0])
        raise ValueError(f"{what} contains NaN or Inf (first in group {bad})")


# ----------------------------------------------------------------------------- 4-bit
def quantize_4bit(x: torch.Tensor, codebook: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float tensor of any shape -> (packed uint8 [ceil(n/2)], absmax float32 [ceil(n/B)])."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    groups = math.ceil(n / group_size)
    padded = F.pad(flat, (0, groups * group_size - n)).view(groups, group_size)
    absmax = padded.abs().amax(dim=1)
    _check_finite(absmax, "weight")
    recip = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    codes = _codes_4bit(padded * recip[:, None], codebook).reshape(-1)[:n]
    if n % 2:
        codes = F.pad(codes, (0, 1), value=L.ZERO_CODE[codebook])
    codes = codes.view(-1, 2)
    packed = (codes[:, 0] << 4) | codes[:, 1]
    return packed.contiguous(), absmax.contiguous()


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    codebook: str,
    group_size: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of quantize_4bit: table[code] * absmax in float32, rounded to ``dtype``."""
    n = math.prod(shape)
    table, _, _ = _table_on(codebook, packed.device)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    groups = absmax.numel()
    vals = F.pad(table[codes], (0, groups * group_size - n)).view(groups, group_size)
    out = (vals * absmax.float()[:, None]).reshape(-1)[:n]
    return out.to(dtype).reshape(shape)


def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    codebook: str,
    group_size: int,
    N: int,
    K: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    w = dequantize_4bit(packed, absmax, codebook, group_size, (N, K), torch.float32)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- int8
def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def _expand_scale(scale: torch.Tensor, gn: int, gk: int, N: int, K: int) -> torch.Tensor:
    """Per-tile scales [ceil(N/gn), ceil(K/gk)] -> per-element [N, K]."""
    s = scale.float().reshape(math.ceil(N / gn), math.ceil(K / gk))
    return s.repeat_interleave(gn, 0)[:N].repeat_interleave(gk, 1)[:, :K]


def quantize_int8_tiles(x2d: torch.Tensor, gn: int, gk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over tiles of gn x gk: (q int8 [N, K], scale float32 [ceil(N/gn), ceil(K/gk)])."""
    N, K = x2d.shape
    xf = x2d.float()
    nb, kb = math.ceil(N / gn), math.ceil(K / gk)
    tiles = _pad_to(xf, nb * gn, kb * gk).view(nb, gn, kb, gk)
    amax = tiles.abs().amax(dim=(1, 3))
    # A true division on every device: torch's CUDA division by a Python number
    # multiplies by its reciprocal, which is one rounding off the contract.
    scale = amax / torch.full_like(amax, float(L.INT8_QMAX))
    _check_finite(scale.reshape(-1), "tensor")
    s = _expand_scale(scale, gn, gk, N, K)
    q = torch.where(s > 0, torch.round(xf / s), torch.zeros_like(xf))
    return q.clamp_(-L.INT8_QMAX, L.INT8_QMAX).to(torch.int8), scale.contiguous()


def quantize_int8(w: torch.Tensor, layout: str, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale float32 in layouts.scale_shape)."""
    N, K = w.shape
    gn, gk = L.int8_tile(layout, group_size, K)
    q, scale = quantize_int8_tiles(w, gn, gk)
    return q, scale.reshape(L.scale_shape(layout, group_size, N, K))


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, layout: str, group_size: int | None, dtype: torch.dtype
) -> torch.Tensor:
    N, K = q.shape
    gn, gk = L.int8_tile(layout, group_size, K)
    return (q.float() * _expand_scale(scale, gn, gk, N, K)).to(dtype)


def quantize_int8_act(x2d: torch.Tensor, group_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization, per token per K-group: x [M, K] ->
    (q int8 [M, K], scale float32 [M, ceil(K/group_k)])."""
    return quantize_int8_tiles(x2d, 1, group_k)


def linear_int8(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    layout: str,
    group_size: int | None,
    bias: torch.Tensor | None = None,
    act_quant: bool = True,
) -> torch.Tensor:
    """y = x W^T + b for an int8 weight; W8A8 when ``act_quant`` else weight-only."""
    N, K = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if not act_quant:
        w = dequantize_int8(q, scale, layout, group_size, torch.float32)
        y = x2.float() @ w.t()
    else:
        gn, gk = L.int8_tile(layout, group_size, K)
        xq, xs = quantize_int8_act(x2, L.act_group_k(layout, group_size, K))
        ws = scale.float().reshape(math.ceil(N / gn), -1).repeat_interleave(gn, 0)[:N]
        y = torch.zeros(x2.shape[0], N, dtype=torch.float32, device=x.device)
        for g in range(math.ceil(K / gk)):
            ks = slice(g * gk, min(K, (g + 1) * gk))
            # float64 holds every int8 dot exactly (|dot| <= 127^2 * K < 2^53).
            dot = (xq[:, ks].double() @ q[:, ks].double().t()).float()
            xs_g = xs[:, g if xs.shape[1] > 1 else 0]
            y += dot * (xs_g[:, None] * ws[None, :, g])
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, N)


# ----------------------------------------------------------------------------- double quantization
@lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed 8-bit dynamic map (Dettmers, "8-Bit Approximations for Parallelism in Deep
    # Learning"): a sign, a run of zero bits giving a decimal exponent 10^-(6..0), and
    # the remaining bits a linear fraction over [0.1, 1]; computed in float32 steps so
    # the values equal bitsandbytes' create_dynamic_map(signed=True).
    exp_bits, non_sign = 7, 7
    data: list[float] = []
    for i in range(exp_bits):
        items = 2 ** (i + non_sign - exp_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(exp_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device="cpu") -> torch.Tensor:
    """The 256 sorted float32 values of bitsandbytes' signed dynamic 8-bit map."""
    return _dynamic_map_cpu().to(device)


def quantize_absmax_nested(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes double quantization of 4-bit absmax: subtract the mean, then 8-bit
    dynamic-map codes in blocks of 256 by nearest value.
    Returns (codes uint8 [G], nested_absmax float32 [ceil(G/256)], code map float32 [256],
    offset float32 scalar)."""
    a = absmax.float().reshape(-1)
    offset = a.mean()
    centred = a - offset
    G = a.numel()
    blocks = math.ceil(G / L.DQ_BLOCK)
    padded = F.pad(centred, (0, blocks * L.DQ_BLOCK - G)).view(blocks, L.DQ_BLOCK)
    nested = padded.abs().amax(dim=1)
    recip = torch.where(nested > 0, 1.0 / nested, torch.zeros_like(nested))
    code = dynamic_map(a.device)
    codes = torch.bucketize(padded * recip[:, None], L.midpoints(code)).to(torch.uint8)
    return codes.reshape(-1)[:G].contiguous(), nested, code, offset.reshape(())


def dequantize_absmax_nested(
    codes: torch.Tensor, nested_absmax: torch.Tensor, code: torch.Tensor, offset: torch.Tensor | float
) -> torch.Tensor:
    """absmax = code[q] * nested_absmax[block] + offset, float32 [G] (two roundings, as bitsandbytes)."""
    G = codes.numel()
    blocks = nested_absmax.numel()
    vals = F.pad(code.float()[codes.long().reshape(-1)], (0, blocks * L.DQ_BLOCK - G))
    out = (vals.view(blocks, L.DQ_BLOCK) * nested_absmax.float()[:, None]).reshape(-1)[:G]
    offset = torch.as_tensor(offset, dtype=torch.float32, device=out.device)
    return out + offset
