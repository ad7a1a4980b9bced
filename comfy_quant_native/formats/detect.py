"""Form detection and loading: which form a file is in (from its keys and header alone),
and a state dict split into QuantizedWeight layers and the remaining tensors.

Detection rules, first match wins (keys and safetensors header metadata only):
  1. a ``_quantization_metadata`` header   -> "quantization_metadata"
     ("comfyui_native" when every layer it lists is a ComfyUI format)
  2. ``L.weight.quant_state.bitsandbytes__nf4|fp4``            -> "bnb"
  3. ``L.quant_state.bitsandbytes__*`` (stats beside the weight) -> "convert_to_quant"
  4. ``L.comfy_quant`` tensors                                  -> "comfy_quant"
     (refined by ``probe``, which reads only these small JSON tensors: "convert_to_quant"
     for its Dec-2025 4-bit JSON, "comfyui_native" when every layer is a ComfyUI format)
  5. a ``scaled_fp8`` marker                                    -> "comfyui_native"
  6. ``L.scale_weight`` without that marker (legacy int8)       -> "convert_to_quant"
  7. otherwise                                                  -> "plain"

A file that mixes our layers with ComfyUI-native ones (convert_to_quant's fp8 fallback
layers, say) loads our layers as QuantizedWeight and passes the native layers' tensors
through untouched in ``tensors`` (with a ``L.comfy_quant`` tensor, made from the header
entry where the file has none), for ComfyUI's mixed-precision ops; ``native`` lists them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from . import bnb, comfy_quant
from . import convert_to_quant as ctq
from .common import NATIVE_COUNT_PREFIX, FormatError, LoadedStateDict, TensorReader, json_tensor, tensor_json
from .native import has_scaled_fp8_marker, is_native_config
from .quant_metadata import HEADER_KEY, header_layers, resolve_layers

JSON_SUFFIX = ".comfy_quant"


def _json_prefixes(keys: Iterable[str]) -> list[str]:
    return [k[: -len(JSON_SUFFIX)] for k in keys if k.endswith(JSON_SUFFIX)]


def detect_form(keys: Iterable[str], metadata: Mapping[str, str] | None = None, *,
                source: str = "<state dict>") -> str:
    """The file's form from its keys and header metadata alone (no tensor is read): one
    of FORMS. A malformed ``_quantization_metadata`` header raises FormatError."""
    keys = list(keys)
    header = header_layers(metadata, source)
    if header is not None:
        if header and all(is_native_config(c) for c in header.values()) and not _json_prefixes(keys):
            return "comfyui_native"
        return "quantization_metadata"
    if bnb.bnb_layers(keys):
        return "bnb"
    if ctq.legacy_4bit_layers(keys):
        return "convert_to_quant"
    if _json_prefixes(keys):
        return "comfy_quant"
    if has_scaled_fp8_marker(keys):
        return "comfyui_native"
    if ctq.legacy_int8_layers(keys):
        return "convert_to_quant"
    return "plain"


@dataclass
class Probe:
    """What a file holds, from its keys, header and small JSON tensors (no weight is read)."""

    form: str  # one of FORMS
    formats: Counter = field(default_factory=Counter)  # on-disk format name -> layers


def probe(sd: Mapping, metadata: Mapping[str, str] | None = None, source: str = "<state dict>") -> Probe:
    """The form of a state dict, refined by reading only its ``comfy_quant`` JSON tensors:
    what the loader node needs to decide between us and stock ComfyUI."""
    keys = list(sd.keys())
    form = detect_form(keys, metadata, source=source)
    configs = dict(resolve_layers(header_layers(metadata, source) or {}, keys, source))
    for prefix in _json_prefixes(keys):
        if prefix not in configs:
            configs[prefix] = tensor_json(sd[prefix + JSON_SUFFIX], source, prefix)
    formats: Counter = Counter()
    ours = ctq_seen = False
    for prefix, cfg in configs.items():
        formats[str(cfg.get("format"))] += 1
        if not is_native_config(cfg):
            ours = True
            ctq_seen |= ctq.normalize_config(cfg, source, prefix)[1]
    for qs_key in bnb.bnb_layers(keys).values():
        formats["bnb_" + qs_key[qs_key.rfind("__") + 2:]] += 1
    for qs_key in ctq.legacy_4bit_layers(keys).values():
        formats["bnb_" + qs_key[qs_key.rfind("__") + 2:]] += 1
    if form == "comfy_quant":
        if configs and not ours:
            form = "comfyui_native"
        elif ctq_seen:
            form = "convert_to_quant"
    return Probe(form, formats)


def _layer_order(keys: list[str], prefixes: Iterable[str]) -> list[str]:
    """Module paths in the order their tensors first appear in the file."""
    first: dict[str, int] = {}
    wanted = set(prefixes)
    for i, k in enumerate(keys):
        j = k.find(".")
        while j != -1:
            p = k[:j]
            if p in wanted and p not in first:
                first[p] = i
            j = k.find(".", j + 1)
    return sorted(wanted, key=lambda p: first.get(p, len(keys)))


def load_state_dict(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                    source: str = "<state dict>") -> LoadedStateDict:
    """Split a state dict (any Mapping; each tensor is read once) into quantized layers and
    the remaining tensors, whatever form it is in. FormatError names source, layer, reason."""
    reader = TensorReader(sd, source)
    keys = reader.keys
    header = header_layers(metadata, source)
    header = resolve_layers(header, keys, source) if header else {}
    json_layers = set(_json_prefixes(keys)) | set(header)
    bnb_layers = bnb.bnb_layers(keys)
    legacy4 = ctq.legacy_4bit_layers(keys)
    scaled_fp8 = has_scaled_fp8_marker(keys)
    legacy8 = [] if scaled_fp8 else ctq.legacy_int8_layers(keys)
    owner: dict[str, str] = {}
    for kind, prefixes in (("comfy_quant JSON", json_layers), ("bitsandbytes", bnb_layers),
                           ("convert_to_quant legacy 4-bit", legacy4), ("legacy scale_weight", legacy8)):
        for p in prefixes:
            if p in owner:
                raise FormatError(source, f"layer is marked quantized two ways ({owner[p]} and {kind})", p)
            owner[p] = kind

    out = LoadedStateDict({}, {}, "plain", Counter())
    kinds: set[str] = set()
    injected: dict[str, torch.Tensor] = {}
    for prefix in _layer_order(keys, owner):
        kind = owner[prefix]
        if kind == "comfy_quant JSON":
            json_key = prefix + JSON_SUFFIX
            cfg = header.get(prefix)
            if json_key in reader:
                in_tensor = tensor_json(reader.get(json_key, prefix), source, prefix, what=json_key)
                if cfg is not None and cfg != in_tensor:
                    raise FormatError(source, f"{HEADER_KEY} header says {cfg} but {json_key} says {in_tensor}",
                                      prefix)
                cfg = in_tensor
            elif is_native_config(cfg):
                injected[json_key] = json_tensor(cfg)
            if is_native_config(cfg):
                out.native[prefix] = cfg
                out.counts[NATIVE_COUNT_PREFIX + cfg["format"]] += 1
                continue
            norm, from_ctq = ctq.normalize_config(cfg, source, prefix)
            spec = comfy_quant.parse_config(norm, source, prefix)
            qw = comfy_quant.read_layer(reader, prefix, spec)
            if json_key in reader:
                reader.take(json_key, prefix)
            out.configs[prefix] = {**comfy_quant.layer_json(qw), **spec.flags}
            kinds.add("convert_to_quant" if from_ctq else "comfy_quant")
        elif kind == "bitsandbytes":
            qw = bnb.read_layer(reader, prefix, bnb_layers[prefix])
            kinds.add("bnb")
        elif kind == "convert_to_quant legacy 4-bit":
            qw = ctq.read_legacy_4bit(reader, prefix, legacy4[prefix])
            kinds.add("convert_to_quant")
        else:
            qw = ctq.read_legacy_int8(reader, prefix)
            kinds.add("convert_to_quant")
        out.layers[prefix] = qw
        out.configs.setdefault(prefix, comfy_quant.layer_json(qw))
        out.counts[qw.layout] += 1

    out.tensors = reader.rest()
    out.tensors.update(injected)
    if not out.layers:
        out.form = "comfyui_native" if (out.native or scaled_fp8) else "plain"
    elif header:
        out.form = "quantization_metadata"
    elif "bnb" in kinds:
        out.form = "bnb"
    elif "convert_to_quant" in kinds:
        out.form = "convert_to_quant"
    else:
        out.form = "comfy_quant"
    return out
