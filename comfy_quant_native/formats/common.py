"""Shared pieces of the on-disk forms: the error type, the result of a load, JSON tensors."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..quantized import QuantizedWeight

# Forms a file can be in, as detect_form() names them.
FORMS = (
    "comfy_quant",  # ours / ComfyUI: per-layer L.comfy_quant JSON tensors
    "quantization_metadata",  # a file-level _quantization_metadata header instead
    "bnb",  # bitsandbytes / Forge / diffusers 4-bit: L.weight.absmax, L.weight.quant_state.*
    "convert_to_quant",  # convert_to_quant Dec-2025 4-bit: our keys, low-nibble order, no nibble_order
    "comfyui_native",  # formats stock ComfyUI loads itself (fp8 scaled, scaled_fp8, nvfp4, mxfp8)
    "plain",  # no quantized layers
)


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
    counts: Counter = field(default_factory=Counter)  # layout -> number of layers

    def summary(self) -> str:
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        return f"{self.form}: {parts or 'no quantized layers'}, {len(self.tensors)} other tensors"


def json_tensor(obj: dict) -> torch.Tensor:
    """A dict as a 1-D uint8 tensor of UTF-8 JSON (how ComfyUI stores comfy_quant)."""
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def tensor_json(t: torch.Tensor, source: str = "<state dict>", layer: str | None = None) -> dict:
    try:
        return json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(source, f"metadata tensor is not UTF-8 JSON ({e})", layer) from None


DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
DTYPE_OF_NAME = {v: k for k, v in DTYPE_NAMES.items()}
