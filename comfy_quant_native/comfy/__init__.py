"""The ComfyUI glue.

Without ComfyUI (comfy-kitchen only): ``qtensor`` (our layouts as comfy-kitchen
QuantizedTensor layouts), ``presets`` (which layers Quantize Model quantizes),
``files`` (safetensors header check, atomic writer).
Inside ComfyUI: ``operations`` (the custom_operations class), ``loader``, ``quantize``,
``save`` (what the three nodes do) and ``nodes`` (the nodes themselves).
Nothing here is imported by ``import comfy_quant_native``.
"""
