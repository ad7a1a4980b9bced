"""The three ComfyUI nodes: Load Quantized Diffusion Model, Quantize Model, Save Quantized
Model. Thin: the work is in loader.py, quantize.py and save.py. They live in the package
(imports ComfyUI's folder_paths, so only inside ComfyUI) so that a pip install serves them
too; the repository's nodes/ folder re-exports them for a custom_nodes checkout."""

from __future__ import annotations

import os

import comfy.utils
import folder_paths

from . import loader, presets, quantize, save

CATEGORY = "comfy_quant_native"
FORMATS = ("nf4", "fp4", "int8_block", "int8_lode", "int8_row")
W8A8_TIP = ("int8 layers: quantize activations per token and run the int8 matmul (W8A8); "
            "off: dequantize the weight and run a float matmul (weight-only).")


class ComfyQuantLoadDiffusionModel:
    DESCRIPTION = ("Loads a diffusion model from models/diffusion_models in any form: comfy_quant_native "
                   "files, bitsandbytes / Forge / diffusers NF4 and FP4 (with or without nested absmax), "
                   "convert_to_quant files, _quantization_metadata headers, and everything stock ComfyUI "
                   "loads. Quantized weights stay quantized in memory and run on native kernels.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The diffusion model, quantized layers on comfy_quant_native's kernels.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"),
                          {"tooltip": "A file in models/diffusion_models; its form is detected from its contents."}),
            "int8_w8a8": ("BOOLEAN", {"default": True, "tooltip": W8A8_TIP}),
        }}

    def load(self, unet_name, int8_w8a8=True):
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        model, _summary = loader.load_diffusion_model(path, w8a8=int8_w8a8)
        return (model,)


class ComfyQuantQuantizeModel:
    DESCRIPTION = ("Quantizes a loaded model's Linear layers to 4-bit (nf4, fp4) or int8 (blockwise, "
                   "lodewise, per row), layer by layer on the GPU when there is one. Returns a new MODEL; "
                   "the input is not changed. Embedders, modulation, the final layer and small layers "
                   "stay in high precision by default, per architecture.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the input with the selected layers quantized.",)
    FUNCTION = "quantize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to quantize (it is cloned, not changed)."}),
            "format": (FORMATS, {"default": "nf4", "tooltip": "nf4/fp4: 4-bit weight-only with one absmax per "
                                 "group. int8_block: one scale per BxB tile; int8_lode: per row and K-group; "
                                 "int8_row: one scale per output row."}),
            "group_size": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Values per scale; 0 = the "
                                   "format's default (64 for 4-bit, 128 for int8). Ignored by int8_row."}),
            "preset": (presets.PRESETS, {"default": "auto", "tooltip": "Which layers stay in high precision: "
                                         "auto detects the architecture; none keeps only small layers."}),
            "exclude": ("STRING", {"default": "", "tooltip": "Regex: layers whose name matches stay in high "
                                   "precision (checked first)."}),
            "include": ("STRING", {"default": "", "tooltip": "Regex: layers whose name matches are quantized "
                                   "even if the preset or the size would keep them."}),
            "min_params": ("INT", {"default": presets.MIN_PARAMS, "min": 0, "max": 2**40,
                                   "tooltip": "Layers with fewer weights than this stay in high precision."}),
            "int8_w8a8": ("BOOLEAN", {"default": True, "tooltip": W8A8_TIP}),
        }, "optional": {
            "keep_modulation": ("BOOLEAN", {"default": False, "tooltip": "Keep the modulation layers (img_mod, "
                                "txt_mod, adaLN...) in high precision: a little more accuracy for ~27% more "
                                "weight bytes on Flux. Off: they are quantized like the rest."}),
        }}

    def quantize(self, model, format, group_size, preset, exclude, include, min_params, int8_w8a8=True,
                 keep_modulation=False):
        bar = comfy.utils.ProgressBar(1)
        clone, _summary = quantize.quantize_model(
            model, format, group_size or None, preset=preset, include=include, exclude=exclude,
            min_params=min_params, w8a8=int8_w8a8, keep_modulation=keep_modulation,
            progress=lambda done, total: bar.update_absolute(done, total))
        return (clone,)


class ComfyQuantSaveModel:
    DESCRIPTION = ("Writes the model to models/diffusion_models/<name>.safetensors in the comfy_quant form "
                   "(LoRA patches baked in). Load Quantized Diffusion Model reads it back unchanged.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A model with layers quantized by this package."}),
            "name": ("STRING", {"default": "quantized/model", "tooltip": "File name under "
                                "models/diffusion_models, without .safetensors; subfolders allowed."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
        }}

    def save(self, model, name, overwrite):
        folders = folder_paths.get_folder_paths("diffusion_models")  # models/unet comes first
        folder = next((f for f in folders if os.path.basename(os.path.normpath(f)) == "diffusion_models"), folders[0])
        summary = save.save_model(model, save.output_path(folder, name), overwrite=overwrite)
        return {"ui": {"text": [summary]}}


NODE_CLASS_MAPPINGS = {
    "ComfyQuantLoadDiffusionModel": ComfyQuantLoadDiffusionModel,
    "ComfyQuantQuantizeModel": ComfyQuantQuantizeModel,
    "ComfyQuantSaveModel": ComfyQuantSaveModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ComfyQuantLoadDiffusionModel": "Load Quantized Diffusion Model",
    "ComfyQuantQuantizeModel": "Quantize Model",
    "ComfyQuantSaveModel": "Save Quantized Model",
}
