"""Load Quantized Diffusion Model: any file in models/diffusion_models, one entry point.

    load_diffusion_model(path) -> (ModelPatcher, summary line)

1. A safetensors file's header is checked first (formats.read_safetensors_header): a file
   that is not safetensors, or is truncated, fails here naming the file and tensor.
2. The form is detected (formats.probe). A file with no layer of ours (plain weights,
   or only formats stock ComfyUI runs: fp8 scaled, nvfp4, mxfp8, ConvRot int8...) and
   every non-safetensors file go to ComfyUI's own loader, untouched.
3. Otherwise formats.load_state_dict parses our layers (comfy_quant, bitsandbytes/Forge,
   convert_to_quant, _quantization_metadata header) into QuantizedWeights; each becomes a
   QuantizedTensor of our layout in the state dict (so ComfyUI's model detection sees the
   real [N, K] shapes) with a ``comfy_quant`` marker (so ComfyUI treats the model as mixed
   precision), and the model is built by ComfyUI with our ops class. Layers of stock
   formats in the same file (formats keeps them, JSON and all) go to the stock
   mixed-precision loader that our ops class extends.
Every failure is a FormatError naming the file (and the layer where there is one).
"""

from __future__ import annotations

import logging
import os

import torch

import comfy.model_detection
import comfy.model_management
import comfy.sd
import comfy.utils

from .. import formats
from . import lora
from .. import layouts as L
from ..formats.common import json_tensor
from .operations import make_operations
from .qtensor import from_quantized_weight

log = logging.getLogger("comfy_quant_native")

SAFETENSORS_EXT = (".safetensors", ".sft")


def _compute_dtype(sd: dict, metadata, load_device) -> torch.dtype:
    """The dtype ComfyUI computes a mixed-precision model in on ``load_device`` (what
    comfy.sd.load_diffusion_model_state_dict decides for a model with quantized layers)."""
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    temp = comfy.utils.state_dict_prefix_replace(dict(sd), {prefix: ""}, filter_keys=True) or dict(sd)
    config = comfy.model_detection.model_config_from_unet(temp, "", metadata=metadata)
    supported = config.supported_inference_dtypes if config is not None else [torch.bfloat16, torch.float16, torch.float32]
    return comfy.model_management.unet_manual_cast(None, load_device, supported) or torch.float32


def _stock_load(path: str, disable_dynamic: bool = False):
    try:
        model = comfy.sd.load_diffusion_model(path, disable_dynamic=disable_dynamic)
    except formats.FormatError:
        raise
    except Exception as e:
        raise formats.FormatError(path, f"ComfyUI could not load it: {type(e).__name__}: {e}") from e
    if model is None:
        raise formats.FormatError(path, "ComfyUI recognises no diffusion model architecture in it")
    return model


def load_diffusion_model(path: str, *, w8a8: bool = True, lora_mode: str = "exact", disable_dynamic: bool = False):
    """Load any supported diffusion model file. Returns (ModelPatcher, summary)."""
    name = os.path.basename(path)
    if not path.lower().endswith(SAFETENSORS_EXT):
        return _stock_load(path, disable_dynamic), f"{name}: not safetensors, loaded by ComfyUI"
    formats.read_safetensors_header(path)
    try:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as e:
        raise formats.FormatError(path, f"cannot read it as safetensors: {e}") from None
    try:
        form = formats.probe(sd, metadata, source=path).form
        if form in ("plain", "comfyui_native"):
            return _stock_load(path, disable_dynamic), f"{name}: {form}, loaded by ComfyUI"
        loaded = formats.load_state_dict(sd, metadata, source=path)
    except formats.FormatError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise formats.FormatError(path, f"{type(e).__name__}: {e}") from None
    if not loaded.layers:
        return _stock_load(path, disable_dynamic), f"{name}: no layer of ours, loaded by ComfyUI"

    # Layers of stock formats stay in loaded.tensors (with their comfy_quant JSON) for
    # ComfyUI's mixed-precision ops; ours become QuantizedTensors with a marker.
    new_sd = dict(loaded.tensors)
    for layer, qw in loaded.layers.items():
        new_sd[layer + ".weight"] = from_quantized_weight(qw, w8a8=w8a8)
        new_sd[layer + ".comfy_quant"] = json_tensor({"format": L.DISK_NAME[qw.layout]})
    load_device = comfy.model_management.get_torch_device()
    ops = make_operations(_compute_dtype(new_sd, metadata, load_device), w8a8=w8a8, lora_mode=lora_mode,
                          load_device=load_device)
    try:
        model = comfy.sd.load_diffusion_model_state_dict(new_sd, model_options={"custom_operations": ops},
                                                         metadata=metadata, disable_dynamic=disable_dynamic)
    except formats.FormatError as e:
        raise formats.FormatError(path, e.reason, e.layer) from None
    except Exception as e:
        raise formats.FormatError(path, f"building the model failed: {type(e).__name__}: {e}") from e
    if model is None:
        raise formats.FormatError(path, "ComfyUI recognises no diffusion model architecture in it")
    # How ComfyUI rebuilds the model (non-dynamic clones, multi-GPU copies): load it again.
    model.cached_patcher_init = (reload_model, (path, w8a8, lora_mode))
    lora.install(model)
    summary = f"{name}: {loaded.summary()}"
    log.info("comfy_quant_native: loaded %s", summary)
    return model, summary


def reload_model(path: str, w8a8: bool = True, lora_mode: str = "exact", disable_dynamic: bool = False):
    return load_diffusion_model(path, w8a8=w8a8, lora_mode=lora_mode, disable_dynamic=disable_dynamic)[0]
