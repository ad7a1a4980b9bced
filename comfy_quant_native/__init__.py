"""comfy-quant-native: native (C/CUDA) 4-bit and int8 quantized weights for ComfyUI.

    from comfy_quant_native import QuantizedWeight
    qw = QuantizedWeight.from_float(w, "nf4")          # or fp4, int8_block, int8_lode, int8_row
    y = qw.linear(x, bias)                              # native kernels, x [..., K] -> [..., N]
"""

from . import layouts, ops, reference
from .layouts import LAYOUTS
from .ops import list_backends, use_backend
from .quantized import NestedAbsmax, QuantizedWeight, QuantParams

__version__ = "0.1.0"

__all__ = [
    "LAYOUTS",
    "NestedAbsmax",
    "QuantParams",
    "QuantizedWeight",
    "layouts",
    "list_backends",
    "ops",
    "reference",
    "use_backend",
]
