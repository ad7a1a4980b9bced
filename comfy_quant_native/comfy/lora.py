"""LoRA (and other weight patches) on our quantized layers.

Patches come from the stock loaders (``ModelPatcher.add_patches``) and live in the patcher,
beside the quantized weight, which is never overwritten by a patched copy in memory.
Two modes, chosen per model (``lora_mode`` of the ops class):

``exact`` (default): a low-rank side path. Plain LoRA patches of a layer (ComfyUI's
    LoRAAdapter without DoRA, LoCon mid or reshape; strength_model 1, no offset or
    function) are concatenated into one pair ``down [R, K]``, ``up [N, R]`` (strengths and
    alpha/rank folded into ``up``), and the layer computes
    ``y = native_linear(x, Wq) + (x down^T) up^T``. The result is the LoRA'd model exactly
    (up to float rounding), at two thin GEMMs per layer whatever the number of LoRAs.
    Patches of any other kind fall back to ``merged`` for that layer.
``merged``: the stock path: dequantize, add the patches (comfy.lora.calculate_weight),
    requantize. No per-step cost, but the requantization rounds the delta away where it is
    smaller than the quantization step (most of a small LoRA at 4 bits).

Mechanics. During a load, ComfyUI calls the layer's ``set_weight`` with the patched float
weight; in ``exact`` mode the layer keeps its quantized weight and marks itself pending.
The ``ON_LOAD`` callback installed on the patcher (``install``) then attaches the side
path to each pending layer, or requantizes the patched weight where the side path does not
apply. With dynamic VRAM (ComfyUI's aimdo loader) the patches arrive as a per-cast
``weight_lowvram_function`` instead; the callback replaces it by the side path the same
way. A layer offloaded by the legacy lowvram loader keeps ComfyUI's per-call path
(dequantize, patch, float linear). ``ON_DETACH`` and every load clear stale side paths.
"""

from __future__ import annotations

import torch

import comfy.model_patcher
import comfy.utils
from comfy.patcher_extension import CallbacksMP

try:
    from comfy.weight_adapter.lora import LoRAAdapter
except ImportError:  # older ComfyUI: no adapters, everything takes the merged path
    LoRAAdapter = None

from .qtensor import layout_of

CALLBACK_KEY = "comfy_quant_native"
LORA_MODES = ("exact", "merged")


def side_factors(patches, device, dtype):
    """(down [R, K], up [N, R]) for a layer's patch list, () if it has no active patch,
    None if some patch is not a plain LoRA (then the layer takes the merged path)."""
    downs, ups = [], []
    for patch in patches:
        strength, v, strength_model, offset, function = patch[:5]
        if LoRAAdapter is None or type(v) is not LoRAAdapter:
            return None
        if strength_model != 1.0 or offset is not None or function is not None:
            return None
        up, down, alpha, mid, dora_scale, reshape = v.weights[:6]
        if mid is not None or dora_scale is not None or reshape is not None or up.dim() != 2 or down.dim() != 2:
            return None
        if strength == 0.0:
            continue
        rank = down.shape[0]
        scale = strength * (float(alpha) / rank if alpha is not None else 1.0)
        downs.append(down.to(device=device, dtype=torch.float32))
        ups.append(up.to(device=device, dtype=torch.float32) * scale)
    if not downs:
        return ()
    return torch.cat(downs).to(dtype), torch.cat(ups, dim=1).to(dtype)


def _our_layers(patcher):
    for name, module in patcher.model.named_modules():
        if getattr(module, "comfy_quant_layout", None) is not None and layout_of(module.weight) is not None:
            yield name, module


def _on_load(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load):
    for name, module in _our_layers(patcher):
        pending = module.comfy_quant_pending
        module.comfy_quant_pending = False
        key = f"{name}.weight"
        patches = patcher.patches.get(key)
        dynamic_fn = getattr(module, "weight_lowvram_function", None)
        if not patches:
            module.comfy_quant_lora = None
            continue
        if not pending and dynamic_fn is None:
            if not getattr(module, "comfy_patched_weights", False):
                module.comfy_quant_lora = None  # offloaded: ComfyUI patches it per call
            continue  # else patched by an earlier load with these patches: keep it
        w = module.weight
        factors = side_factors(patches, w.device, w.dtype)
        module.comfy_quant_lora = None
        if factors is not None and module.comfy_quant_lora_mode == "exact":
            module.comfy_quant_lora = factors or None
            if dynamic_fn is not None:
                module.weight_lowvram_function = None
        elif pending:
            # Not side-path material: requantize the patched weight now (merged).
            merged = patcher.patch_weight_to_device(key, device_to=w.device, return_weight=True)
            module.weight = torch.nn.Parameter(merged, requires_grad=False)


def _on_detach(patcher, unpatch_all):
    if not unpatch_all:
        return  # the weights stay patched (ComfyUI switching between clones): keep the side path
    for _, module in _our_layers(patcher):
        module.comfy_quant_lora = None
        module.comfy_quant_pending = False


def install(patcher) -> None:
    """Attach the load/detach callbacks to ``patcher`` (clones inherit them). Idempotent."""
    for kind, fn in ((CallbacksMP.ON_LOAD, _on_load), (CallbacksMP.ON_DETACH, _on_detach)):
        patcher.remove_callbacks_with_key(kind, CALLBACK_KEY)
        patcher.add_callback_with_key(kind, CALLBACK_KEY, fn)
