"""Formats that stock ComfyUI loads itself (comfy/quant_ops.py QUANT_ALGOS, and the legacy
``scaled_fp8`` marker that comfy/utils.py convert_old_quants turns into per-layer JSON).

We never parse these into QuantizedWeight: a file made only of them is reported as form
"comfyui_native" so that the loader node defers to ComfyUI; in a file that mixes them with
our layouts, their tensors are passed through untouched (with a ``.comfy_quant`` tensor)
for ComfyUI's mixed-precision ops.
"""

from __future__ import annotations

# ``format`` names stock ComfyUI (and comfy-kitchen) run, as of 2026.
NATIVE_FORMATS = frozenset({
    "float8_e4m3fn",
    "float8_e5m2",
    "nvfp4",
    "mxfp8",
    "convrot_w4a4",
    "asym_w4a8_int8",
    "awq_w4a16",
    # convert_to_quant's fp8 variants (run by the ComfyUI fork it targets)
    "float8_e4m3fn_rowwise",
    "float8_e4m3fn_blockwise",
    "float8_e4m3fn_block3d",
})

# int8_tensorwise is both ours (per-row or single scale over a plain [N, K] weight) and
# ComfyUI's; these fields (top level, or under "params" as ComfyUI also reads them)
# select ComfyUI-only variants (Hadamard-rotated weights, ...).
NATIVE_INT8_TENSORWISE_FIELDS = ("convrot", "transposed", "num_experts")

SCALED_FP8_MARKER = "scaled_fp8"  # "{model_prefix}scaled_fp8": legacy fp8 file marker


def is_native_config(cfg: dict) -> bool:
    """Whether a layer's JSON names a format that only ComfyUI runs."""
    fmt = cfg.get("format")
    if fmt in NATIVE_FORMATS:
        return True
    if fmt == "int8_tensorwise":
        params = cfg.get("params") if isinstance(cfg.get("params"), dict) else {}
        return any(cfg.get(f, params.get(f)) for f in NATIVE_INT8_TENSORWISE_FIELDS)
    return False


def has_scaled_fp8_marker(keys) -> bool:
    return any(k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER) for k in keys)
