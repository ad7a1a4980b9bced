"""The ComfyUI nodes of this node pack (defined in comfy_quant_native.comfy.nodes, so that a
pip-installed package serves them as well)."""

from comfy_quant_native.comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
