"""On-disk forms of quantized layers: parse and emit keys and metadata, detect the form.
No kernels here. DESIGN.md "On-disk formats" is the contract; each module's docstring gives
the exact keys and JSON of its form.

The API the converter and the ComfyUI glue use:

    layer_tensors(prefix, qw, *, with_json=True) -> dict[str, Tensor]
        The tensors of one quantized layer in our ``comfy_quant`` form, keys under
        ``prefix`` (the module path, e.g. "double_blocks.0.img_attn.qkv"): ``prefix.weight``,
        the scale tensor(s) and ``prefix.comfy_quant`` (uint8 UTF-8 JSON, left out with
        ``with_json=False`` for the header form).
    layer_json(qw) -> dict                      that layer's JSON
    layers_header(layers) -> {"_quantization_metadata": str}   the header form's metadata
    bnb_layer_tensors(prefix, qw)               a 4-bit layer as bitsandbytes saves it
    emit_state_dict(layers, tensors, form, metadata) -> (tensors, metadata)

    load_state_dict(sd, metadata=None, source="<state dict>") -> LoadedStateDict
        Split a state dict (any Mapping of key -> Tensor; safetensors' lazy handles work,
        each tensor is read once) into quantized layers (QuantizedWeight by prefix) and the
        remaining tensors, whatever form it is in; raises FormatError naming the source,
        layer and reason. Layers in ComfyUI-native formats stay in ``tensors`` (``native``).

    detect_form(keys, metadata=None) -> str
        The file's form from its keys (and header metadata) alone: one of FORMS.
    probe(sd, metadata=None, source=...) -> Probe(form, formats)
        The same, refined by reading only the small comfy_quant JSON tensors.

    load_file(path, device="cpu"), probe_file(path), save_file(path, tensors, metadata,
    overwrite=False, inputs=()), atomic_output(path, ...), open_safetensors(path) ->
    (SafetensorsMapping, metadata)                          safetensors files (files.py)

One module per form: comfy_quant.py (ours), quant_metadata.py (header), bnb.py
(bitsandbytes / Forge / diffusers), convert_to_quant.py (its Dec-2025 files), native.py
(formats left to ComfyUI); detect.py ties them together.
"""

from __future__ import annotations

from .bnb import layer_tensors as bnb_layer_tensors
from .comfy_quant import layer_json, layer_tensors
from .common import FORMS, FormatError, LoadedStateDict
from .detect import Probe, detect_form, load_state_dict, probe
from .emit import WRITE_FORMS, emit_state_dict
from .safetensors_header import TensorInfo, read_safetensors_header
from .files import SafetensorsMapping, atomic_output, load_file, open_safetensors, probe_file, save_file
from .quant_metadata import HEADER_KEY, header_metadata, layers_header

__all__ = [
    "FORMS",
    "HEADER_KEY",
    "WRITE_FORMS",
    "FormatError",
    "LoadedStateDict",
    "Probe",
    "SafetensorsMapping",
    "TensorInfo",
    "atomic_output",
    "bnb_layer_tensors",
    "detect_form",
    "emit_state_dict",
    "header_metadata",
    "read_safetensors_header",
    "layer_json",
    "layer_tensors",
    "layers_header",
    "load_file",
    "load_state_dict",
    "open_safetensors",
    "probe",
    "probe_file",
    "save_file",
]
