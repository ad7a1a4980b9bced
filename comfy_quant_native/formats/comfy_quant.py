"""Our form: ComfyUI's per-layer ``comfy_quant`` JSON beside the data and scale tensors.

    4-bit:  L.weight uint8 [ceil(n/2)] (HIGH nibble first), L.absmax float32 [G],
            L.comfy_quant {"format": "bnb_nf4"|"bnb_fp4", "group_size", "orig_shape",
                           "orig_dtype", "nibble_order": "hi"}
            double-quantized absmax: L.absmax uint8 [G] codes, L.nested_absmax float32,
            L.nested_quant_map float32 [256], L.nested_offset float32 [], and
            "double_quant": true in the JSON.
    int8:   L.weight int8 [N, K], L.weight_scale float32, L.comfy_quant {"format", "group_size"}
            (int8_tensorwise: {"format": "int8_tensorwise", "per_row": true}, scale [N]).
"""

from __future__ import annotations

import torch

from .. import layouts as L
from ..quantized import QuantizedWeight
from .common import DTYPE_NAMES, json_tensor


def layer_json(qw: QuantizedWeight) -> dict:
    p = qw.params
    meta: dict = {"format": L.DISK_NAME[p.layout]}
    if p.layout in L.FOUR_BIT:
        meta.update(
            group_size=p.group_size,
            orig_shape=list(p.shape),
            orig_dtype=DTYPE_NAMES.get(p.orig_dtype, "bfloat16"),
            nibble_order="hi",
        )
        if qw.nested is not None:
            meta["double_quant"] = True
    elif p.layout == "int8_row":
        meta["per_row"] = True
    else:
        meta["group_size"] = p.group_size
    return meta


def layer_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The file tensors of one quantized layer, keys under ``prefix``."""
    out = {f"{prefix}.weight": qw.data, f"{prefix}.comfy_quant": json_tensor(layer_json(qw))}
    if qw.layout in L.FOUR_BIT:
        if qw.nested is not None:
            out[f"{prefix}.absmax"] = qw.nested.codes
            out[f"{prefix}.nested_absmax"] = qw.nested.nested_absmax
            out[f"{prefix}.nested_quant_map"] = qw.nested.quant_map
            out[f"{prefix}.nested_offset"] = torch.tensor(qw.nested.offset, dtype=torch.float32)
        else:
            out[f"{prefix}.absmax"] = qw.scale
    else:
        out[f"{prefix}.weight_scale"] = qw.scale
    return out
