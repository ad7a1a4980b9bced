"""The ops class ComfyUI builds a model with: ``model_options={"custom_operations": ops}``.

``make_operations(compute_dtype)`` returns a fresh class per model (per-model options
live on it, never on a shared class). It extends ComfyUI's ``mixed_precision_ops``, so
every format stock ComfyUI loads (fp8, nvfp4, mxfp8, int8_tensorwise...) keeps loading
through the same class, and overrides only what our layers need in ``Linear``:

- ``_load_from_state_dict``: takes a ready ``QuantizedTensor`` of one of our layouts (the
  loader parsed the file with comfy_quant_native.formats and wrapped each layer), checks
  its shape against the module and keeps it quantized on the module's device.
- ``forward``: eager calls go straight to the native kernels (``native_linear``); under
  ``torch.compile`` it calls ``F.linear``, which the layout's aten handlers turn into
  ``torch.ops.comfy_quant.*`` custom ops. Weights come through ComfyUI's
  ``cast_bias_weight`` so that lowvram offload, pinned memory and dynamic VRAM move them.
- LoRA: patches live beside the weight in the ModelPatcher; ``set_weight`` and the
  patcher callbacks of lora.py apply them as an exact low-rank side path (``lora_mode``
  "exact") or by requantizing the patched weight ("merged"); see lora.py.
- ``state_dict``: our on-disk ``comfy_quant`` form, so that memory accounting counts the
  real bytes and ComfyUI's own savers write files this package reads back.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.ops

from .. import formats
from .. import layouts as L
from .lora import LORA_MODES
from .qtensor import LAYOUT_NAME, layout_of, native_linear, native_linear_lora, to_quantized_weight


def stock_disabled_formats(load_device=None) -> list[str]:
    """Formats stock ComfyUI emulates on this device (as comfy.ops.pick_operations decides)."""
    mm = comfy.model_management
    disabled = []
    checks = (("supports_nvfp4_compute", ("nvfp4",)), ("supports_mxfp8_compute", ("mxfp8",)),
              ("supports_fp8_compute", ("float8_e4m3fn", "float8_e5m2")))
    for fn, names in checks:
        check = getattr(mm, fn, None)
        if check is not None and not check(load_device):
            disabled.extend(names)
    return disabled


def make_operations(compute_dtype: torch.dtype | None, *, w8a8: bool = True, lora_mode: str = "exact",
                    load_device=None):
    """A fresh ops class for one model. ``compute_dtype``: what our weights dequantize to
    and what plain layers are stored in (ComfyUI's manual-cast dtype for the model)."""
    if lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {lora_mode!r}")
    base = comfy.ops.mixed_precision_ops({}, compute_dtype, disabled=stock_disabled_formats(load_device))

    class ComfyQuantOperations(base):
        int8_w8a8 = w8a8

        class Linear(base.Linear):
            comfy_quant_layout = None  # our layout name once a quantized weight is set
            comfy_quant_lora_mode = lora_mode
            comfy_quant_lora = None  # (down [R, K], up [N, R]) of the exact LoRA side path
            comfy_quant_pending = False  # patched by the loader; lora.py's ON_LOAD attaches it

            def set_native_weight(self, qt) -> None:
                """Install one of our QuantizedTensors as this layer's weight."""
                layout = layout_of(qt)
                if tuple(qt.shape) != (self.out_features, self.in_features):
                    raise formats.FormatError(
                        "<model>", f"weight of shape {tuple(qt.shape)} does not fit a Linear "
                        f"[{self.out_features}, {self.in_features}]")
                dtype = ComfyQuantOperations._compute_dtype or qt._params.orig_dtype
                if qt._params.w8a8 != ComfyQuantOperations.int8_w8a8 or qt.dtype != dtype:
                    qt = type(qt)(qt._qdata, qt._layout_cls,
                                  replace(qt._params, orig_dtype=dtype, w8a8=ComfyQuantOperations.int8_w8a8))
                self.weight = torch.nn.Parameter(qt, requires_grad=False)
                self.comfy_quant_layout = layout
                self.quant_format = L.DISK_NAME[layout]
                self.layout_type = LAYOUT_NAME[layout]  # set_weight requantizes through it

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs):
                weight = state_dict.get(prefix + "weight")
                if layout_of(weight) is None:
                    return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                         missing_keys, unexpected_keys, error_msgs)
                state_dict.pop(prefix + "weight")
                state_dict.pop(prefix + "comfy_quant", None)
                try:
                    device = self.factory_kwargs.get("device")
                    self.set_native_weight(weight if device is None else weight.to(device=device))
                except formats.FormatError as e:
                    raise formats.FormatError(e.source, e.reason, prefix.rstrip(".")) from None
                # The bias (and nothing else) through torch's own loader.
                torch.nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                                      missing_keys, unexpected_keys, error_msgs)
                if prefix + "weight" in missing_keys:
                    missing_keys.remove(prefix + "weight")

            def state_dict(self, *args, destination=None, prefix="", **kwargs):
                if self.comfy_quant_layout is None:
                    return super().state_dict(*args, destination=destination, prefix=prefix, **kwargs)
                sd = destination if destination is not None else {}
                if self.bias is not None:
                    sd[prefix + "bias"] = self.bias.detach()
                sd.update(formats.layer_tensors(prefix[:-1], to_quantized_weight(self.weight.detach())))
                return sd

            def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
                if self.comfy_quant_layout is None or return_weight or self.comfy_quant_lora_mode == "merged":
                    return super().set_weight(weight, inplace_update=inplace_update, seed=seed,
                                              return_weight=return_weight, **kwargs)
                if inplace_update:
                    # Hook patches (scheduled LoRA) are applied during sampling, with no load
                    # callback after them: requantize (merged) for them.
                    merged = self.weight.requantize_from_float(weight).to(self.weight.dtype)
                    self.weight = torch.nn.Parameter(merged, requires_grad=False)
                    return None
                # exact mode: keep the quantized weight; ON_LOAD turns the patches into a side path.
                self.comfy_quant_pending = True

            def forward(self, input, *args, **kwargs):
                if self.comfy_quant_layout is None:
                    return super().forward(input, *args, **kwargs)
                if self.comfy_quant_pending:
                    raise RuntimeError("comfy_quant_native: this layer's LoRA patches were never attached "
                                       "(its ModelPatcher lacks comfy_quant_native's load callback)")
                comfy.ops.run_every_op()
                if (len(self.weight_function) > 0 or len(self.bias_function) > 0
                        or getattr(self, "comfy_force_cast_weights", False)):
                    # Patches applied per call (an offloaded layer with a LoRA), or a forced
                    # cast: ComfyUI dequantizes, patches, and we run a float linear.
                    weight, bias, offload_stream = comfy.ops.cast_bias_weight(self, input, offloadable=True)
                    out = F.linear(input, weight, bias)
                else:
                    weight, bias, offload_stream = comfy.ops.cast_bias_weight(
                        self, None, dtype=self.weight.dtype, device=input.device, bias_dtype=input.dtype,
                        offloadable=True, compute_dtype=input.dtype, want_requant=True)
                    lora = self.comfy_quant_lora
                    if torch.compiler.is_compiling() or layout_of(weight) is None:
                        # Traced (F.linear reaches the layout's custom-op handlers), or a cast
                        # that handed back a float weight: the float path.
                        out = F.linear(input, weight, bias)
                        if lora is not None:
                            out = out + F.linear(F.linear(input, lora[0].to(input.dtype)), lora[1].to(input.dtype))
                    elif lora is not None:
                        out = native_linear_lora(weight, input, bias, *lora)
                    else:
                        out = native_linear(weight, input, bias)
                comfy.ops.uncast_bias_weight(self, weight, bias, offload_stream)
                return out

    return ComfyQuantOperations


def new_linear(ops_class, qt, bias: torch.Tensor | None):
    """A Linear of ``ops_class`` holding the quantized weight ``qt`` and ``bias`` (whose
    storage it shares; it is not copied)."""
    N, K = qt.shape
    layer = ops_class.Linear(K, N, bias=False, device="meta")
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
    layer.factory_kwargs["device"] = None
    layer.set_native_weight(qt)
    return layer
