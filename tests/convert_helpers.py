"""Small synthetic checkpoints for the converter tests (real key names, a few MB)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from comfy_quant_native.convert import synthetic

# Every architecture at toy size: the names of the real models, shapes that divide by 128.
TINY = {
    "flux": dict(hidden=256, depth=2, single=2, ctx=256, vec=128),
    "chroma": dict(hidden=128, depth=1, single=1, ctx=128, approx=128, approx_layers=2),
    "sd3": dict(hidden=128, depth=2, ctx=128, adm=128, patches=16),
    "qwen_image": dict(hidden=128, depth=2, joint=128),
    "wan": dict(dim=128, depth=2, ffn=256, text=128, i2v=True),
    "hunyuan_video": dict(hidden=128, depth=1, single=1, ctx=128),
    "hidream": dict(hidden=128, double=1, single=1, experts=2, ffn=256, llama=128, t5=128),
    "lumina2": dict(dim=128, depth=2, cap=128, heads=4, kv_heads=2, ffn=256),
}


def tiny_shapes(arch: str) -> dict:
    return synthetic.shapes(arch, **TINY[arch])


def write_tiny(path, arch: str = "flux", seed: int = 0, dtype=torch.bfloat16, prefix: str = "",
               extra: dict | None = None) -> str:
    shapes = {prefix + k: v for k, v in tiny_shapes(arch).items()}
    if extra:
        shapes.update(extra)
    synthetic.write(str(path), shapes, dtype=dtype, seed=seed, metadata={"modelspec.title": "tiny", "note": "kept"})
    return str(path)


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def json_of(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode("utf-8"))


__all__ = ["TINY", "json_of", "listing", "load_file", "save_file", "tiny_shapes", "write_tiny"]
