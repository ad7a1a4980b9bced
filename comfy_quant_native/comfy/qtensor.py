"""Our five layouts as comfy-kitchen ``QuantizedTensor`` layouts.

Why a QuantizedTensor layout and not a parameter type of our own: ComfyUI's model
management already knows ``comfy_kitchen.tensor.QuantizedTensor``. Its ``.to()``,
``copy_``, ``empty_like`` and ``clone`` handlers move the packed data and every tensor
field of the params dataclass together; ``comfy.memory_management`` gathers and
scatters its inner tensors (``__tensor_flatten__``) for offload buffers, pinned memory
and dynamic VRAM; the mixed-precision ``Linear`` dequantizes it (``convert_weight``)
before a LoRA patch and requantizes after (``set_weight`` -> ``requantize_from_float``);
``torch.compile`` traces it as a wrapper subclass. A parameter type of our own would
have to re-implement each of these and would break on each ComfyUI change.

So a layer's weight is ``QuantizedTensor(qdata, "ComfyQuantNF4Layout", NativeParams)``:
``qdata`` is the packed uint8 (4-bit) or int8 [N, K] data exactly as on disk, and the
frozen ``NativeParams`` carries the float32 scale tensor (absmax or weight_scale), the
group size, the file's original dtype, and whether int8 runs W8A8. ``orig_dtype`` (what
``.dtype`` reports and what dequantize returns) is the compute dtype.

Linear: the ComfyUI ops class (comfy/ops.py) calls ``native_linear`` directly in eager
mode (the native kernels via comfy_quant_native.ops, no dispatcher). ``F.linear`` on one
of these tensors reaches the ``aten.linear`` handler below, which calls the
``torch.ops.comfy_quant.*`` custom ops: that is the path ``torch.compile`` traces, with
fake implementations and no graph break. Every other aten op dequantizes (kitchen's
fallback).

Needs comfy-kitchen, not ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from comfy_kitchen.tensor import (
    BaseLayoutParams,
    QuantizedLayout,
    QuantizedTensor,
    dequantize_args,
    register_layout_class,
    register_layout_op,
)

from .. import layouts as L
from .. import ops
from ..quantized import QuantizedWeight, QuantParams


@dataclass(frozen=True)
class NativeParams(BaseLayoutParams):
    """scale: float32 absmax [ceil(n/B)] (4-bit) or weight_scale (int8, layouts.scale_shape).
    orig_dtype: the compute dtype (dequantize output); orig_shape: (N, K)."""

    group_size: int = 0  # 0 for int8_row (one group per row)
    source_dtype: torch.dtype = torch.bfloat16  # dtype the weight had before quantization
    w8a8: bool = True  # int8 only: quantize activations per token and run the int8 GEMM
    transposed: bool = False  # a logical W^T (aten.t), as F.linear decomposes to t + mm

    def _tensor_fields(self) -> list[str]:
        return ["scale"]


class NativeLayout(QuantizedLayout):
    """Base of the five layouts; ``LAYOUT`` is one of comfy_quant_native.layouts.LAYOUTS."""

    LAYOUT: str = ""
    Params = NativeParams

    @classmethod
    def quantize(cls, tensor: torch.Tensor, group_size: int | None = None, source_dtype=None,
                 w8a8: bool = True, **_ignored) -> tuple[torch.Tensor, NativeParams]:
        """Round-to-nearest quantization on the tensor's device. ComfyUI's requantize
        passes ``scale="recalculate"``, ``stochastic_rounding``, ``inplace_ops``: ignored,
        because our scales are always recomputed and rounding is always to nearest."""
        qw = QuantizedWeight.from_float(tensor, cls.LAYOUT, group_size or None)
        return qw.data, NativeParams(
            scale=qw.scale,
            orig_dtype=tensor.dtype,
            orig_shape=tuple(tensor.shape),
            group_size=qw.params.group_size or 0,
            source_dtype=source_dtype or tensor.dtype,
            w8a8=w8a8,
        )

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: NativeParams) -> torch.Tensor:
        # Through the custom ops: this also runs under torch.compile and fake tensors.
        group = params.group_size or None
        if cls.LAYOUT in L.FOUR_BIT:
            return torch.ops.comfy_quant.dequantize_4bit(qdata, params.scale, cls.LAYOUT, group,
                                                         list(params.orig_shape), params.orig_dtype)
        return torch.ops.comfy_quant.dequantize_int8(qdata, params.scale, cls.LAYOUT, group,
                                                     params.orig_dtype)

    @classmethod
    def get_plain_tensors(cls, qtensor: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        return qtensor._qdata, qtensor._params.scale

    @classmethod
    def state_dict_tensors(cls, qdata: torch.Tensor, params: NativeParams) -> dict[str, torch.Tensor]:
        # Suffixes after "<layer>.weight". The int8 scale is "<layer>.weight_scale" on disk;
        # the 4-bit "<layer>.absmax" is not a suffix of ".weight" and is written by the ops
        # class's state_dict (comfy/ops.py), like the comfy_quant JSON.
        if cls.LAYOUT in L.FOUR_BIT:
            return {"": qdata}
        return {"": qdata, "_scale": params.scale}

    @classmethod
    def requantize_kwargs(cls, qtensor: QuantizedTensor) -> dict:
        p = qtensor._params
        return {"group_size": p.group_size or None, "source_dtype": p.source_dtype, "w8a8": p.w8a8}


class ComfyQuantNF4Layout(NativeLayout):
    LAYOUT = "nf4"


class ComfyQuantFP4Layout(NativeLayout):
    LAYOUT = "fp4"


class ComfyQuantInt8BlockLayout(NativeLayout):
    LAYOUT = "int8_block"


class ComfyQuantInt8LodeLayout(NativeLayout):
    LAYOUT = "int8_lode"


class ComfyQuantInt8RowLayout(NativeLayout):
    LAYOUT = "int8_row"


LAYOUT_CLASSES = {
    c.LAYOUT: c
    for c in (ComfyQuantNF4Layout, ComfyQuantFP4Layout, ComfyQuantInt8BlockLayout,
              ComfyQuantInt8LodeLayout, ComfyQuantInt8RowLayout)
}
LAYOUT_NAME = {layout: c.__name__ for layout, c in LAYOUT_CLASSES.items()}
_LAYOUT_OF_NAME = {name: layout for layout, name in LAYOUT_NAME.items()}

for _cls in LAYOUT_CLASSES.values():
    register_layout_class(_cls.__name__, _cls)


# ----------------------------------------------------------------------------- helpers
def layout_of(t) -> str | None:
    """Our layout name ('nf4', ...) if ``t`` is one of our quantized tensors, else None."""
    if isinstance(t, QuantizedTensor):
        return _LAYOUT_OF_NAME.get(t._layout_cls)
    return None


def is_native(t) -> bool:
    return layout_of(t) is not None


def from_quantized_weight(qw: QuantizedWeight, compute_dtype: torch.dtype | None = None,
                          w8a8: bool = True) -> QuantizedTensor:
    """Wrap a QuantizedWeight (shares its tensors). ``compute_dtype`` defaults to the
    weight's original dtype."""
    p = qw.params
    params = NativeParams(
        scale=qw.scale,
        orig_dtype=compute_dtype or p.orig_dtype,
        orig_shape=tuple(p.shape),
        group_size=p.group_size or 0,
        source_dtype=p.orig_dtype,
        w8a8=w8a8,
    )
    return QuantizedTensor(qw.data, LAYOUT_NAME[p.layout], params)


def to_quantized_weight(qt: QuantizedTensor) -> QuantizedWeight:
    """The QuantizedWeight view of one of our tensors (shares its tensors)."""
    layout = layout_of(qt)
    if layout is None:
        raise TypeError(f"not a comfy_quant_native quantized tensor: {qt!r}")
    p = qt._params
    params = QuantParams(layout, p.group_size or None, tuple(p.orig_shape), p.source_dtype)
    return QuantizedWeight(params, qt._qdata, p.scale)


def quantize(w: torch.Tensor, layout: str, group_size: int | None = None, compute_dtype=None,
             w8a8: bool = True) -> QuantizedTensor:
    """Quantize a float weight [N, K] into one of our tensors on ``w``'s device."""
    L.check_layout(layout)
    qdata, params = LAYOUT_CLASSES[layout].quantize(w, group_size=group_size, w8a8=w8a8)
    if compute_dtype is not None:
        params = replace(params, orig_dtype=compute_dtype)  # no copy, unlike .to(dtype)
    return QuantizedTensor(qdata, LAYOUT_NAME[layout], params)


def native_linear(weight: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias with the native kernels (eager: straight to _C; compiling: custom ops)."""
    layout = layout_of(weight)
    p = weight._params
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if layout in L.FOUR_BIT:
        return ops.linear_4bit(x, weight._qdata, p.scale, layout, p.group_size, p.orig_shape, bias)
    return ops.linear_int8(x, weight._qdata, p.scale, layout, p.group_size or None, bias, p.w8a8)


def _custom_op_linear(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The dispatch-handler linear: custom ops, so that torch.compile traces it."""
    layout = layout_of(weight)
    p = weight._params
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if layout in L.FOUR_BIT:
        return torch.ops.comfy_quant.linear_4bit(x, weight._qdata, p.scale, layout, p.group_size,
                                                 list(p.orig_shape), bias)
    return torch.ops.comfy_quant.linear_int8(x, weight._qdata, p.scale, layout, p.group_size or None,
                                             bias, p.w8a8)


def _plain(t) -> bool:
    return t is None or (isinstance(t, torch.Tensor) and not isinstance(t, QuantizedTensor))


# F.linear reaches __torch_dispatch__ as aten.linear (pre-dispatch tracing) or, decomposed,
# as aten.t(W) followed by aten.mm(x, W^T) or aten.addmm(b, x, W^T). Anything else, and
# any call with a quantized input, falls back to dequantizing.
def native_linear_lora(weight: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None,
                       down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y = x (W + up down)^T + bias, eager. Where the native linear dequantizes the weight
    anyway (4-bit, or int8 weight-only, above the fused small-M kernels), the low-rank
    delta is added to that float weight (one N x R x K product) before the one GEMM;
    otherwise (W8A8, few tokens) it runs beside the native linear as two thin GEMMs."""
    layout = layout_of(weight)
    p = weight._params
    M = x.numel() // max(x.shape[-1], 1)
    backend = ops.backend_for(x.device)
    dequantizes = layout in L.FOUR_BIT or not p.w8a8
    if dequantizes and backend != "reference" and M > ops.fused_max_m(layout, backend, x.dtype):
        if layout in L.FOUR_BIT:
            w = ops.dequantize_4bit(weight._qdata, p.scale, layout, p.group_size, p.orig_shape, x.dtype)
        else:
            w = ops.dequantize_int8(weight._qdata, p.scale, layout, p.group_size or None, x.dtype)
        w.addmm_(up.to(x.dtype), down.to(x.dtype))
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    out = native_linear(weight, x, bias)
    return out + F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))


@register_layout_op(torch.ops.aten.linear.default, NativeLayout)
def _handle_linear(qt, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not (_plain(x) and _plain(bias) and is_native(weight) and not weight._params.transposed):
        return torch.nn.functional.linear(*dequantize_args((x, weight, bias)))
    return _custom_op_linear(x, weight, bias)


@register_layout_op(torch.ops.aten.t.default, NativeLayout)
def _handle_t(qt, args, kwargs):
    w = args[0]
    p = w._params
    params = replace(p, orig_shape=(p.orig_shape[1], p.orig_shape[0]), transposed=not p.transposed)
    return QuantizedTensor(w._qdata, w._layout_cls, params)


def _untransposed(w: QuantizedTensor) -> QuantizedTensor:
    p = w._params
    return QuantizedTensor(w._qdata, w._layout_cls,
                           replace(p, orig_shape=(p.orig_shape[1], p.orig_shape[0]), transposed=False))


@register_layout_op(torch.ops.aten.mm.default, NativeLayout)
def _handle_mm(qt, args, kwargs):
    x, w = args[0], args[1]
    if _plain(x) and is_native(w) and w._params.transposed and not kwargs:
        return _custom_op_linear(x, _untransposed(w), None)
    return torch.mm(*dequantize_args(args), **dequantize_args(kwargs))


@register_layout_op(torch.ops.aten.addmm.default, NativeLayout)
def _handle_addmm(qt, args, kwargs):
    bias, x, w = args[0], args[1], args[2]
    plain_scaling = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1 and len(args) == 3
    if (plain_scaling and _plain(x) and _plain(bias) and bias.dim() == 1 and is_native(w)
            and w._params.transposed):
        return _custom_op_linear(x, _untransposed(w), bias)
    return torch.addmm(*dequantize_args(args), **dequantize_args(kwargs))
