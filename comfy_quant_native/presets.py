"""Which layers of a diffusion model are quantized and which stay in high precision:
the one definition that the offline converter (convert/) and the Quantize Model node
(comfy/) share.

Key names are ComfyUI's (comfy/ldm/*), as its diffusion-model files carry them; a file
whose keys sit under a prefix (``model.diffusion_model.`` in full checkpoints) is read
through that prefix, and tensors outside it (VAE, text encoders) are kept as they are.

Rules, in order, for each ``L.weight`` of the file (first match decides):
  1. ``--exclude`` regex matches L               -> keep (user)
  2. ``--include`` regex matches L               -> quantize (user; an error if the shape
                                                    cannot take the format's group size)
  3. not a 2-D floating-point weight             -> keep (biases, norms, convs, embeddings
                                                    tables that are not Linear weights)
  4. the preset keeps L (table below)            -> keep, with the preset's reason
  5. a modulation layer and ``keep_modulation``  -> keep (off by default, see flux below)
  6. fewer than ``min_params`` values (1M)       -> keep: tiny layers save nothing and
                                                    cost a kernel launch each
  7. otherwise                                   -> quantize
A layer to quantize whose shape cannot take the format's group size (``shape_problem``:
K, or N for int8_blockwise, not a multiple of it: groups would straddle rows, which other
loaders of these formats reject) stops the converter with an error naming it before
anything is written; the Quantize Model node keeps such a layer in high precision.
Everything that is not a ``.weight`` (biases, ``.scale`` of RMSNorms, pos_embed...)
is copied unchanged.

Per architecture, what stays in high precision and why (all: input embedders and the
final projection, which see raw latents / text features or write the prediction and
are a rounding error of the model's size):
  flux           img_in, txt_in, time_in, vector_in, guidance_in, final_layer (and
                 Flux.2's shared stream modulations, one layer for all blocks).
                 Modulation (img_mod/txt_mod/modulation.lin, 27% of Flux's weights) is
                 quantized: keeping it in bf16 puts a 4-bit Flux at 0.47x of bf16 bytes
                 instead of 0.28x, and its output error is no worse than the other
                 layers' (docs/QUALITY.md).
  chroma         as flux, plus distilled_guidance_layer (the approximator that computes
                 every block's modulation from the timestep) and the Radiance nerf_*
                 layers and patch embedders.
  sd3            x_embedder, t_embedder, y_embedder, context_embedder, pos_embed,
                 final_layer.
  qwen_image     img_in, txt_in, time_text_embed, norm_out, proj_out, and the first
                 block's img_mod (the most sensitive modulation of the model).
  wan            patch_embedding, text_embedding, time_embedding, time_projection, head,
                 img_emb (image conditioning), and Wan 2.2 S2V/Animate adapters (audio,
                 pose, face, motion, reference encoders).
  hunyuan_video  img_in, txt_in (the token refiner: runs once per step on text),
                 time_in, vector_in, guidance_in, byt5_in, vision_in, cond_type_embedding,
                 final_layer.
  hidream        x_embedder, t_embedder, p_embedder, caption_projection, final_layer,
                 and the MoE routers (ff_i.gate: a wrong route costs more than rounding).
  lumina2        x_embedder, t_embedder, cap_embedder, final_layer, and adaLN_modulation
                 (Lumina 2 / Z-Image: small, timestep-driven; kept as convert_to_quant's
                 Z-Image list keeps it).
  generic        (no architecture recognised) embed/embedder, norm, final_layer,
                 proj_out, head, lm_head.
  none           nothing: every 2-D weight above min_params is quantized.
Modulation layers (per architecture in ``_MODULATION``) are quantized unless
``keep_modulation`` is set: docs/QUALITY.md measures their output error no worse than
the other layers', and keeping them in bf16 costs 27% of Flux's weight bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


ARCHITECTURES = ("flux", "chroma", "sd3", "qwen_image", "wan", "hunyuan_video", "hidream", "lumina2")
PRESETS = ARCHITECTURES + ("generic", "none", "auto")
MIN_PARAMS = 1_000_000

# Prefixes under which ComfyUI finds the diffusion model in a full checkpoint.
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

# Detection: every listed key (relative to the prefix) must be present; first match wins,
# so more specific architectures come before those whose keys they share.
_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("chroma", ("distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight")),
    ("hunyuan_video", ("txt_in.individual_token_refiner.blocks.0.norm1.weight",)),
    ("flux", ("double_blocks.0.img_attn.norm.key_norm.scale", "double_blocks.0.img_attn.qkv.weight")),
    ("sd3", ("joint_blocks.0.context_block.attn.qkv.weight", "x_embedder.proj.weight")),
    ("qwen_image", ("transformer_blocks.0.img_mod.1.weight", "transformer_blocks.0.attn.add_q_proj.weight")),
    ("wan", ("blocks.0.self_attn.q.weight", "head.modulation")),
    ("hidream", ("double_stream_blocks.0.block.attn1.to_q.weight", "caption_projection.0.linear.weight")),
    ("lumina2", ("layers.0.attention.qkv.weight", "cap_embedder.1.weight")),
)

_EMBED_FINAL = "input embedder / final layer"
# (regex searched in the layer path relative to the prefix, reason)
_KEEP: dict[str, tuple[tuple[str, str], ...]] = {
    "flux": (
        (r"^(img_in|txt_in)\b", _EMBED_FINAL),
        (r"^(time_in|vector_in|guidance_in)\.", "timestep / pooled-text / guidance embedder"),
        (r"^final_layer\.", _EMBED_FINAL),
        (r"^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.",
         "Flux.2 shared modulation (one for all blocks)"),
    ),
    "chroma": (
        (r"^(img_in|txt_in|img_in_patch)\b", _EMBED_FINAL),
        (r"^distilled_guidance_layer\.", "modulation approximator (computes every block's modulation)"),
        (r"^(final_layer|nerf_final_layer\w*)\.", _EMBED_FINAL),
        (r"^nerf_(blocks|image_embedder)\.", "Radiance NeRF head"),
        (r"__x0__", "Radiance x0 layer"),
    ),
    "sd3": (
        (r"^(x_embedder|t_embedder|y_embedder|context_embedder)\b", _EMBED_FINAL),
        (r"^pos_embed", _EMBED_FINAL),
        (r"^final_layer\.", _EMBED_FINAL),
    ),
    "qwen_image": (
        (r"^(img_in|txt_in|proj_out)\b", _EMBED_FINAL),
        (r"^(time_text_embed|norm_out)\.", "timestep embedder / final modulation"),
        (r"^transformer_blocks\.0\.img_mod\.", "first block's modulation (most sensitive)"),
    ),
    "wan": (
        (r"^(patch_embedding|text_embedding|time_embedding|time_projection)\b", _EMBED_FINAL),
        (r"^head\.", _EMBED_FINAL),
        (r"^img_emb\.", "image-conditioning projection"),
        (r"(audio_model|casual_audio_encoder|audio_injector|frame_packer|trainable_cond_mask|"
         r"cond_encoder|face_encoder|face_adapter|motion_encoder|pose_patch_embedding|ref_conv|"
         r"control_adapter)", "conditioning adapter (S2V / Animate / Fun)"),
    ),
    "hunyuan_video": (
        (r"^(img_in|txt_in|byt5_in|vision_in)\.", "input embedder / token refiner"),
        (r"^(time_in|vector_in|guidance_in|cond_type_embedding)\b", "timestep / pooled-text / guidance embedder"),
        (r"^final_layer\.", _EMBED_FINAL),
    ),
    "hidream": (
        (r"^(x_embedder|t_embedder|p_embedder|caption_projection)\.", _EMBED_FINAL),
        (r"^final_layer\.", _EMBED_FINAL),
        (r"\.gate$", "MoE router"),
    ),
    "lumina2": (
        (r"^(x_embedder|t_embedder|cap_embedder|clip_text_pooled_proj|time_text_embed)\b", _EMBED_FINAL),
        (r"^final_layer\.", _EMBED_FINAL),
        (r"\.adaLN_modulation\.", "timestep modulation (small; kept as for Z-Image)"),
    ),
    "generic": (
        (r"(^|\.)(embed\w*|\w*_embedder|\w*embedding\w*)(\.|$)", "embedding"),
        (r"(^|\.)\w*norm\w*(\.|$)", "norm"),
        (r"(^|\.)(final_layer|proj_out|head|lm_head)(\.|$)", _EMBED_FINAL),
    ),
    "none": (),
}

# Modulation layers: kept only with keep_modulation (rule 5).
_MOD_ANY = r"(^|\.)(img_mod|txt_mod|modulation|adaLN_modulation)(\.|$)"
_MODULATION: dict[str, str] = {arch: _MOD_ANY for arch in _KEEP}
_MODULATION["none"] = r"(?!)"


def detect_architecture(keys: Iterable[str]) -> tuple[str | None, str]:
    """(architecture or None, prefix) from the names alone: tensor keys of a file, or
    the module paths of a loaded model (a signature key then matches its module)."""
    keys = list(keys)
    for p in ("",) + MODEL_PREFIXES:
        rel = {k[len(p):] for k in keys if k.startswith(p)}
        if not rel:
            continue
        for arch, sig in _SIGNATURES:
            if all(s in rel or s.rpartition(".")[0] in rel for s in sig):
                return arch, p
    return None, ""


def shape_problem(layout: str, group_size: int | None, shape: tuple[int, ...]) -> str | None:
    """Why a weight of ``shape`` cannot take ``layout`` at ``group_size`` (None: it can)."""
    if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0:
        return f"not a 2-D [out, in] weight (shape {list(shape)})"
    if group_size is None:
        return None
    N, K = shape
    if K % group_size:
        return f"in_features {K} is not a multiple of group size {group_size}"
    if layout == "int8_block" and N % group_size:
        return f"out_features {N} is not a multiple of block size {group_size}"
    return None


@dataclass(frozen=True)
class Decision:
    quantize: bool
    reason: str  # why kept (empty when quantized); "forced by --include" when forced
    forced: bool = False


class LayerSelector:
    """Decides per weight whether it is quantized (rules in the module docstring)."""

    def __init__(self, preset: str, keys: Iterable[str], include: str | None = None,
                 exclude: str | None = None, min_params: int = MIN_PARAMS, keep_modulation: bool = False):
        keys = list(keys)
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        arch, prefix = detect_architecture(keys)
        self.detected = arch
        if preset == "auto":
            self.architecture = arch or "generic"
        else:
            self.architecture = preset
        self.prefix = prefix  # the layout of the file, whatever preset is forced
        self.min_params = min_params
        self.include = _compile(include, "--include")
        self.exclude = _compile(exclude, "--exclude")
        self._keep = [(re.compile(rx), why) for rx, why in _KEEP[self.architecture]]
        if keep_modulation:
            self._keep.append((re.compile(_MODULATION[self.architecture]), "modulation (keep_modulation)"))

    def decide(self, layer: str, shape: tuple[int, ...], floating: bool) -> Decision:
        """``layer`` is the module path (the key without ``.weight``)."""
        if self.exclude is not None and self.exclude.search(layer):
            return Decision(False, "excluded by --exclude")
        is_matrix = floating and len(shape) == 2 and all(s > 0 for s in shape)
        if self.include is not None and self.include.search(layer):
            if not is_matrix:
                return Decision(False, "not a 2-D floating-point weight (--include cannot quantize it)")
            return Decision(True, "forced by --include", forced=True)
        if not is_matrix:
            return Decision(False, "not a 2-D floating-point weight")
        if self.prefix and not layer.startswith(self.prefix):
            return Decision(False, "outside the diffusion model")
        rel = layer[len(self.prefix):]
        for rx, why in self._keep:
            if rx.search(rel):
                return Decision(False, f"{self.architecture}: {why}")
        if shape[0] * shape[1] < self.min_params:
            return Decision(False, f"small (< {self.min_params:,} values)")
        return Decision(True, "")


def _compile(rx: str | None, what: str):
    if rx is None or rx == "":
        return None
    try:
        return re.compile(rx)
    except re.error as e:
        raise ValueError(f"{what}: invalid regular expression {rx!r} ({e})") from None


def describe(preset: str) -> list[tuple[str, str]]:
    """(regex, reason) pairs the preset keeps in high precision (for --help and docs)."""
    return list(_KEEP[preset])


def layer_counts(decisions: Mapping[str, Decision]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in decisions.values():
        k = "quantized" if d.quantize else d.reason
        out[k] = out.get(k, 0) + 1
    return out
