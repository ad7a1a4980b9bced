"""Quantize Model: MODEL -> MODEL, on a clone; the input model is never changed.

The clone replaces each selected Linear with a Linear of our ops class through an object
patch (``ModelPatcher.add_object_patch``): ComfyUI swaps the modules in when the clone is
loaded and restores the originals when another patcher of the same model is loaded, so
the input MODEL keeps working beside it. The clone gets its own patches_uuid (switching
between the two reloads the weights) and its real size (for memory estimates).

Layer by layer: the original weight (never a LoRA-patched one: the patcher's backup holds
the original while a patched copy is loaded) is copied to the torch device (the GPU when
there is one), quantized there, and the result moved back to where the model keeps its
weights. Peak memory grows by one layer's float copy plus the quantized layers.
"""

from __future__ import annotations

import logging
import uuid

import torch

import comfy.model_management
import comfy.utils
from comfy_kitchen.tensor import QuantizedTensor

from .. import layouts as L
from . import lora
from .operations import make_operations, new_linear
from .presets import MIN_PARAMS, LayerSelector
from .qtensor import quantize

log = logging.getLogger("comfy_quant_native")


def _is_linear(m: torch.nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(m, "in_features")
            and hasattr(m, "out_features") and type(m).__name__ == "Linear")


def _source_module(patcher, name: str) -> torch.nn.Module:
    """The input patcher's view of module ``diffusion_model.<name>``: its own object patch,
    else the original behind another clone's patch, else the module in the model."""
    full = f"diffusion_model.{name}"
    if full in patcher.object_patches:
        return patcher.object_patches[full]
    if full in patcher.object_patches_backup:
        return patcher.object_patches_backup[full]
    return comfy.utils.get_attr(patcher.model, full)


def _source_weight(patcher, name: str, module: torch.nn.Module) -> torch.Tensor:
    """The module's unpatched weight. Only the module now in the model can carry weight
    patches (ComfyUI restores weights before it swaps modules back), and then the shared
    backup holds its original."""
    w = module.weight
    if comfy.utils.get_attr(patcher.model, f"diffusion_model.{name}") is module:
        backup = patcher.backup.get(f"diffusion_model.{name}.weight")
        if backup is not None:
            w = backup.weight
    if getattr(w, "is_meta", False) or w.device.type == "meta":
        raise RuntimeError(f"layer {name}: its weight is not in memory (meta tensor); load the model first")
    return w


def _bytes(t: torch.Tensor) -> int:
    if isinstance(t, QuantizedTensor):
        inner, _ = t.__tensor_flatten__()
        return sum(getattr(t, a).nbytes for a in inner)
    return t.nbytes


def quantize_model(patcher, layout: str, group_size: int | None = None, *, preset: str = "auto",
                   include: str = "", exclude: str = "", min_params: int = MIN_PARAMS, w8a8: bool = True,
                   lora_mode: str = "exact", keep_modulation: bool = False, progress=None):
    """Returns (quantized clone, summary line). ``progress(done, total)`` is called per layer."""
    L.check_layout(layout)
    diffusion = patcher.model.diffusion_model
    linears = {name: m for name, m in diffusion.named_modules() if name and _is_linear(m)}
    # Prefer what this patcher sees (its own earlier object patches).
    linears = {name: _source_module(patcher, name) for name in linears}
    # Architecture signatures name modules and parameters (norms, modulation vectors) alike.
    names = [n for n, _ in diffusion.named_modules() if n] + [n for n, _ in diffusion.named_parameters()]
    selector = LayerSelector(names, layout, group_size, preset=preset, include=include,
                             exclude=exclude, min_params=min_params, keep_modulation=keep_modulation)
    chosen, kept = [], {}
    for name, m in linears.items():
        d = selector.decide(name, (m.out_features, m.in_features))
        if d.quantize:
            chosen.append((name, m))
        else:
            kept[d.reason] = kept.get(d.reason, 0) + 1
    if not chosen:
        raise ValueError(f"no layer to quantize: architecture {selector.architecture}, "
                         f"{len(linears)} Linear layers, kept: {kept}; lower min_params or use include")

    compute_dtype = patcher.model.manual_cast_dtype or patcher.model_dtype()
    ops_class = make_operations(compute_dtype, w8a8=w8a8, lora_mode=lora_mode, load_device=patcher.load_device)
    work_device = comfy.model_management.get_torch_device()
    clone = patcher.clone()
    saved = 0
    for i, (name, m) in enumerate(chosen):
        w = _source_weight(patcher, name, m)
        home = w.device
        wd = w.to(work_device)
        if isinstance(wd, QuantizedTensor):
            wd = wd.dequantize()
        qt = quantize(wd, layout, group_size or None, compute_dtype=compute_dtype, w8a8=w8a8).to(device=home)
        del wd
        clone.add_object_patch(f"diffusion_model.{name}", new_linear(ops_class, qt, m.bias))
        saved += _bytes(w) - _bytes(qt)
        if progress is not None:
            progress(i + 1, len(chosen))
    clone.size = max(0, patcher.model_size() - saved)
    clone.patches_uuid = uuid.uuid4()
    lora.install(clone)
    kept_text = ", ".join(f"{n} {why}" for why, n in sorted(kept.items())) or "none"
    summary = (f"{len(chosen)} of {len(linears)} Linear layers to {layout} "
               f"(group {L.check_group_size(layout, group_size or None) or 'row'}), "
               f"architecture {selector.architecture}; kept: {kept_text}; {saved / 2**20:.1f} MiB saved")
    log.info("comfy_quant_native: quantized %s", summary)
    return clone, summary
