"""ComfyUI entry point: this folder dropped into ComfyUI/custom_nodes/ loads as a node pack.

The nodes import ComfyUI; the package comfy_quant_native itself does not, so that the
command-line converter and the tests run without ComfyUI.
"""

import logging
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
try:
    import comfy.utils  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    pass
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

    import comfy_quant_native

    logging.getLogger("comfy_quant_native").info(
        "comfy_quant_native %s from %s; backends: %s", comfy_quant_native.__version__,
        os.path.dirname(comfy_quant_native.__file__), comfy_quant_native.list_backends())

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
