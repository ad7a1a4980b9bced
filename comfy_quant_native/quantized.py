"""QuantizedWeight: one layer's quantized weight in memory, in any layout.

The runtime object every other part uses: the converter makes them, formats/ turns
them into file tensors and back, the ComfyUI glue runs ``linear`` on them. Quant
params are a frozen dataclass; the tensors ride beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from . import layouts as L
from . import ops


@dataclass(frozen=True)
class QuantParams:
    layout: str  # nf4, fp4, int8_block, int8_lode, int8_row
    group_size: int | None  # None for int8_row
    shape: tuple[int, ...]  # the weight's original shape, (N, K) for a linear layer
    orig_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        L.check_layout(self.layout)
        if self.layout in L.INT8 and len(self.shape) != 2:
            raise ValueError(f"{self.layout} needs a 2-D [N, K] weight, got shape {self.shape}")
        L.check_group_size(self.layout, self.group_size, self.shape[-1] if self.shape else None)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def N(self) -> int:
        return self.shape[0]

    @property
    def K(self) -> int:
        return math.prod(self.shape[1:])


@dataclass(frozen=True)
class NestedAbsmax:
    """bitsandbytes double quantization of a 4-bit absmax (compress_statistics)."""

    codes: torch.Tensor  # uint8 [G]
    nested_absmax: torch.Tensor  # float32 [ceil(G/256)]
    quant_map: torch.Tensor  # float32 [256]
    offset: float

    def dequantize(self) -> torch.Tensor:
        return ops.dequantize_absmax_nested(self.codes, self.nested_absmax, self.quant_map, self.offset)

    def to(self, device) -> NestedAbsmax:
        return replace(self, codes=self.codes.to(device), nested_absmax=self.nested_absmax.to(device),
                       quant_map=self.quant_map.to(device))


class QuantizedWeight:
    """A quantized weight: ``data`` (packed uint8 for 4-bit, int8 [N, K] for int8) and
    ``scale`` (float32 absmax for 4-bit, weight_scale for int8), plus params.
    A 4-bit weight loaded with double-quantized absmax keeps ``nested`` so that it is
    saved back the same way; ``scale`` holds the decoded absmax the kernels read."""

    __slots__ = ("params", "data", "scale", "nested")

    def __init__(self, params: QuantParams, data: torch.Tensor, scale: torch.Tensor,
                 nested: NestedAbsmax | None = None):
        self.params = params
        self.data = data
        self.scale = scale
        self.nested = nested
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(cls, w: torch.Tensor, layout: str, group_size: int | None = None,
                   double_quant: bool = False) -> QuantizedWeight:
        """Quantize a float weight (round to nearest)."""
        L.check_layout(layout)
        if layout in L.FOUR_BIT:
            g = L.check_group_size(layout, group_size)
            packed, absmax = ops.quantize_4bit(w, layout, g)
            params = QuantParams(layout, g, tuple(w.shape), w.dtype)
            nested = None
            if double_quant:
                codes, nested_absmax, qmap, offset = ops.quantize_absmax_nested(absmax)
                nested = NestedAbsmax(codes, nested_absmax, qmap, float(offset))
                absmax = nested.dequantize()  # the kernels run on what the file holds
            return cls(params, packed, absmax, nested)
        if w.dim() != 2:
            raise ValueError(f"{layout} quantizes 2-D [N, K] weights, got shape {tuple(w.shape)}")
        g = L.check_group_size(layout, group_size, w.shape[1])
        q, scale = ops.quantize_int8(w, layout, g)
        return cls(QuantParams(layout, g, tuple(w.shape), w.dtype), q, scale)

    def validate(self) -> None:
        p = self.params
        if p.layout in L.FOUR_BIT:
            ops.check_tensor(self.data, "packed weight", dtype=torch.uint8, shape=((p.numel + 1) // 2,))
            ops.check_tensor(self.scale, "absmax", dtype=torch.float32,
                             shape=(math.ceil(p.numel / p.group_size),), device=self.data.device)
        else:
            ops.check_tensor(self.data, "qweight", dtype=torch.int8, shape=p.shape)
            ops.check_tensor(self.scale, "weight_scale", dtype=torch.float32,
                             shape=L.scale_shape(p.layout, p.group_size, p.N, p.K), device=self.data.device)

    # ------------------------------------------------------------------ use
    @property
    def layout(self) -> str:
        return self.params.layout

    @property
    def shape(self) -> tuple[int, ...]:
        return self.params.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        p = self.params
        dtype = dtype or p.orig_dtype
        if p.layout in L.FOUR_BIT:
            return ops.dequantize_4bit(self.data, self.scale, p.layout, p.group_size, p.shape, dtype)
        return ops.dequantize_int8(self.data, self.scale, p.layout, p.group_size, dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, act_quant: bool = True) -> torch.Tensor:
        """y = x W^T + bias. int8 layouts run W8A8 unless ``act_quant`` is False."""
        p = self.params
        if p.layout in L.FOUR_BIT:
            return ops.linear_4bit(x, self.data, self.scale, p.layout, p.group_size, (p.N, p.K), bias)
        return ops.linear_int8(x, self.data, self.scale, p.layout, p.group_size, bias, act_quant)

    def to(self, device=None, non_blocking: bool = False) -> QuantizedWeight:
        if device is None or torch.device(device) == self.device:
            return self
        return QuantizedWeight(
            self.params,
            self.data.to(device, non_blocking=non_blocking),
            self.scale.to(device, non_blocking=non_blocking),
            None if self.nested is None else self.nested.to(device),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (the kernels' tensors; nested codes are not kept on the hot path)."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.params.numel

    def __repr__(self) -> str:
        p = self.params
        g = "" if p.group_size is None else f", group_size={p.group_size}"
        dq = ", double_quant" if self.nested is not None else ""
        return f"QuantizedWeight({p.layout}, shape={p.shape}{g}{dq}, device={self.device})"
