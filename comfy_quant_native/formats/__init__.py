"""On-disk forms of quantized layers: parse and emit keys and metadata, detect the form.
No kernels here. DESIGN.md "On-disk formats" is the contract.

The API the converter and the ComfyUI glue use:

    layer_tensors(prefix, qw) -> dict[str, Tensor]
        The tensors of one quantized layer in our ``comfy_quant`` form, keys under
        ``prefix`` (the module path, e.g. "double_blocks.0.img_attn.qkv"): ``prefix.weight``,
        the scale tensor(s) and ``prefix.comfy_quant`` (uint8 UTF-8 JSON).

    load_state_dict(sd, metadata=None, source="<state dict>") -> LoadedStateDict
        Split a state dict (any Mapping of key -> Tensor; safetensors' lazy handles work)
        into quantized layers (QuantizedWeight by prefix) and the remaining plain tensors,
        whatever form the file is in; raises FormatError naming the source, layer and reason.

    detect_form(keys, metadata=None) -> str
        The file's form from its keys (and header metadata) alone: one of FORMS.

The form-specific code lives in one module per form (comfy_quant.py, bnb.py, ...).
"""

from __future__ import annotations

from .common import FORMS, FormatError, LoadedStateDict
from .comfy_quant import layer_tensors
from .detect import detect_form, load_state_dict

__all__ = ["FORMS", "FormatError", "LoadedStateDict", "detect_form", "layer_tensors", "load_state_dict"]
