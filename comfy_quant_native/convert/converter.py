"""Converter: one weight in, the file tensors of that layer out.

    from comfy_quant_native import Converter
    conv = Converter("nf4", group_size=64, rounding="mse")
    tensors = conv.convert("double_blocks.0.img_attn.qkv", w)   # w: [N, K] float
    # {"double_blocks.0.img_attn.qkv.weight": uint8 [N*K/2],
    #  "double_blocks.0.img_attn.qkv.absmax": float32 [N*K/64],
    #  "double_blocks.0.img_attn.qkv.comfy_quant": uint8 JSON {"format": "bnb_nf4", ...}}

Formats (the names of the CLI's --format): nf4, fp4, int8_blockwise, int8_lodewise and
int8_tensorwise (per-row scales) in this package's ``comfy_quant`` form (formats/), and
float8_e4m3fn in ComfyUI's own form: ``L.weight`` float8_e4m3fn, ``L.weight_scale``
float32 scalar, ``L.comfy_quant`` {"format": "float8_e4m3fn"}, which stock ComfyUI's
mixed-precision ops load (comfy/ops.py, QUANT_ALGOS["float8_e4m3fn"]).
"""

from __future__ import annotations

import torch

from .. import formats
from .. import layouts as L
from ..formats.common import json_tensor
from ..presets import shape_problem
from ..quantized import QuantizedWeight, QuantParams
from . import rounding as R
from .safetensors_stream import OutputSpec

FORMATS = ("nf4", "fp4", "int8_blockwise", "int8_lodewise", "int8_tensorwise", "float8_e4m3fn")
LAYOUT_OF_FORMAT = {
    "nf4": "nf4",
    "fp4": "fp4",
    "int8_blockwise": "int8_block",
    "int8_lodewise": "int8_lode",
    "int8_tensorwise": "int8_row",
    "float8_e4m3fn": None,
}
FP8_JSON = {"format": "float8_e4m3fn"}


def layer_prefix(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


class Converter:
    """Quantizes one weight at a time into the tensors a file holds for that layer.

    format      one of FORMATS
    group_size  values per scale (4-bit: 32-4096, default 64; int8_blockwise/lodewise:
                32-512, default 128); None for int8_tensorwise and float8_e4m3fn
    rounding    "nearest" (exact, the kernels' rounding) or "mse" (per-group scale
                search, see convert/rounding.py; not for float8_e4m3fn)
    device      where the quantization runs ("cpu", "cuda", "cuda:1"); results come
                back on the CPU
    """

    def __init__(self, format: str = "nf4", group_size: int | None = None, rounding: str = "nearest",
                 device: str | torch.device = "cpu"):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
        self.format = format
        self.layout = LAYOUT_OF_FORMAT[format]
        if self.layout is None or self.layout == "int8_row":
            if group_size not in (None, 0):
                raise ValueError(f"{format} has one scale per {'tensor' if self.layout is None else 'row'}; "
                                 f"a group size ({group_size}) does not apply")
            self.group_size = None
        else:
            self.group_size = L.check_group_size(self.layout, group_size)
        if rounding not in R.ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(R.ROUNDINGS)}; got {rounding!r}")
        if rounding == "mse" and self.layout not in R.MSE_LAYOUTS:
            raise ValueError(f"rounding 'mse' does not lower the error of {format} (docs/QUALITY.md); use 'nearest'")
        self.rounding = rounding
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA device")

    def __repr__(self) -> str:
        g = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"Converter({self.format!r}{g}, rounding={self.rounding!r}, device={str(self.device)!r})"

    # ------------------------------------------------------------------ shapes
    def shape_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why a weight of ``shape`` cannot be converted (None: it can)."""
        return shape_problem(self.layout, self.group_size, tuple(shape))

    def _check(self, name: str, shape, dtype) -> None:
        if dtype not in L.FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a float32/float16/bfloat16 weight, got {dtype}")
        problem = self.shape_problem(tuple(shape))
        if problem:
            raise ValueError(f"{name} {list(shape)}: cannot take {self.format}: {problem}")

    def plan(self, name: str, shape, dtype: torch.dtype = torch.bfloat16) -> list[OutputSpec]:
        """The keys, dtypes and shapes ``convert`` will return, without computing them."""
        prefix = layer_prefix(name)
        shape = tuple(int(s) for s in shape)
        self._check(prefix, shape, dtype)
        if self.layout is None:
            return [OutputSpec(f"{prefix}.weight", torch.float8_e4m3fn, shape),
                    OutputSpec(f"{prefix}.weight_scale", torch.float32, ()),
                    OutputSpec(f"{prefix}.comfy_quant", torch.uint8, tuple(json_tensor(FP8_JSON).shape))]
        params = QuantParams(self.layout, self.group_size, shape, dtype)
        data_dtype = torch.uint8 if self.layout in L.FOUR_BIT else torch.int8
        N, K = params.N, params.K
        meta = QuantizedWeight(
            params,
            torch.empty(L.packed_shape(self.layout, N, K), dtype=data_dtype, device="meta"),
            torch.empty(L.scale_shape(self.layout, self.group_size, N, K), dtype=torch.float32, device="meta"),
        )
        tensors = formats.layer_tensors(prefix, meta)
        return [OutputSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]

    # ------------------------------------------------------------------ work
    def quantize(self, name: str, w: torch.Tensor) -> QuantizedWeight:
        """The weight as a QuantizedWeight (on ``device``); not for float8_e4m3fn."""
        if self.layout is None:
            raise ValueError("float8_e4m3fn is ComfyUI's own format; use convert()")
        self._check(layer_prefix(name), w.shape, w.dtype)
        w = w.to(self.device)
        try:
            return R.quantize_weight(w, self.layout, self.group_size, self.rounding)
        except ValueError as e:
            raise ValueError(f"{layer_prefix(name)}: {e}") from None

    def convert(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The file tensors of layer ``name`` (the module path, or its ``.weight`` key):
        data, scales and the ``comfy_quant`` JSON, all on the CPU."""
        prefix = layer_prefix(name)
        if self.layout is None:
            self._check(prefix, w.shape, w.dtype)
            try:
                q, scale = R.quantize_fp8(w.to(self.device))
            except ValueError as e:
                raise ValueError(f"{prefix}: {e}") from None
            out = {f"{prefix}.weight": q, f"{prefix}.weight_scale": scale,
                   f"{prefix}.comfy_quant": json_tensor(FP8_JSON)}
        else:
            qw = self.quantize(prefix, w)
            out = formats.layer_tensors(prefix, qw)  # int8_tensorwise scales as [N, 1], as stock ComfyUI reads them
        return {k: v.cpu() for k, v in out.items()}
