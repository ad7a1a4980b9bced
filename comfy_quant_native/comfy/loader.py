"""Load Quantized Diffusion Model: any file in models/diffusion_models, one entry point.

    load_diffusion_model(path) -> (ModelPatcher, summary line)

1. A safetensors file's header is checked first (files.read_safetensors_header): a file
   that is not safetensors, or is truncated, fails here naming the file and tensor.
2. The form is detected (formats.detect_form). A file with no layer of ours (plain
   weights, or only formats stock ComfyUI loads: fp8 scaled, nvfp4, mxfp8,
   int8_tensorwise with one scale per tensor or convrot...) and every non-safetensors
   file go to ComfyUI's own loader, untouched.
3. Otherwise formats.load_state_dict parses our layers (comfy_quant, bitsandbytes/Forge,
   convert_to_quant, _quantization_metadata header) into QuantizedWeights; each becomes a
   QuantizedTensor of our layout in the state dict (so ComfyUI's model detection sees the
   real [N, K] shapes) with a ``comfy_quant`` marker (so ComfyUI treats the model as mixed
   precision), and the model is built by ComfyUI with our ops class. Layers of stock
   formats in the same file are left to the stock mixed-precision loader.
Every failure is a FormatError naming the file (and the layer where there is one).
"""

from __future__ import annotations

import json
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
from .files import read_safetensors_header
from .operations import make_operations
from .qtensor import from_quantized_weight

log = logging.getLogger("comfy_quant_native")

SAFETENSORS_EXT = (".safetensors", ".sft")
# int8_tensorwise is ours when its scale is per row ([N] or [N, 1]) and not ConvRot-rotated.
OUR_FORMATS = frozenset(L.DISK_NAME.values())


def _stock_formats() -> set[str]:
    import comfy.quant_ops

    return set(comfy.quant_ops.QUANT_ALGOS)


def _layer_configs(sd, metadata) -> dict[str, dict]:
    """layer -> its comfy_quant JSON, from per-layer tensors and the file header."""
    configs = {}
    header = (metadata or {}).get("_quantization_metadata")
    if header:
        try:
            configs.update(json.loads(header).get("layers", {}))
        except (ValueError, AttributeError):
            pass  # formats reports a malformed header
    for k in sd:
        if k.endswith(".comfy_quant"):
            try:
                configs[k[: -len(".comfy_quant")]] = json.loads(bytes(sd[k].to(torch.uint8).tolist()).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                pass  # formats reports it, naming the layer
    return configs


def _is_stock_layer(layer: str, conf: dict, sd, stock: set[str]) -> bool:
    fmt = conf.get("format") if isinstance(conf, dict) else None
    if fmt not in stock:
        return False
    if fmt not in OUR_FORMATS:
        return True
    # int8_tensorwise: per-tensor scales and ConvRot rotations stay with ComfyUI.
    if conf.get("convrot") or (conf.get("params") or {}).get("convrot"):
        return True
    scale = sd.get(layer + ".weight_scale")
    weight = sd.get(layer + ".weight")
    if scale is None or weight is None or weight.dim() != 2:
        return False  # formats names what is missing
    return scale.numel() != weight.shape[0]


def split_stock_layers(sd: dict, metadata: dict | None):
    """(our state dict, our metadata, stock tensors): stock-format layers (keys and, for a
    header file, a per-layer comfy_quant tensor as ComfyUI's convert_old_quants writes)
    leave the part that formats parses."""
    stock = _stock_formats()
    configs = _layer_configs(sd, metadata)
    stock_layers = {layer for layer, conf in configs.items() if _is_stock_layer(layer, conf, sd, stock)}
    if not stock_layers:
        return sd, metadata, {}
    ours, stock_sd = {}, {}
    for k, v in sd.items():
        layer = k.rsplit(".", 1)[0]
        (stock_sd if layer in stock_layers and not k.endswith(".bias") else ours)[k] = v
    for layer in stock_layers:
        stock_sd.setdefault(layer + ".comfy_quant", json_tensor(configs[layer]))
    meta = dict(metadata or {})
    if meta.get("_quantization_metadata"):
        header = json.loads(meta["_quantization_metadata"])
        header["layers"] = {k: v for k, v in header.get("layers", {}).items() if k not in stock_layers}
        meta["_quantization_metadata"] = json.dumps(header)
    return ours, meta, stock_sd


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
    read_safetensors_header(path)
    try:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as e:
        raise formats.FormatError(path, f"cannot read it as safetensors: {e}") from None
    try:
        form = formats.detect_form(sd.keys(), metadata)
    except formats.FormatError as e:
        raise formats.FormatError(path, e.reason, e.layer) from None
    if form in ("plain", "comfyui_native"):
        return _stock_load(path, disable_dynamic), f"{name}: {form}, loaded by ComfyUI"

    ours, our_meta, stock_sd = split_stock_layers(sd, metadata)
    try:
        loaded = formats.load_state_dict(ours, our_meta, source=path)
    except formats.FormatError as e:
        raise formats.FormatError(path, e.reason, e.layer) from None
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise formats.FormatError(path, f"{type(e).__name__}: {e}") from None
    if not loaded.layers:
        return _stock_load(path, disable_dynamic), f"{name}: no layer of ours, loaded by ComfyUI"

    new_sd = dict(loaded.tensors)
    new_sd.update(stock_sd)
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
    summary = f"{name}: {loaded.summary()}" + (f", {len(stock_sd)} tensors of stock formats" if stock_sd else "")
    log.info("comfy_quant_native: loaded %s", summary)
    return model, summary


def reload_model(path: str, w8a8: bool = True, lora_mode: str = "exact", disable_dynamic: bool = False):
    return load_diffusion_model(path, w8a8=w8a8, lora_mode=lora_mode, disable_dynamic=disable_dynamic)[0]
