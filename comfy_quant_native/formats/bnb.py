"""bitsandbytes 4-bit checkpoints, as ``Linear4bit`` saves them (bitsandbytes
``QuantState.as_dict(packed=True)``) and as Forge, ComfyUI_bitsandbytes_NF4 and diffusers'
bnb quantizer write them. Layer ``L``:

    L.weight                                uint8 [ceil(n/2), 1] (bytes of the codes; with a
                                            quant_storage other than uint8, that dtype
                                            [ceil(n/2)/itemsize, 1]), element 2j in the HIGH nibble
    L.weight.absmax                         float32 [G], G = ceil(n/blocksize)
                                            (uint8 [G] codes when double-quantized)
    L.weight.quant_map                      float32 [16], the NF4 or FP4 table
    L.weight.nested_absmax                  float32 [ceil(G/256)]   } double quantization
    L.weight.nested_quant_map               float32 [256]           } (compress_statistics)
    L.weight.quant_state.bitsandbytes__nf4  uint8 JSON (or ...__fp4):
        {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [N, K]}
        + {"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0123}
          when double-quantized.

bitsandbytes dequantizes with the table its quant_type names, not the stored quant_map;
we check that quant_map holds that table (to 1e-6) and refuse any other map.
"""

from __future__ import annotations

import math

import torch

from .. import layouts as L
from ..quantized import QuantizedWeight
from .common import FormatError, check, dtype_of_name, int_field, json_tensor, shape_field, tensor_json
from .comfy_quant import LayerSpec, build_4bit

QS_MARK = ".quant_state.bitsandbytes__"
BNB_MARK = ".weight" + QS_MARK
QUANT_TYPES = {"nf4": "nf4", "fp4": "fp4"}  # quant_type -> our layout
NESTED_BLOCKSIZE = L.DQ_BLOCK
STAT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def bnb_layers(keys) -> dict[str, str]:
    """module path -> its ``quant_state`` key, for every bitsandbytes 4-bit layer."""
    out = {}
    for k in keys:
        if k.startswith(BNB_MARK[1:]):
            out[""] = k  # a bare module's state dict: refused by read_layer
        i = k.rfind(BNB_MARK)
        if i > 0:
            out[k[:i]] = k
    return out


def quant_map_check(qmap: torch.Tensor, layout: str, key: str, source: str, layer: str) -> None:
    check(qmap, key, source, layer, dtype=(torch.float32, torch.float16, torch.bfloat16), numel=16)
    table = L.codebook_table(layout)
    got = qmap.detach().float().reshape(-1).cpu()
    if not bool(((got - table).abs() <= 1e-6).all()):
        raise FormatError(source, f"{key} is not the {layout} table (a custom 4-bit map is not supported): "
                          f"{[round(v, 6) for v in got.tolist()]}", layer)


def read_quant_state_layer(reader, prefix: str, qs_key: str, stats: str, nibble_order: str,
                           strict_keys: bool) -> tuple[QuantizedWeight, dict]:
    """One layer whose statistics live under ``stats`` (``prefix + ".weight."`` for
    bitsandbytes, ``prefix + "."`` for convert_to_quant's legacy files) with a packed
    quant_state JSON. Returns the weight and the quant_state JSON."""
    src = reader.source
    qtype = qs_key[qs_key.rfind("__") + 2:]
    if qtype not in QUANT_TYPES:
        raise FormatError(src, f"4-bit quant_type {qtype!r} ({qs_key}) is not supported; nf4 and fp4 are", prefix)
    meta = tensor_json(reader.take(qs_key, prefix), src, prefix, what=qs_key)
    if meta.get("quant_type") != qtype:
        raise FormatError(src, f"{qs_key} says quant_type {meta.get('quant_type')!r}, its key says {qtype!r}",
                          prefix)
    layout = QUANT_TYPES[qtype]
    group = int_field(meta, "blocksize", src, prefix)
    if group is None:
        raise FormatError(src, f"{qs_key} has no blocksize", prefix)
    shape = shape_field(meta, ("shape",), src, prefix)
    if shape is None:
        raise FormatError(src, f"{qs_key} has no shape", prefix)
    orig_dtype = dtype_of_name(meta.get("dtype"), src, prefix, field_name=f"{qs_key} dtype")
    if strict_keys:
        # bitsandbytes' QuantState.from_dict refuses unknown statistics as well
        known = {f"{stats}{s}" for s in STAT_KEYS} | {qs_key}
        odd = [k for k in reader.keys if k.startswith(stats) and k not in known]
        if odd:
            raise FormatError(src, f"unexpected bitsandbytes tensors {', '.join(odd)}", prefix)
    nested = None
    has_nested = f"{stats}nested_absmax" in reader or "nested_offset" in meta
    if has_nested:
        for k in ("nested_offset", "nested_blocksize"):
            if k not in meta:
                raise FormatError(src, f"double-quantized layer: {qs_key} has no {k}", prefix)
        nb = int_field(meta, "nested_blocksize", src, prefix)
        if nb != NESTED_BLOCKSIZE:
            raise FormatError(src, f"nested_blocksize {nb} is not supported (bitsandbytes uses {NESTED_BLOCKSIZE})",
                              prefix)
        if meta.get("nested_dtype", "float32") != "float32":
            raise FormatError(src, f"nested_dtype {meta['nested_dtype']!r} is not supported (float32 is)", prefix)
        offset = meta["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)):
            raise FormatError(src, f"nested_offset must be a number, got {offset!r}", prefix)
        nested = (reader.take(f"{stats}nested_absmax", prefix), reader.take(f"{stats}nested_quant_map", prefix),
                  float(offset))
    qmap_key = f"{stats}quant_map"
    quant_map_check(reader.take(qmap_key, prefix), layout, qmap_key, src, prefix)
    spec = LayerSpec(layout, group, shape, orig_dtype, nibble_order, nested is not None)
    weight_key, absmax_key = f"{prefix}.weight", f"{stats}absmax"
    qw = build_4bit(src, prefix, spec, reader.take(weight_key, prefix), reader.take(absmax_key, prefix), nested,
                    weight_key=weight_key, absmax_key=absmax_key,
                    nested_keys=(f"{stats}nested_absmax", f"{stats}nested_quant_map"))
    return qw, meta


def read_layer(reader, prefix: str, qs_key: str) -> QuantizedWeight:
    """One bitsandbytes Linear4bit layer."""
    if not prefix:
        raise FormatError(reader.source, f"{qs_key}: a layer needs a module path (keys 'L.weight...')")
    qw, _ = read_quant_state_layer(reader, prefix, qs_key, f"{prefix}.weight.", "hi", strict_keys=True)
    return qw


# ----------------------------------------------------------------------------- writing
def layer_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A 4-bit layer as bitsandbytes' Linear4bit saves it (bitsandbytes, Forge and diffusers
    load it back with Params4bit.from_prequantized)."""
    p = qw.params
    if p.layout not in L.FOUR_BIT:
        raise ValueError(f"{prefix}: the bitsandbytes form holds nf4/fp4 layers only, not {p.layout}")
    if qw.nested is not None and qw.nested.codes.numel() != math.ceil(p.numel / p.group_size):
        raise ValueError(f"{prefix}: nested absmax codes do not match the weight")
    qmap = L.codebook_table(p.layout)
    qmap[qmap == 0] = 0.0  # bitsandbytes' map has +0.0 where our FP4 table has -0.0 (code 8)
    meta = {"quant_type": p.layout, "blocksize": p.group_size,
            "dtype": str(p.orig_dtype).replace("torch.", ""), "shape": list(p.shape)}
    out = {f"{prefix}.weight": qw.data.reshape(-1, 1)}
    if qw.nested is not None:
        out[f"{prefix}.weight.absmax"] = qw.nested.codes
        out[f"{prefix}.weight.nested_absmax"] = qw.nested.nested_absmax
        out[f"{prefix}.weight.nested_quant_map"] = qw.nested.quant_map
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=qw.nested.offset)
    else:
        out[f"{prefix}.weight.absmax"] = qw.scale
    out[f"{prefix}.weight.quant_map"] = qmap.to(qw.data.device)
    out[f"{prefix}{BNB_MARK}{p.layout}"] = json_tensor(meta)
    return out
