"""Form detection and loading. (First cut: our comfy_quant form; the forms in the wild
follow in their own modules.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from .. import layouts as L
from ..quantized import NestedAbsmax, QuantizedWeight, QuantParams
from .common import DTYPE_OF_NAME, FormatError, LoadedStateDict, tensor_json


def detect_form(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    keys = list(keys)
    if any(k.endswith(".comfy_quant") for k in keys):
        return "comfy_quant"
    return "plain"


def _read_comfy_quant_layer(sd: Mapping, prefix: str, meta: dict, source: str) -> QuantizedWeight:
    fmt = meta.get("format")
    layout = L.LAYOUT_OF_DISK_NAME.get(fmt)
    if layout is None:
        raise FormatError(source, f"unknown format {fmt!r}", prefix)
    weight = sd[f"{prefix}.weight"]
    if layout in L.FOUR_BIT:
        shape = tuple(meta["orig_shape"])
        params = QuantParams(layout, meta.get("group_size", 64), shape,
                             DTYPE_OF_NAME.get(meta.get("orig_dtype"), torch.bfloat16))
        absmax = sd[f"{prefix}.absmax"]
        nested = None
        if meta.get("double_quant"):
            nested = NestedAbsmax(absmax, sd[f"{prefix}.nested_absmax"], sd[f"{prefix}.nested_quant_map"],
                                  float(sd[f"{prefix}.nested_offset"]))
            absmax = nested.dequantize()
        return QuantizedWeight(params, weight.reshape(-1), absmax, nested)
    group = None if layout == "int8_row" else meta.get("group_size", L.GROUP_DEFAULT[layout])
    scale = sd[f"{prefix}.weight_scale"]
    params = QuantParams(layout, group, tuple(weight.shape))
    return QuantizedWeight(params, weight, scale.reshape(L.scale_shape(layout, group, *weight.shape)))


def load_state_dict(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                    source: str = "<state dict>") -> LoadedStateDict:
    keys = list(sd.keys())
    form = detect_form(keys, metadata)
    layers: dict[str, QuantizedWeight] = {}
    used: set[str] = set()
    counts: Counter = Counter()
    for key in keys:
        if not key.endswith(".comfy_quant"):
            continue
        prefix = key[: -len(".comfy_quant")]
        meta = tensor_json(sd[key], source, prefix)
        qw = _read_comfy_quant_layer(sd, prefix, meta, source)
        layers[prefix] = qw
        counts[qw.layout] += 1
        used.update(k for k in keys if k.startswith(prefix + ".") and k != prefix + ".bias")
    tensors = {k: sd[k] for k in keys if k not in used}
    return LoadedStateDict(layers, tensors, form, counts)
