"""comfy-quant-native: native (C/CUDA) 4-bit and int8 quantized weights for ComfyUI.

    from comfy_quant_native import QuantizedWeight
    qw = QuantizedWeight.from_float(w, "nf4")          # or fp4, int8_block, int8_lode, int8_row
    y = qw.linear(x, bias)                              # native kernels, x [..., K] -> [..., N]

    from comfy_quant_native import convert_file, Converter      # whole checkpoints (convert/)
    convert_file("model.safetensors", "model_nf4.safetensors", format="nf4")
"""

from . import layouts, ops, reference
from .layouts import LAYOUTS
from .ops import list_backends, use_backend
from .quantized import NestedAbsmax, QuantizedWeight, QuantParams

__version__ = "0.1.0"

__all__ = [
    "Converter",
    "LAYOUTS",
    "NestedAbsmax",
    "QuantParams",
    "QuantizedWeight",
    "convert_file",
    "inspect_file",
    "layouts",
    "list_backends",
    "ops",
    "reference",
    "use_backend",
]

# The converter (safetensors streaming, tqdm) loads on first use: the ComfyUI nodes do not need it.
_CONVERT_API = ("Converter", "convert_file", "inspect_file")


def __getattr__(name):
    if name in _CONVERT_API:
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
