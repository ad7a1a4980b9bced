"""Our form: ComfyUI's per-layer ``comfy_quant`` JSON beside the data and scale tensors
(DESIGN.md "On-disk formats"). Layer ``L``, weight ``[N, K]`` (any shape for 4-bit):

    bnb_nf4 / bnb_fp4
        L.weight       uint8 [ceil(n/2)], n = numel, flattened row-major,
                       element 2j in the HIGH nibble; an odd n pads the last low nibble
                       with the code of 0.0
        L.absmax       float32 [ceil(n/B)], B = group_size
        L.comfy_quant  {"format": "bnb_nf4"|"bnb_fp4", "group_size": B,
                        "orig_shape": [N, K], "orig_dtype": "bfloat16"|"float16"|"float32",
                        "nibble_order": "hi"}
      double-quantized absmax (bitsandbytes compress_statistics), "double_quant": true and
        L.absmax            uint8 [G] codes of the 8-bit dynamic map, G = ceil(n/B)
        L.nested_absmax     float32 [ceil(G/256)]
        L.nested_quant_map  float32 [256]
        L.nested_offset     float32 [] (the mean subtracted before quantizing)
      absmax = nested_quant_map[code] * nested_absmax[g // 256] + nested_offset (float32)

    int8_blockwise / int8_lodewise
        L.weight       int8 [N, K]
        L.weight_scale float32 [ceil(N/B), ceil(K/B)] (blockwise) or [N, ceil(K/B)] (lodewise)
        L.comfy_quant  {"format": "int8_blockwise"|"int8_lodewise", "group_size": B,
                        "orig_dtype": ...}
    int8_tensorwise (per row; ComfyUI's own name)
        L.weight       int8 [N, K]
        L.weight_scale float32 [N, 1] as stock ComfyUI reads it (read also: [N], or one value)
        L.comfy_quant  {"format": "int8_tensorwise", "per_row": true, "orig_dtype": ...}

``orig_dtype`` of int8 layers is optional (an addition to ComfyUI's JSON, which ignores it);
absent, bfloat16. Other JSON fields (``full_precision_matrix_mult``...) are kept in
``LoadedStateDict.configs``. ``L.input_scale`` (a static activation scale; we quantize
activations dynamically) is read and dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import layouts as L
from ..quantized import NestedAbsmax, QuantizedWeight, QuantParams
from .common import (DTYPE_NAMES, FormatError, as_bytes, check, dtype_of_name, int_field, json_tensor,
                     shape_field)

KNOWN_FIELDS = ("format", "group_size", "orig_shape", "orig_dtype", "nibble_order", "double_quant", "per_row")
NESTED_SUFFIXES = ("nested_absmax", "nested_quant_map", "nested_offset")


# ----------------------------------------------------------------------------- writing
def layer_json(qw: QuantizedWeight) -> dict:
    p = qw.params
    meta: dict = {"format": L.DISK_NAME[p.layout], "orig_dtype": DTYPE_NAMES.get(p.orig_dtype, "bfloat16")}
    if p.layout in L.FOUR_BIT:
        meta.update(group_size=p.group_size, orig_shape=list(p.shape), nibble_order="hi")
        if qw.nested is not None:
            meta["double_quant"] = True
    elif p.layout == "int8_row":
        meta["per_row"] = True
    else:
        meta["group_size"] = p.group_size
    return meta


def layer_tensors(prefix: str, qw: QuantizedWeight, *, with_json: bool = True) -> dict[str, torch.Tensor]:
    """The file tensors of one quantized layer, keys under ``prefix``. ``with_json=False``
    leaves out ``prefix.comfy_quant`` (the _quantization_metadata header form)."""
    out = {f"{prefix}.weight": qw.data}
    if with_json:
        out[f"{prefix}.comfy_quant"] = json_tensor(layer_json(qw))
    if qw.layout in L.FOUR_BIT:
        if qw.nested is not None:
            out[f"{prefix}.absmax"] = qw.nested.codes
            out[f"{prefix}.nested_absmax"] = qw.nested.nested_absmax
            out[f"{prefix}.nested_quant_map"] = qw.nested.quant_map
            out[f"{prefix}.nested_offset"] = torch.tensor(qw.nested.offset, dtype=torch.float32)
        else:
            out[f"{prefix}.absmax"] = qw.scale
    else:
        # int8_tensorwise scales go to disk as [N, 1]: stock ComfyUI dequantizes with
        # q.float() * scale, which broadcasts per row only in that shape.
        scale = qw.scale.reshape(-1, 1) if qw.layout == "int8_row" else qw.scale
        out[f"{prefix}.weight_scale"] = scale
    return out


# ----------------------------------------------------------------------------- the JSON
@dataclass(frozen=True)
class LayerSpec:
    """One layer's JSON, validated: what the tensors must look like."""

    layout: str
    group_size: int | None
    shape: tuple[int, ...] | None  # required for 4-bit; int8 takes it from the weight
    orig_dtype: torch.dtype
    nibble_order: str = "hi"  # "lo": element 2j in the LOW nibble (convert_to_quant)
    double_quant: bool = False
    flags: dict = field(default_factory=dict)  # other JSON fields, kept as they are


def parse_config(cfg: dict, source: str, layer: str) -> LayerSpec:
    """Our canonical layer JSON -> LayerSpec (convert_to_quant.normalize_config maps the
    Dec-2025 spellings to this first). FormatError for anything we cannot run."""
    fmt = cfg.get("format")
    layout = L.LAYOUT_OF_DISK_NAME.get(fmt) if isinstance(fmt, str) else None
    if layout is None:
        raise FormatError(source, f"unknown format {fmt!r} in comfy_quant JSON", layer)
    flags = {k: v for k, v in cfg.items() if k not in KNOWN_FIELDS}
    orig_dtype = dtype_of_name(cfg.get("orig_dtype", "bfloat16"), source, layer)
    if layout in L.FOUR_BIT:
        group = int_field(cfg, "group_size", source, layer, L.GROUP_DEFAULT[layout])
        shape = shape_field(cfg, ("orig_shape",), source, layer)
        if shape is None:
            raise FormatError(source, f"{fmt} JSON has no orig_shape: the weight's shape cannot be recovered",
                              layer)
        order = cfg.get("nibble_order", "hi")
        if order not in ("hi", "lo"):
            raise FormatError(source, f"nibble_order must be 'hi' or 'lo', got {order!r}", layer)
        dq = cfg.get("double_quant", False)
        if not isinstance(dq, bool):
            raise FormatError(source, f"double_quant must be true or false, got {dq!r}", layer)
        return LayerSpec(layout, group, shape, orig_dtype, order, dq, flags)
    if layout == "int8_row":
        per_row = cfg.get("per_row", True)
        if not isinstance(per_row, bool):
            raise FormatError(source, f"per_row must be true or false, got {per_row!r}", layer)
        group = None
    else:
        group = int_field(cfg, "group_size", source, layer, L.GROUP_DEFAULT[layout])
    shape = shape_field(cfg, ("orig_shape",), source, layer)
    return LayerSpec(layout, group, shape, orig_dtype, flags=flags)


# ----------------------------------------------------------------------------- building
def _params(spec: LayerSpec, shape: tuple[int, ...], source: str, layer: str) -> QuantParams:
    try:
        return QuantParams(spec.layout, spec.group_size, shape, spec.orig_dtype)
    except ValueError as e:
        raise FormatError(source, str(e), layer) from None


def _flat(t: torch.Tensor, key: str, numel: int, source: str, layer: str) -> torch.Tensor:
    """``t`` as 1-D, accepting [numel] or [numel, 1] (bitsandbytes) and nothing else."""
    check(t, key, source, layer, numel=numel)
    if sum(d != 1 for d in t.shape) > 1:
        raise FormatError(source, f"{key}: expected a 1-D tensor of {numel}, got shape {list(t.shape)}", layer)
    return t.reshape(-1)


def check_finite(scale: torch.Tensor, key: str, source: str, layer: str) -> None:
    """A NaN or Inf scale is a corrupt file: it would dequantize to NaN weights silently."""
    bad = ~torch.isfinite(scale.reshape(-1))
    if bool(bad.any()):
        raise FormatError(source, f"{key} holds NaN or Inf (first at index {int(bad.nonzero()[0, 0])})", layer)


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Low-nibble-first bytes -> our high-nibble-first bytes (a new tensor)."""
    return (packed << 4) | (packed >> 4)


def set_pad_nibble(packed: torch.Tensor, n: int, layout: str) -> torch.Tensor:
    """An odd element count's unused last low nibble -> the code of 0.0 (in place)."""
    if n % 2:
        last = packed[-1:]
        last.copy_((last & 0xF0) | L.ZERO_CODE[layout])
    return packed


def build_4bit(source: str, layer: str, spec: LayerSpec, weight: torch.Tensor, absmax: torch.Tensor,
               nested: tuple[torch.Tensor, torch.Tensor, float] | None, *, weight_key: str,
               absmax_key: str, nested_keys: tuple[str, str] = ("nested_absmax", "nested_quant_map")
               ) -> QuantizedWeight:
    """A 4-bit QuantizedWeight from file tensors; every dtype and shape checked.
    ``weight`` may be any dtype (its bytes are the codes); ``nested`` =
    (nested_absmax, nested_quant_map, offset) for double-quantized absmax codes."""
    params = _params(spec, spec.shape, source, layer)
    n = params.numel
    groups = math.ceil(n / params.group_size)
    if sum(d != 1 for d in weight.shape) > 1:
        raise FormatError(source, f"{weight_key}: expected 1-D packed codes ([n/2] or [n/2, 1]), got shape "
                          f"{list(weight.shape)}", layer)
    packed = _flat(as_bytes(weight), weight_key, (n + 1) // 2, source, layer)
    if spec.nibble_order == "lo":
        packed = set_pad_nibble(swap_nibbles(packed), n, spec.layout)
    nested_obj = None
    if nested is not None:
        codes = _flat(check(absmax, absmax_key, source, layer, dtype=torch.uint8), absmax_key, groups, source, layer)
        nested_absmax, qmap, offset = nested
        check(nested_absmax, nested_keys[0], source, layer, dtype=torch.float32)
        nested_absmax = _flat(nested_absmax, nested_keys[0], math.ceil(groups / L.DQ_BLOCK), source, layer)
        qmap = _flat(check(qmap, nested_keys[1], source, layer, dtype=torch.float32), nested_keys[1], 256,
                     source, layer)
        if not math.isfinite(offset):
            raise FormatError(source, f"nested_offset must be finite, got {offset}", layer)
        nested_obj = NestedAbsmax(codes, nested_absmax, qmap, float(offset))
        try:
            absmax = nested_obj.dequantize()
        except ValueError as e:
            raise FormatError(source, f"double-quantized absmax: {e}", layer) from None
    else:
        check(absmax, absmax_key, source, layer, dtype=torch.float32)
        absmax = _flat(absmax, absmax_key, groups, source, layer)
    if absmax.device != packed.device:
        raise FormatError(source, f"{absmax_key} is on {absmax.device}, {weight_key} on {packed.device}", layer)
    check_finite(absmax, absmax_key, source, layer)
    try:
        return QuantizedWeight(params, packed, absmax, nested_obj)
    except (ValueError, TypeError) as e:
        raise FormatError(source, str(e), layer) from None


SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # 16-bit scales widen exactly


def fit_int8_scale(scale: torch.Tensor, layout: str, group: int | None, N: int, K: int, key: str,
                   source: str, layer: str) -> torch.Tensor:
    """The weight_scale in our shape: exact shape, or the same values with size-1 dims
    ([N, 1] for [N]); a single value of int8_tensorwise is spread over the rows."""
    check(scale, key, source, layer, dtype=SCALE_DTYPES)
    want = L.scale_shape(layout, group, N, K)
    if layout == "int8_row" and scale.numel() == 1:
        return scale.float().reshape(1).expand(N).contiguous()
    got = tuple(scale.shape)
    if got != want:
        squeeze = [d for d in got if d != 1]
        if scale.numel() != math.prod(want) or squeeze != [d for d in want if d != 1]:
            extra = "a single value, [N] or [N, 1]" if layout == "int8_row" else f"{list(want)}"
            raise FormatError(source, f"{key}: expected shape {extra} for {L.DISK_NAME[layout]} "
                              f"(group_size {group}) of a [{N}, {K}] weight, got {list(got)}", layer)
    return scale.float().reshape(want).contiguous()


def build_int8(source: str, layer: str, spec: LayerSpec, weight: torch.Tensor, scale: torch.Tensor, *,
               weight_key: str, scale_key: str) -> QuantizedWeight:
    check(weight, weight_key, source, layer, dtype=torch.int8)
    if weight.dim() != 2 or weight.numel() == 0:
        raise FormatError(source, f"{weight_key}: expected a non-empty 2-D [N, K] int8 tensor, "
                          f"got shape {list(weight.shape)}", layer)
    N, K = weight.shape
    if spec.shape is not None and tuple(spec.shape) != (N, K):
        raise FormatError(source, f"{weight_key}: JSON orig_shape {list(spec.shape)} but the weight is "
                          f"{[N, K]}", layer)
    params = _params(spec, (N, K), source, layer)
    scale = fit_int8_scale(scale, spec.layout, params.group_size, N, K, scale_key, source, layer)
    check_finite(scale, scale_key, source, layer)
    if scale.device != weight.device:
        raise FormatError(source, f"{scale_key} is on {scale.device}, {weight_key} on {weight.device}", layer)
    try:
        return QuantizedWeight(params, weight.contiguous(), scale)
    except (ValueError, TypeError) as e:
        raise FormatError(source, str(e), layer) from None


# ----------------------------------------------------------------------------- reading a layer
def read_layer(reader, prefix: str, spec: LayerSpec) -> QuantizedWeight:
    """Take one layer's tensors (our keys) from a TensorReader and build its QuantizedWeight."""
    src = reader.source
    weight_key = f"{prefix}.weight"
    if spec.layout in L.FOUR_BIT:
        absmax_key = f"{prefix}.absmax"
        nested_keys = [f"{prefix}.{s}" for s in NESTED_SUFFIXES]
        present = [k for k in nested_keys if k in reader]
        if f"{prefix}.weight_scale" in reader:
            raise FormatError(src, f"{L.DISK_NAME[spec.layout]} layer also has {prefix}.weight_scale", prefix)
        nested = None
        if spec.double_quant:
            missing = [k for k in nested_keys if k not in reader]
            if missing:
                raise FormatError(src, f"double_quant layer is missing {', '.join(missing)}", prefix)
            nested_absmax, qmap, offset_t = (reader.take(k, prefix) for k in nested_keys)
            check(offset_t, nested_keys[2], src, prefix, dtype=torch.float32, numel=1)
            nested = (nested_absmax, qmap, float(offset_t.reshape(())))
        elif present:
            raise FormatError(src, f"has {', '.join(present)} but its JSON does not say double_quant", prefix)
        weight = check(reader.take(weight_key, prefix), weight_key, src, prefix, dtype=torch.uint8)
        absmax = reader.take(absmax_key, prefix)
        qw = build_4bit(src, prefix, spec, weight, absmax, nested, weight_key=weight_key, absmax_key=absmax_key,
                        nested_keys=tuple(nested_keys[:2]))
    else:
        if f"{prefix}.absmax" in reader:
            raise FormatError(src, f"{L.DISK_NAME[spec.layout]} layer also has {prefix}.absmax", prefix)
        scale_key = f"{prefix}.weight_scale"
        weight = reader.take(weight_key, prefix)
        scale = reader.take(scale_key, prefix)
        qw = build_int8(src, prefix, spec, weight, scale, weight_key=weight_key, scale_key=scale_key)
    reader.take_optional(f"{prefix}.input_scale", prefix)  # static activation scale: unused
    return qw
