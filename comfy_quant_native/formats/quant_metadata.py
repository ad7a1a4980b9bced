"""The file-level ``_quantization_metadata`` header: a safetensors ``__metadata__`` entry

    "_quantization_metadata": '{"format_version": "1.0", "layers": {"<module path>": {<layer JSON>}}}'

that stands in for per-layer ``L.comfy_quant`` tensors (ComfyUI's comfy/utils.py
convert_old_quants turns each entry into one; convert_to_quant writes both). The layer
JSON and tensors are those of our form (comfy_quant.py), or of a ComfyUI-native format.

As in ComfyUI, module paths are full state-dict prefixes; an entry whose path lacks the
file's model prefix (some converters drop "model.diffusion_model.") is matched to the one
layer whose path ends with it. A layer value may also be a bare format string (seen in the
wild), read as {"format": value}. Where a layer has both a header entry and a
``comfy_quant`` tensor they must agree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ..quantized import QuantizedWeight
from .comfy_quant import layer_json
from .common import FormatError

HEADER_KEY = "_quantization_metadata"
FORMAT_VERSION = "1.0"


def header_layers(metadata: Mapping[str, str] | None, source: str) -> dict[str, dict] | None:
    """The header's {module path: layer JSON} as written, None without a header."""
    if not metadata or HEADER_KEY not in metadata:
        return None
    raw = metadata[HEADER_KEY]
    try:
        obj = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except json.JSONDecodeError as e:
        raise FormatError(source, f"{HEADER_KEY} header is not JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("layers"), dict):
        raise FormatError(source, f'{HEADER_KEY} header must be an object with a "layers" object')
    version = obj.get("format_version", FORMAT_VERSION)
    if str(version).split(".")[0] != "1":
        raise FormatError(source, f"{HEADER_KEY} format_version {version!r} is not supported (1.x is)")
    out = {}
    for name, cfg in obj["layers"].items():
        if isinstance(cfg, str):
            cfg = {"format": cfg}
        if not isinstance(cfg, dict):
            raise FormatError(source, f"{HEADER_KEY} entry is a {type(cfg).__name__}, expected an object", name)
        out[name] = cfg
    return out


def resolve_layers(layers: dict[str, dict], keys, source: str) -> dict[str, dict]:
    """Header entries keyed by the module path the file's tensors use."""
    keyset = set(keys)
    weights = [k[: -len(".weight")] for k in keyset if k.endswith(".weight")]
    out = {}
    for name, cfg in layers.items():
        prefix = name
        if f"{name}.weight" not in keyset:
            matches = [p for p in weights if p.endswith("." + name)]
            if len(matches) != 1:
                why = "no" if not matches else f"{len(matches)} candidate"
                raise FormatError(source, f"{HEADER_KEY} names this layer but the file has {why} "
                                  f"{name}.weight tensor", name)
            prefix = matches[0]
        if prefix in out:
            raise FormatError(source, f"{HEADER_KEY} lists this layer twice", prefix)
        out[prefix] = cfg
    return out


# ----------------------------------------------------------------------------- writing
def header_metadata(configs: Mapping[str, dict]) -> dict[str, str]:
    """The safetensors metadata entry for layers' JSON (module path -> layer JSON)."""
    body = {"format_version": FORMAT_VERSION, "layers": {k: configs[k] for k in configs}}
    return {HEADER_KEY: json.dumps(body, separators=(",", ":"), sort_keys=True)}


def layers_header(layers: Mapping[str, QuantizedWeight]) -> dict[str, str]:
    """The header for our quantized layers (pair with layer_tensors(..., with_json=False))."""
    return header_metadata({prefix: layer_json(qw) for prefix, qw in layers.items()})
