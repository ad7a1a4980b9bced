"""How one weight becomes codes and scales: the rounding methods of the converter.

``nearest`` (the default): round to nearest with absmax scales, exactly what the native
kernels compute (``QuantizedWeight.from_float``), bit for bit.

``mse``: per-group scale search. The file stores one scale per group (4-bit: absmax per
B consecutive values; int8: one per tile), and dequantization is ``table[code] * scale``
whatever scale is stored, so the scale is free. For each group we round to nearest at
the absmax scale shrunk by SEARCH_FACTORS (clipping the group's largest values), then
REFIT_ROUNDS times more at the best scale found. Each candidate's codes are scored by the
squared error of the group after refitting its scale so that the reconstruction has no
bias (<w_hat, w> = <w, w>, see _Best); the best codes are stored with that scale. The
absmax scale is the first candidate, so no group scores worse than round-to-nearest's
codes. 4-bit candidates are rounded by the native kernels themselves (a group clamped to
+-s has absmax s), so the codes are the kernels' codes at that scale. Measured in
docs/QUALITY.md; offered only for the layouts where it lowers the layer's output error
on every layer measured: MSE_LAYOUTS.

float8_e4m3fn (ComfyUI's per-tensor scaled fp8): scale = amax / 448, x * (1/scale) in
float32 rounded to nearest-even e4m3 (torch's cast; the largest value is 448 give or take
an ulp, far below 480 where the cast would give NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import layouts as L
from .. import ops
from ..quantized import QuantizedWeight, QuantParams

ROUNDINGS = ("nearest", "mse")
# Layouts where ``mse`` lowers the output error on realistic weights (docs/QUALITY.md).
# Not int8: lodewise / tensorwise gain < 1%, and blockwise, whose one scale spans 128
# rows, lost up to 10% on modulation-like inputs in some runs while winning 2-6% in others.
MSE_LAYOUTS = ("nf4", "fp4")

# Clipping factors tried (1.0 is round-to-nearest), then re-roundings at the refitted
# scale; 21 factors down to 0.5 bought < 0.2% output error in trial runs, at 2x the time.
SEARCH_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
REFIT_ROUNDS = 3
CHUNK_ELEMENTS = 1 << 20  # elements per search step on a CPU: bounded temporaries, cache friendly
CHUNK_ELEMENTS_GPU = 1 << 24  # on a GPU: fewer, larger launches (~0.5 GB of temporaries)


def _chunk(device: torch.device) -> int:
    return CHUNK_ELEMENTS_GPU if device.type == "cuda" else CHUNK_ELEMENTS

FP8_MAX = 448.0
FP8_CHUNK = 1 << 20  # float32 buffer of 4 MB: stays in cache, amortizes the op overhead


# ----------------------------------------------------------------------------- fp8
def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's per-tensor scaled float8_e4m3fn: (qdata float8_e4m3fn [same shape],
    scale float32 []), dequant = qdata.float() * scale."""
    lo, hi = torch.aminmax(w.reshape(-1))
    amax = torch.maximum(-lo, hi).float()
    if not bool(torch.isfinite(amax)):
        raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or Inf")
    scale = amax / FP8_MAX if float(amax) > 0 else torch.ones((), dtype=torch.float32, device=w.device)
    inv = float((1.0 / scale).to(torch.float32))
    out = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    flat_in, flat_out = w.reshape(-1), out.view(-1)
    # One float32 buffer reused chunk by chunk: fresh large temporaries cost a page
    # fault per 4 kB, which is most of the time of a whole-tensor version.
    buf = torch.empty(min(FP8_CHUNK, flat_in.numel()), dtype=torch.float32, device=w.device)
    for i in range(0, flat_in.numel(), buf.numel()):
        n = min(buf.numel(), flat_in.numel() - i)
        b = buf[:n]
        b.copy_(flat_in[i : i + n])
        b.mul_(inv)  # |b| <= amax * inv = 448 (+1 ulp), which rounds to 448: no clamp needed
        flat_out[i : i + n].copy_(b)
    return out, scale.reshape(()).to(torch.float32)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


# ----------------------------------------------------------------------------- search core
class _Best:
    """Per-group best candidate so far. A candidate is a set of codes (rounded to nearest
    at some scale; ``deq`` their dequantized values at that scale, ``s``) and is scored
    without its bias: the scale is refitted so that the group's reconstruction w_hat has
    <w_hat, w> = <w, w> (no shrinkage toward zero), and the score is ||w_hat - w||^2.
    A shrunken group errs coherently, in the direction of the weights themselves, and
    coherent errors add up in x W^T instead of averaging out; docs/QUALITY.md measured
    plain least squares losing to round-to-nearest on modulation-like inputs."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.ww = x.square().sum(1)
        self.err = torch.full_like(self.ww, float("inf"))
        self.scale = torch.zeros_like(self.ww)  # the scale to store
        self.codes: torch.Tensor | None = None  # packed 4-bit codes or int8 values, per group

    def consider(self, deq: torch.Tensor, s: torch.Tensor, codes: torch.Tensor) -> None:
        dw = (deq * self.x).sum(1)
        ok = (dw > 0) & (s > 0)
        gain = torch.where(ok, self.ww / torch.where(ok, dw, torch.ones_like(dw)), torch.ones_like(dw))
        err = (deq * gain[:, None] - self.x).square_().sum(1)
        better = err < self.err
        self.err = torch.where(better, err, self.err)
        self.scale = torch.where(better, s * gain, self.scale)
        self.codes = codes.clone() if self.codes is None else torch.where(better[:, None], codes, self.codes)

    def rounding_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """The stored scale as a scale to round at (kept <= absmax: see _quantize_4bit_at)."""
        return torch.minimum(self.scale, absmax)


def _search(x: torch.Tensor, absmax: torch.Tensor, round_at) -> _Best:
    """x [G, E] float32 groups; absmax [G] the round-to-nearest scales; ``round_at(s)`` ->
    (dequantized [G, E], scale used [G], codes [G, *]). Tries SEARCH_FACTORS * absmax,
    then REFIT_ROUNDS re-roundings at the best stored scale."""
    best = _Best(x)
    for c in SEARCH_FACTORS:
        best.consider(*round_at(absmax * c))
    for _ in range(REFIT_ROUNDS):
        best.consider(*round_at(best.rounding_scale(absmax)))
    return best


# ----------------------------------------------------------------------------- 4-bit
def _quantize_4bit_at(x: torch.Tensor, s: torch.Tensor, codebook: str, group_size: int):
    """Round-to-nearest codes of groups x [G, B] at scales s [G] (each <= the group's
    absmax), by the native kernels: clamping a group to +-s makes its absmax exactly s,
    and values beyond +-s take the end codes either way. Returns (dequantized [G, B]
    float32, scales as the kernel computed them [G], packed [G, B/2])."""
    clipped = torch.minimum(torch.maximum(x, -s[:, None]), s[:, None])
    packed, scale = ops.quantize_4bit(clipped.reshape(-1), codebook, group_size)
    deq = ops.dequantize_4bit(packed, scale, codebook, group_size, (x.numel(),), torch.float32)
    return deq.view(x.shape), scale, packed.view(x.shape[0], -1)


def quantize_4bit_mse(w: torch.Tensor, codebook: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2)], scale float32 [ceil(n/B)]) with searched scales."""
    flat = w.reshape(-1)
    n = flat.numel()
    G = math.ceil(n / group_size)
    scales = torch.empty(G, dtype=torch.float32, device=w.device)
    packed = torch.empty(G, group_size // 2, dtype=torch.uint8, device=w.device)
    step = max(1, _chunk(w.device) // group_size)
    for g0 in range(0, G, step):
        g1 = min(G, g0 + step)
        x = flat[g0 * group_size : min(n, g1 * group_size)].float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or Inf")
        # zero padding of the last group: codes of 0.0, the same as the odd-count pad
        x = F.pad(x, (0, (g1 - g0) * group_size - x.numel())).view(g1 - g0, group_size)
        best = _search(x, x.abs().amax(1), lambda s: _quantize_4bit_at(x, s, codebook, group_size))
        packed[g0:g1], scales[g0:g1] = best.codes, best.scale
    return packed.reshape(-1)[: (n + 1) // 2].contiguous(), scales


# ----------------------------------------------------------------------------- int8
def _round_int8_at(x: torch.Tensor, s: torch.Tensor):
    q = torch.round(x / torch.where(s > 0, s, torch.ones_like(s))[:, None]).clamp_(-L.INT8_QMAX, L.INT8_QMAX)
    q = torch.where((s > 0)[:, None], q, torch.zeros_like(q))
    return q * s[:, None], s, q


def quantize_int8_mse(w: torch.Tensor, layout: str, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale float32 in layouts.scale_shape) with searched tile scales."""
    N, K = w.shape
    gn, gk = L.int8_tile(layout, group_size, K)
    kb = math.ceil(K / gk)
    q_out = torch.empty(N, K, dtype=torch.int8, device=w.device)
    s_out = torch.empty(math.ceil(N / gn), kb, dtype=torch.float32, device=w.device)
    rows_per_step = max(gn, (_chunk(w.device) // max(K, 1)) // gn * gn)
    for r0 in range(0, N, rows_per_step):
        r1 = min(N, r0 + rows_per_step)
        nb = math.ceil((r1 - r0) / gn)
        x = w[r0:r1].float()
        tiles = F.pad(x, (0, kb * gk - K, 0, nb * gn - (r1 - r0))).view(nb, gn, kb, gk)
        groups = tiles.permute(0, 2, 1, 3).reshape(nb * kb, gn * gk)
        absmax = groups.abs().amax(1)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or Inf")
        best = _search(groups, absmax / L.INT8_QMAX, lambda s: _round_int8_at(groups, s))
        q = best.codes.view(nb, kb, gn, gk).permute(0, 2, 1, 3).reshape(nb * gn, kb * gk)
        q_out[r0:r1] = q[: r1 - r0, :K].to(torch.int8)
        s_out[r0 // gn : r0 // gn + nb] = best.scale.view(nb, kb)
    return q_out, s_out.reshape(L.scale_shape(layout, group_size, N, K))


# ----------------------------------------------------------------------------- entry
def quantize_weight(w: torch.Tensor, layout: str, group_size: int | None, rounding: str = "nearest") -> QuantizedWeight:
    """One weight as a QuantizedWeight in ``layout`` by ``rounding``."""
    if rounding == "nearest":
        return QuantizedWeight.from_float(w, layout, group_size)
    if rounding != "mse":
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if layout not in MSE_LAYOUTS:
        raise ValueError(f"rounding 'mse' is not offered for {layout}")
    g = L.check_group_size(layout, group_size, w.shape[-1] if w.dim() else None)
    params = QuantParams(layout, g, tuple(w.shape), w.dtype)
    if layout in L.FOUR_BIT:
        packed, scale = quantize_4bit_mse(w, layout, g)
        return QuantizedWeight(params, packed, scale)
    q, scale = quantize_int8_mse(w, layout, g)
    return QuantizedWeight(params, q, scale)
