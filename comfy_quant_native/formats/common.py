"""Shared pieces of the on-disk forms: the error type, the result of a load, JSON tensors,
a reader that reads each tensor of a Mapping at most once, and tensor checks."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..quantized import QuantizedWeight

# Forms a file can be in, as detect_form() names them.
FORMS = (
    "comfy_quant",  # ours / ComfyUI: per-layer L.comfy_quant JSON tensors
    "quantization_metadata",  # a file-level _quantization_metadata header instead
    "bnb",  # bitsandbytes / Forge / diffusers 4-bit: L.weight.absmax, L.weight.quant_state.*
    "convert_to_quant",  # convert_to_quant Dec-2025: low-nibble 4-bit, legacy scale_weight int8
    "comfyui_native",  # formats stock ComfyUI loads itself (fp8 scaled, scaled_fp8, nvfp4, mxfp8)
    "plain",  # no quantized layers
)

NATIVE_COUNT_PREFIX = "comfyui:"  # counts key of a layer left to ComfyUI: "comfyui:<format>"


class FormatError(ValueError):
    """A file or state dict that cannot be read: names the source, the layer and the reason."""

    def __init__(self, source: str, reason: str, layer: str | None = None):
        self.source, self.layer, self.reason = source, layer, reason
        where = f"{source}: layer {layer}" if layer else source
        super().__init__(f"{where}: {reason}")


@dataclass
class LoadedStateDict:
    layers: dict[str, QuantizedWeight]  # module path -> quantized weight
    tensors: dict[str, torch.Tensor]  # every other tensor, keys unchanged
    form: str  # one of FORMS
    counts: Counter = field(default_factory=Counter)  # layout (or "comfyui:<format>") -> layers
    # module path -> the layer's JSON in our canonical form (what layer_json() writes, plus
    # flags such as full_precision_matrix_mult that the file carried)
    configs: dict[str, dict] = field(default_factory=dict)
    # module path -> JSON of a layer in a format stock ComfyUI runs (fp8, nvfp4, mxfp8,
    # convrot int8...); its tensors stay in ``tensors`` with a ``.comfy_quant`` key for ComfyUI
    native: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> str:
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        return f"{self.form}: {parts or 'no quantized layers'}, {len(self.tensors)} other tensors"


# ----------------------------------------------------------------------------- JSON tensors
def json_tensor(obj: dict) -> torch.Tensor:
    """A dict as a 1-D uint8 tensor of UTF-8 JSON (how ComfyUI stores comfy_quant)."""
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def tensor_json(t, source: str = "<state dict>", layer: str | None = None, what: str = "metadata tensor") -> dict:
    """The JSON object a uint8 metadata tensor holds; FormatError if it is anything else."""
    if not isinstance(t, torch.Tensor):
        raise FormatError(source, f"{what} is a {type(t).__name__}, expected a uint8 tensor of JSON", layer)
    if t.dtype == torch.int8:
        t = t.view(torch.uint8)
    if t.dtype != torch.uint8:
        raise FormatError(source, f"{what} has dtype {t.dtype}, expected uint8 (UTF-8 JSON)", layer)
    try:
        obj = json.loads(bytes(t.reshape(-1).cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(source, f"{what} is not UTF-8 JSON ({e})", layer) from None
    if not isinstance(obj, dict):
        raise FormatError(source, f"{what} holds a JSON {type(obj).__name__}, expected an object", layer)
    return obj


DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
DTYPE_OF_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_of_name(name, source: str, layer: str | None, field_name: str = "orig_dtype") -> torch.dtype:
    """A float dtype from its file name ("bfloat16", also "torch.bfloat16")."""
    if isinstance(name, str):
        key = name[len("torch."):] if name.startswith("torch.") else name
        if key in DTYPE_OF_NAME:
            return DTYPE_OF_NAME[key]
    raise FormatError(source, f"{field_name} must be one of {', '.join(DTYPE_OF_NAME)}, got {name!r}", layer)


def int_field(cfg: dict, name: str, source: str, layer: str | None, default=None):
    v = cfg.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise FormatError(source, f"JSON field {name!r} must be an integer, got {v!r}", layer)
    return v


def shape_field(cfg: dict, names: Iterable[str], source: str, layer: str | None) -> tuple[int, ...] | None:
    """The first of ``names`` present in ``cfg`` as a shape (list of positive ints)."""
    for name in names:
        if name in cfg:
            v = cfg[name]
            if (not isinstance(v, (list, tuple)) or not v
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)):
                raise FormatError(source, f"JSON field {name!r} must be a list of positive integers, got {v!r}", layer)
            return tuple(v)
    return None


# ----------------------------------------------------------------------------- reading
class TensorReader:
    """Reads the tensors of a Mapping (a dict, or lazy safetensors handles) at most once each.

    Layers ``take`` the keys they own; ``rest`` returns every key no layer took, in file order.
    Tensors read before being taken (metadata probes) are cached so no key is read twice.
    """

    def __init__(self, sd: Mapping, source: str):
        self.sd = sd
        self.source = source
        self.keys: list[str] = list(sd.keys())
        self.keyset = set(self.keys)
        self._cache: dict[str, torch.Tensor] = {}
        self._taken: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.keyset

    def get(self, key: str, layer: str | None = None) -> torch.Tensor:
        """The tensor under ``key`` (read on first use); FormatError if it is missing."""
        if key in self._cache:
            return self._cache[key]
        if key not in self.keyset:
            raise FormatError(self.source, f"missing tensor {key!r}", layer)
        try:
            t = self.sd[key]
        except Exception as e:  # a truncated or corrupt file surfaces here
            raise FormatError(self.source, f"cannot read tensor {key!r}: {e}", layer) from e
        if not isinstance(t, torch.Tensor):
            raise FormatError(self.source, f"{key!r} is a {type(t).__name__}, not a tensor", layer)
        self._cache[key] = t
        return t

    def take(self, key: str, layer: str | None = None) -> torch.Tensor:
        """Read ``key`` and mark it as owned by a layer (it will not be in ``rest``)."""
        t = self.get(key, layer)
        self._taken.add(key)
        del self._cache[key]
        return t

    def take_optional(self, key: str, layer: str | None = None) -> torch.Tensor | None:
        return self.take(key, layer) if key in self.keyset else None

    def is_taken(self, key: str) -> bool:
        return key in self._taken

    def rest(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys if k not in self._taken}


def check(t: torch.Tensor, key: str, source: str, layer: str | None, *, dtype=None,
          shape: tuple[int, ...] | None = None, numel: int | None = None) -> torch.Tensor:
    """FormatError unless ``t`` has the dtype (one of a tuple), shape and element count given."""
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            want = " or ".join(str(d).replace("torch.", "") for d in allowed)
            raise FormatError(source, f"{key}: expected dtype {want}, got {str(t.dtype).replace('torch.', '')}",
                              layer)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise FormatError(source, f"{key}: expected shape {list(shape)}, got {list(t.shape)}", layer)
    if numel is not None and t.numel() != numel:
        raise FormatError(source, f"{key}: expected {numel} elements, got {t.numel()} (shape {list(t.shape)})",
                          layer)
    return t


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A packed tensor's bytes as 1-D uint8 (bitsandbytes may store them as another dtype:
    its quant_storage), without copying when the tensor is contiguous."""
    t = t.contiguous()
    if t.dtype != torch.uint8:
        t = t.reshape(-1).view(torch.uint8)
    return t.reshape(-1)
