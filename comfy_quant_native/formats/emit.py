"""Whole state dicts in one of the forms we write: layers plus the other tensors.

    emit_state_dict(layers, tensors=None, form="comfy_quant", metadata=None)
        -> (tensors, metadata) for save_file:
    "comfy_quant"            per-layer L.comfy_quant JSON tensors (comfy_quant.py)
    "quantization_metadata"  the same tensors without them, JSON in the header (quant_metadata.py)
    "bnb"                    bitsandbytes Linear4bit keys (bnb.py; 4-bit layers only)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..quantized import QuantizedWeight
from . import bnb
from .comfy_quant import layer_tensors
from .quant_metadata import HEADER_KEY, layers_header

WRITE_FORMS = ("comfy_quant", "quantization_metadata", "bnb")


def emit_state_dict(layers: Mapping[str, QuantizedWeight], tensors: Mapping[str, torch.Tensor] | None = None,
                    form: str = "comfy_quant", metadata: Mapping[str, str] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if form not in WRITE_FORMS:
        raise ValueError(f"form must be one of {', '.join(WRITE_FORMS)}, got {form!r}")
    meta = dict(metadata or {})
    if HEADER_KEY in meta:
        raise ValueError(f"metadata already has {HEADER_KEY}; it is made from the layers")
    out: dict[str, torch.Tensor] = {}
    for prefix, qw in layers.items():
        if form == "bnb":
            out.update(bnb.layer_tensors(prefix, qw))
        else:
            out.update(layer_tensors(prefix, qw, with_json=form == "comfy_quant"))
    if form == "quantization_metadata" and layers:
        meta.update(layers_header(layers))
    for k, t in (tensors or {}).items():
        if k in out:
            raise ValueError(f"tensor {k!r} clashes with a quantized layer's key")
        out[k] = t
    return out, meta
