"""Files written by convert_to_quant (silveroxides/convert_to_quant) in December 2025.

Its 4-bit packing puts element 2j in the LOW nibble (we swap on load) and pads an odd
count's last high nibble with code 0; weights are flat uint8 [ceil(n/2)], absmax float32
[ceil(n/B)]. Layer ``L``, by mode:

  --comfy_quant (per-layer JSON, our keys):
    L.weight, L.absmax, L.comfy_quant {"format": "bnb_nf4"|"bnb_fp4", "group_size": B,
        "quant_type": "nf4"|"fp4", "dtype": "bfloat16", "shape": [N, K],
        "quant_map": [16 floats]}  -- no "nibble_order"; "dtype"/"shape" where we write
        "orig_dtype"/"orig_shape". Files from before 2025-12-18 carry only format and
        group_size: their weight shape is lost and we refuse them.
    L.weight int8 [N, K], L.weight_scale float32 [N/B, K/B] | [N, K/B],
        L.comfy_quant {"format": "int8_blockwise"|"int8_lodewise", "group_size": B}
        (its scale is amax/127 per tile, as ours; dims are multiples of B).
    Later releases add int8_tensorwise ({"per_row": true}, scale [N], [N, 1] or a scalar)
    and, with --save_quant_metadata, the same JSON in a _quantization_metadata header.
    Any JSON may carry "full_precision_matrix_mult": true, kept in configs. An early bug
    wrote {"format": ..., "params": {"group_size": B}}; we flatten it as the tool does.
    Optional L.input_scale float32 [1] (a dummy 1.0) is dropped.

  default (legacy) mode:
    L.weight uint8, L.absmax float32, L.quant_map float32 [16],
        L.quant_state.bitsandbytes__nf4|fp4 {"quant_type", "blocksize", "dtype", "shape"}
        -- bitsandbytes' JSON, but the statistics sit beside the weight (L.absmax, not
        L.weight.absmax) and the nibbles are low-first.
    L.weight int8 [N, K], L.scale_weight float32 [N/B, K/B] (blockwise) or [N, K/B]
        (lodewise), optional L.scale_input; no JSON and no scaled_fp8 marker: the layout
        is read off the scale's shape (a block can never be 1 row tall, so the two are
        told apart). fp8 files of this mode carry the scaled_fp8 marker and go to ComfyUI.

  "bnb_af4" (AbnormalFloat4) layers are refused: no kernel of ours runs that table.
"""

from __future__ import annotations

import torch

from .. import layouts as L
from ..quantized import QuantizedWeight
from .bnb import QS_MARK, read_quant_state_layer
from .comfy_quant import LayerSpec, build_int8
from .common import FormatError

LEGACY_SCALE = ".scale_weight"
FOUR_BIT_FORMATS = {"bnb_nf4": "nf4", "bnb_fp4": "fp4"}
UNSUPPORTED = {"bnb_af4": "AbnormalFloat4 (bnb_af4) codebook"}


def normalize_config(cfg: dict, source: str, layer: str) -> tuple[dict, bool]:
    """A layer JSON in our canonical spelling, and whether it was convert_to_quant's own."""
    cfg = dict(cfg)
    ctq = False
    if isinstance(cfg.get("params"), dict):  # its early nested-params bug
        for k, v in cfg.pop("params").items():
            cfg.setdefault(k, v)
        ctq = True
    fmt = cfg.get("format")
    if fmt in UNSUPPORTED:
        raise FormatError(source, f"format {fmt!r}: the {UNSUPPORTED[fmt]} is not supported", layer)
    if fmt in FOUR_BIT_FORMATS and "nibble_order" not in cfg:
        ctq = True
        cfg["nibble_order"] = "lo"
        qtype = cfg.pop("quant_type", None)
        if qtype is not None and qtype != FOUR_BIT_FORMATS[fmt]:
            raise FormatError(source, f"quant_type {qtype!r} contradicts format {fmt!r}", layer)
        qmap = cfg.pop("quant_map", None)
        if qmap is not None:
            _check_quant_map(qmap, FOUR_BIT_FORMATS[fmt], source, layer)
        for theirs, ours in (("shape", "orig_shape"), ("dtype", "orig_dtype")):
            if theirs in cfg:
                cfg.setdefault(ours, cfg.pop(theirs))
    return cfg, ctq


def _check_quant_map(qmap, layout: str, source: str, layer: str) -> None:
    if (not isinstance(qmap, list) or len(qmap) != 16
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in qmap)):
        raise FormatError(source, f"quant_map must be a list of 16 numbers, got {qmap!r}", layer)
    table = L.codebook_table(layout).tolist()
    if any(abs(a - b) > 1e-6 for a, b in zip(qmap, table)):
        raise FormatError(source, f"quant_map is not the {layout} table (a custom 4-bit map is not supported)",
                          layer)


# ----------------------------------------------------------------------------- legacy mode
def legacy_4bit_layers(keys) -> dict[str, str]:
    """module path -> quant_state key of legacy 4-bit layers (stats beside the weight)."""
    out = {}
    for k in keys:
        i = k.rfind(QS_MARK)
        if i > 0 and not (k[:i].endswith(".weight") or k[:i] == "weight"):
            out[k[:i]] = k
    return out


def read_legacy_4bit(reader, prefix: str, qs_key: str) -> QuantizedWeight:
    qw, _ = read_quant_state_layer(reader, prefix, qs_key, f"{prefix}.", "lo", strict_keys=False)
    return qw


def legacy_int8_layers(keys) -> list[str]:
    return [k[: -len(LEGACY_SCALE)] for k in keys if k.endswith(LEGACY_SCALE)]


def _legacy_int8_layout(scale_shape: tuple[int, ...], N: int, K: int) -> tuple[str, int | None] | None:
    """(layout, group) from the shape of a legacy scale_weight, or None."""
    if all(d == 1 for d in scale_shape) or tuple(scale_shape) in ((N,), (N, 1)):
        return "int8_row", None  # one scale, or one per row (lodewise with K <= B is the same)
    if len(scale_shape) != 2:
        return None
    s0, s1 = scale_shape
    if K % s1:
        return None
    if s0 == N:
        return "int8_lode", K // s1
    if N % s0 == 0 and N // s0 == K // s1:
        return "int8_block", K // s1
    return None


def read_legacy_int8(reader, prefix: str) -> QuantizedWeight:
    src = reader.source
    weight_key, scale_key = f"{prefix}.weight", f"{prefix}{LEGACY_SCALE}"
    weight = reader.take(weight_key, prefix)
    if weight.dtype != torch.int8:
        if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise FormatError(src, f"{weight_key} is {weight.dtype} with {scale_key} but the file has no "
                              "scaled_fp8 marker: neither ComfyUI nor we can tell how to scale it", prefix)
        raise FormatError(src, f"{weight_key}: expected dtype int8 beside {scale_key}, got {weight.dtype}", prefix)
    if weight.dim() != 2:
        raise FormatError(src, f"{weight_key}: expected a 2-D [N, K] int8 tensor, got shape {list(weight.shape)}",
                          prefix)
    scale = reader.take(scale_key, prefix)
    N, K = weight.shape
    found = _legacy_int8_layout(tuple(scale.shape), N, K)
    if found is None:
        raise FormatError(src, f"{scale_key} shape {list(scale.shape)} fits no int8 layout of a [{N}, {K}] "
                          "weight", prefix)
    layout, group = found
    reader.take_optional(f"{prefix}.scale_input", prefix)
    return build_int8(src, prefix, LayerSpec(layout, group, None, torch.bfloat16), weight, scale,
                      weight_key=weight_key, scale_key=scale_key)
