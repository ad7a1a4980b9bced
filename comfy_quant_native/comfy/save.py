"""Save Quantized Model: the diffusion model as one safetensors file in our comfy_quant form.

Keys are the diffusion model's own (what models/diffusion_models files carry); our
layers are written by formats.layer_tensors (packed data, scales, comfy_quant JSON);
layers of stock ComfyUI formats are written as ComfyUI writes them; everything else as
it is in memory. As ComfyUI's own savers do, the model is loaded first, so LoRA patches
are baked in (a quantized layer is dequantized, patched and requantized). The file is
written atomically (formats.save_file) and never over an existing one
unless ``overwrite``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import comfy.model_management

from .. import __version__, formats
from .qtensor import layout_of, to_quantized_weight

log = logging.getLogger("comfy_quant_native")


def model_state_dict(patcher) -> tuple[dict, Counter]:
    """(state dict of the diffusion model as it runs, with patches applied; layout counts)."""
    comfy.model_management.load_models_gpu([patcher])
    diffusion = patcher.model.diffusion_model
    sd = diffusion.state_dict()
    counts: Counter = Counter()
    for name, module in diffusion.named_modules():
        ours = layout_of(getattr(module, "weight", None)) is not None and getattr(module, "comfy_quant_layout", None)
        if ours:
            counts[module.comfy_quant_layout] += 1
        # Patches are in the weights already for a fully loaded layer (a plain one, or ours
        # merged); they are not for our side path, an offloaded layer (patched per call) or
        # dynamic VRAM (patched per cast): bake those in here.
        if getattr(module, "comfy_patched_weights", False) and getattr(module, "comfy_quant_lora", None) is None:
            continue
        for param in ("weight", "bias"):
            key = f"diffusion_model.{name}.{param}"
            if key not in patcher.patches or getattr(module, param, None) is None:
                continue
            value = patcher.patch_weight_to_device(key, device_to=patcher.load_device, return_weight=True)
            if ours and param == "weight":
                sd.update(formats.layer_tensors(name, to_quantized_weight(value)))
            else:
                sd[f"{name}.{param}"] = value.to(getattr(module, param).dtype)
    return sd, counts


def save_model(patcher, path: str, overwrite: bool = False) -> str:
    """Write the model to ``path``; returns a summary line."""
    sd, counts = model_state_dict(patcher)
    if not counts:
        raise ValueError("the model has no layer quantized by comfy_quant_native: pass it through "
                         "Quantize Model, or load it with Load Quantized Diffusion Model")
    metadata = {"comfy_quant_native": __version__,
                "layouts": ",".join(f"{k}:{v}" for k, v in sorted(counts.items()))}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    formats.save_file(path, {k: v.detach().to("cpu") for k, v in sd.items()}, metadata, overwrite=overwrite)
    summary = (f"{os.path.basename(path)}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
               + f", {len(sd)} tensors, {os.path.getsize(path) / 2**20:.1f} MiB")
    log.info("comfy_quant_native: saved %s", summary)
    return summary


def output_path(folder: str, name: str) -> str:
    """``folder/<name>.safetensors`` with ``name`` checked: relative, inside ``folder``."""
    name = name.strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name or name.startswith(("/", "\\")) or os.path.isabs(name):
        raise ValueError(f"file name must be a relative name without extension, got {name!r}")
    root = os.path.abspath(folder)
    path = os.path.abspath(os.path.join(root, name + ".safetensors"))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"file name {name!r} leads outside {root}")
    return path
