"""Which Linear layers the Quantize Model node quantizes, per architecture.

Layer names are ComfyUI's module paths inside ``diffusion_model`` (comfy/ldm/*). The
architecture is recognised from those names (a signature of layers each has). What stays
in high precision by default, per architecture: the input embedders and the final
projection (they see raw latents / text features or write the prediction, and are a
rounding error of the model's size), the timestep / guidance embedders, the modulation
layers (they scale every activation of a block, so their error is multiplied), and every
layer with fewer than ``min_params`` values. Norms are not Linear layers and are never
quantized.

Decision order for a layer (first match wins):
  1. ``exclude`` regex matches              -> keep
  2. ``include`` regex matches              -> quantize (overrides 3-5)
  3. the preset keeps it                    -> keep
  4. fewer than ``min_params`` values       -> keep
  5. the shape does not fit the group size  -> keep (4-bit: K % B; int8_block: N % B and K % B;
                                               int8_lode: K % B), as other loaders of these
                                               formats reject straddling groups
  6. otherwise                              -> quantize

This table is the ComfyUI node's. The offline converter has presets of its own
(convert/presets.py); the two should become one definition.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .. import layouts as L

MIN_PARAMS = 1_000_000

_EMBED = "input embedder / final layer"
_TIME = "timestep / guidance embedder"
_MOD = "modulation"

# (architecture, layers that must all exist), most specific first.
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("chroma", ("distilled_guidance_layer.in_proj", "double_blocks.0.img_attn.qkv")),
    ("hunyuan_video", ("txt_in.individual_token_refiner.blocks.0.mlp.0", "double_blocks.0.img_attn.qkv")),
    ("flux", ("double_blocks.0.img_attn.qkv", "img_in")),
    ("sd3", ("joint_blocks.0.context_block.attn.qkv", "context_embedder")),
    ("qwen_image", ("transformer_blocks.0.img_mod.1", "transformer_blocks.0.attn.add_q_proj")),
    ("wan", ("blocks.0.self_attn.q", "blocks.0.ffn.0")),
    ("lumina2", ("layers.0.attention.qkv", "cap_embedder.1")),
)

# Regexes searched in the module path.
KEEP: dict[str, tuple[tuple[str, str], ...]] = {
    "flux": (
        (r"^(img_in|txt_in)$", _EMBED),
        (r"^final_layer\.", _EMBED),
        (r"^(time_in|vector_in|guidance_in)\.", _TIME),
        (r"(^|\.)(img_mod|txt_mod|modulation)\.lin$", _MOD),
        (r"^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.", _MOD),
    ),
    "chroma": (
        (r"^(img_in|txt_in|img_in_patch)$", _EMBED),
        (r"^(final_layer|nerf_final_layer\w*)\.", _EMBED),
        (r"^distilled_guidance_layer\.", _MOD),
        (r"^nerf_(blocks|image_embedder)\.", "Radiance NeRF head"),
    ),
    "hunyuan_video": (
        (r"^(img_in|txt_in|byt5_in|vision_in)\.", _EMBED),
        (r"^final_layer\.", _EMBED),
        (r"^(time_in|vector_in|guidance_in|cond_type_embedding)\b", _TIME),
        (r"(^|\.)(img_mod|txt_mod|modulation)\.lin$", _MOD),
    ),
    "sd3": (
        (r"^(x_embedder|context_embedder|final_layer)\b", _EMBED),
        (r"^(t_embedder|y_embedder)\.", _TIME),
        (r"\.adaLN_modulation\.", _MOD),
    ),
    "qwen_image": (
        (r"^(img_in|txt_in|proj_out)$", _EMBED),
        (r"^(time_text_embed|norm_out)\.", _TIME),
        (r"\.(img_mod|txt_mod)\.", _MOD),
    ),
    "wan": (
        (r"^(patch_embedding|text_embedding|head)\b", _EMBED),
        (r"^(time_embedding|time_projection)\.", _TIME),
        (r"^img_emb\.", "image-conditioning projection"),
    ),
    "lumina2": (
        (r"^(x_embedder|cap_embedder|final_layer)\b", _EMBED),
        (r"^(t_embedder|time_text_embed)\.", _TIME),
        (r"\.adaLN_modulation\.", _MOD),
    ),
    "generic": (
        (r"(^|\.)(\w*embed\w*|\w*_in)(\.|$)", "embedding"),
        (r"(^|\.)(final_layer|proj_out|head|norm_out)(\.|$)", _EMBED),
        (r"(^|\.)(\w*modulation\w*|\w*_mod|adaLN\w*)(\.|$)", _MOD),
        (r"(^|\.)\w*norm\w*(\.|$)", "norm"),
    ),
    "none": (),
}
PRESETS = ("auto",) + tuple(KEEP)


def detect_architecture(layer_names: Iterable[str]) -> str | None:
    names = set(layer_names)
    for arch, signature in _SIGNATURES:
        if all(s in names for s in signature):
            return arch
    return None


def shape_problem(layout: str, group_size: int | None, shape: tuple[int, int]) -> str | None:
    """Why an [N, K] weight does not take ``layout`` cleanly, or None."""
    N, K = shape
    g = L.check_group_size(layout, group_size, K)
    if layout in L.FOUR_BIT or layout == "int8_lode":
        if K % g:
            return f"in_features {K} is not a multiple of the group size {g}"
    elif layout == "int8_block" and (N % g or K % g):
        return f"shape {N}x{K} is not a multiple of the {g}x{g} tile"
    return None


@dataclass(frozen=True)
class Decision:
    quantize: bool
    reason: str  # why it stays in high precision; "" when quantized


class LayerSelector:
    """Decides per Linear layer whether Quantize Model quantizes it (module docstring)."""

    def __init__(self, layer_names: Iterable[str], layout: str, group_size: int | None = None,
                 preset: str = "auto", include: str = "", exclude: str = "", min_params: int = MIN_PARAMS):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        self.layout = L.check_layout(layout)
        self.group_size = L.check_group_size(layout, group_size or None)
        self.detected = detect_architecture(layer_names)
        self.architecture = (self.detected or "generic") if preset == "auto" else preset
        self.include = _compile(include, "include")
        self.exclude = _compile(exclude, "exclude")
        self.min_params = int(min_params)
        self._keep = [(re.compile(rx), why) for rx, why in KEEP[self.architecture]]

    def decide(self, name: str, shape: tuple[int, int]) -> Decision:
        if self.exclude is not None and self.exclude.search(name):
            return Decision(False, "matches exclude")
        if self.include is not None and self.include.search(name):
            return Decision(True, "")
        for rx, why in self._keep:
            if rx.search(name):
                return Decision(False, f"{self.architecture}: {why}")
        if shape[0] * shape[1] < self.min_params:
            return Decision(False, f"small (< {self.min_params:,} values)")
        problem = shape_problem(self.layout, self.group_size, shape)
        if problem:
            return Decision(False, problem)
        return Decision(True, "")


def _compile(rx: str, what: str):
    if not rx or not rx.strip():
        return None
    try:
        return re.compile(rx.strip())
    except re.error as e:
        raise ValueError(f"{what}: invalid regular expression {rx!r} ({e})") from None
