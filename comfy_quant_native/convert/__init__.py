"""Whole-model conversion: streaming safetensors in and out, layer presets per
architecture, rounding methods, and the ``comfy-quant`` command line (cli.py).

    from comfy_quant_native.convert import convert_file, Converter, inspect_file
"""

from .converter import FORMATS, Converter
from .inspect import InspectReport, inspect_file
from .pipeline import ConvertSummary, convert_file, derived_output
from ..presets import ARCHITECTURES, PRESETS, detect_architecture
from .rounding import ROUNDINGS
from .safetensors_stream import ConvertError

__all__ = [
    "ARCHITECTURES",
    "FORMATS",
    "PRESETS",
    "ROUNDINGS",
    "ConvertError",
    "ConvertSummary",
    "Converter",
    "InspectReport",
    "convert_file",
    "derived_output",
    "detect_architecture",
    "inspect_file",
]
