"""Synthetic checkpoints with real architectures' tensor names and shapes (ComfyUI's key
names), for the converter's tests and benchmark. ``shapes(arch, **dims)`` gives the
names and shapes; ``write(path, shapes)`` writes a file of heavy-tailed bf16 weights
with outlier input channels (what diffusion transformer weights look like), streaming,
without holding the model in memory.

    shapes("flux")                   Flux.1-dev: 11.9 G parameters, 23.8 GB in bf16
    shapes("flux", hidden=256, depth=2, single=2)   the same names, a few MB
"""

from __future__ import annotations

import math

import torch

from .safetensors_stream import OutputSpec, SafetensorsWriter

Shapes = dict[str, tuple[int, ...]]


def _linear(out: Shapes, name: str, n: int, k: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (n, k)
    if bias:
        out[f"{name}.bias"] = (n,)


def _double_block(out: Shapes, p: str, h: int, m: int, head_dim: int, modulation: bool) -> None:
    """One side (img or txt) of a Flux-family double block; Chroma's has no modulation."""
    if modulation:
        _linear(out, f"{p}_mod.lin", 6 * h, h)
    _linear(out, f"{p}_attn.qkv", 3 * h, h)
    out[f"{p}_attn.norm.query_norm.scale"] = (head_dim,)
    out[f"{p}_attn.norm.key_norm.scale"] = (head_dim,)
    _linear(out, f"{p}_attn.proj", h, h)
    _linear(out, f"{p}_mlp.0", m, h)
    _linear(out, f"{p}_mlp.2", h, m)


def _single_block(out: Shapes, p: str, h: int, m: int, head_dim: int, modulation: bool) -> None:
    """A Flux-family single block; Chroma's has no modulation."""
    _linear(out, f"{p}.linear1", 3 * h + m, h)
    _linear(out, f"{p}.linear2", h, h + m)
    out[f"{p}.norm.query_norm.scale"] = (head_dim,)
    out[f"{p}.norm.key_norm.scale"] = (head_dim,)
    if modulation:
        _linear(out, f"{p}.modulation.lin", 3 * h, h)


def flux(hidden=3072, depth=19, single=38, in_ch=64, ctx=4096, vec=768, mlp_ratio=4, head_dim=128,
         guidance=True) -> Shapes:
    h, m = hidden, hidden * mlp_ratio
    s: Shapes = {}
    _linear(s, "img_in", h, in_ch)
    _linear(s, "txt_in", h, ctx)
    for emb, k in (("time_in", 256), ("vector_in", vec)) + ((("guidance_in", 256),) if guidance else ()):
        _linear(s, f"{emb}.in_layer", h, k)
        _linear(s, f"{emb}.out_layer", h, h)
    for i in range(depth):
        for side in ("img", "txt"):
            _double_block(s, f"double_blocks.{i}.{side}", h, m, head_dim, modulation=True)
    for i in range(single):
        _single_block(s, f"single_blocks.{i}", h, m, head_dim, modulation=True)
    _linear(s, "final_layer.linear", in_ch, h)
    _linear(s, "final_layer.adaLN_modulation.1", 2 * h, h)
    return s


def chroma(hidden=3072, depth=19, single=38, in_ch=64, ctx=4096, approx=5120, approx_layers=5, mlp_ratio=4,
           head_dim=128) -> Shapes:
    h, m = hidden, hidden * mlp_ratio
    s: Shapes = {}
    _linear(s, "img_in", h, in_ch)
    _linear(s, "txt_in", h, ctx)
    _linear(s, "distilled_guidance_layer.in_proj", approx, 64)
    for i in range(approx_layers):
        _linear(s, f"distilled_guidance_layer.layers.{i}.in_layer", approx, approx)
        _linear(s, f"distilled_guidance_layer.layers.{i}.out_layer", approx, approx)
        s[f"distilled_guidance_layer.norms.{i}.scale"] = (approx,)
    _linear(s, "distilled_guidance_layer.out_proj", h, approx)
    for i in range(depth):
        for side in ("img", "txt"):
            _double_block(s, f"double_blocks.{i}.{side}", h, m, head_dim, modulation=False)
    for i in range(single):
        _single_block(s, f"single_blocks.{i}", h, m, head_dim, modulation=False)
    _linear(s, "final_layer.linear", in_ch, h)
    return s


def sd3(hidden=1536, depth=24, ctx=4096, adm=2048, patches=36864) -> Shapes:
    h = hidden
    s: Shapes = {"x_embedder.proj.weight": (h, 16, 2, 2), "x_embedder.proj.bias": (h,), "pos_embed": (1, patches, h)}
    _linear(s, "t_embedder.mlp.0", h, 256)
    _linear(s, "t_embedder.mlp.2", h, h)
    _linear(s, "y_embedder.mlp.0", h, adm)
    _linear(s, "y_embedder.mlp.2", h, h)
    _linear(s, "context_embedder", h, ctx)
    for i in range(depth):
        for blk in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{blk}"
            last_ctx = blk == "context_block" and i == depth - 1
            _linear(s, f"{p}.attn.qkv", 3 * h, h)
            _linear(s, f"{p}.adaLN_modulation.1", (2 if last_ctx else 6) * h, h)
            if not last_ctx:
                _linear(s, f"{p}.attn.proj", h, h)
                _linear(s, f"{p}.mlp.fc1", 4 * h, h)
                _linear(s, f"{p}.mlp.fc2", h, 4 * h)
    _linear(s, "final_layer.linear", 64, h)
    _linear(s, "final_layer.adaLN_modulation.1", 2 * h, h)
    return s


def qwen_image(hidden=3072, depth=60, joint=3584, in_ch=64, head_dim=128) -> Shapes:
    h = hidden
    s: Shapes = {"txt_norm.weight": (joint,)}
    _linear(s, "img_in", h, in_ch)
    _linear(s, "txt_in", h, joint)
    _linear(s, "time_text_embed.timestep_embedder.linear_1", h, 256)
    _linear(s, "time_text_embed.timestep_embedder.linear_2", h, h)
    for i in range(depth):
        p = f"transformer_blocks.{i}"
        _linear(s, f"{p}.img_mod.1", 6 * h, h)
        _linear(s, f"{p}.txt_mod.1", 6 * h, h)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _linear(s, f"{p}.attn.{proj}", h, h)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            s[f"{p}.attn.{norm}.weight"] = (head_dim,)
        for side in ("img", "txt"):
            _linear(s, f"{p}.{side}_mlp.net.0.proj", 4 * h, h)
            _linear(s, f"{p}.{side}_mlp.net.2", h, 4 * h)
    _linear(s, "norm_out.linear", 2 * h, h)
    _linear(s, "proj_out", in_ch, h)
    return s


def wan(dim=5120, depth=40, ffn=13824, text=4096, i2v=False) -> Shapes:
    s: Shapes = {"patch_embedding.weight": (dim, 16, 1, 2, 2), "patch_embedding.bias": (dim,)}
    _linear(s, "text_embedding.0", dim, text)
    _linear(s, "text_embedding.2", dim, dim)
    _linear(s, "time_embedding.0", dim, 256)
    _linear(s, "time_embedding.2", dim, dim)
    _linear(s, "time_projection.1", 6 * dim, dim)
    for i in range(depth):
        p = f"blocks.{i}"
        s[f"{p}.modulation"] = (1, 6, dim)
        for att in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                _linear(s, f"{p}.{att}.{proj}", dim, dim)
            s[f"{p}.{att}.norm_q.weight"] = (dim,)
            s[f"{p}.{att}.norm_k.weight"] = (dim,)
        if i2v:
            _linear(s, f"{p}.cross_attn.k_img", dim, dim)
            _linear(s, f"{p}.cross_attn.v_img", dim, dim)
        s[f"{p}.norm3.weight"] = (dim,)
        s[f"{p}.norm3.bias"] = (dim,)
        _linear(s, f"{p}.ffn.0", ffn, dim)
        _linear(s, f"{p}.ffn.2", dim, ffn)
    _linear(s, "head.head", 64, dim)
    s["head.modulation"] = (1, 2, dim)
    if i2v:
        _linear(s, "img_emb.proj.1", 1280, 1280)
        _linear(s, "img_emb.proj.3", dim, 1280)
    return s


def hunyuan_video(hidden=3072, depth=20, single=40, ctx=4096, refiner=2) -> Shapes:
    h = hidden
    s: Shapes = {"img_in.proj.weight": (h, 16, 1, 2, 2), "img_in.proj.bias": (h,)}
    _linear(s, "txt_in.input_embedder", h, ctx)
    _linear(s, "txt_in.t_embedder.mlp.0", h, 256)
    _linear(s, "txt_in.t_embedder.mlp.2", h, h)
    _linear(s, "txt_in.c_embedder.linear_1", h, ctx)
    _linear(s, "txt_in.c_embedder.linear_2", h, h)
    for i in range(refiner):
        p = f"txt_in.individual_token_refiner.blocks.{i}"
        s[f"{p}.norm1.weight"] = (h,)
        s[f"{p}.norm1.bias"] = (h,)
        _linear(s, f"{p}.self_attn_qkv", 3 * h, h)
        _linear(s, f"{p}.self_attn_proj", h, h)
        _linear(s, f"{p}.mlp.fc1", 4 * h, h)
        _linear(s, f"{p}.mlp.fc2", h, 4 * h)
        _linear(s, f"{p}.adaLN_modulation.1", 2 * h, h)
    _linear(s, "time_in.mlp.0", h, 256)
    _linear(s, "time_in.mlp.2", h, h)
    _linear(s, "vector_in.in_layer", h, 768)
    _linear(s, "vector_in.out_layer", h, h)
    _linear(s, "guidance_in.mlp.0", h, 256)
    _linear(s, "guidance_in.mlp.2", h, h)
    for i in range(depth):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            _linear(s, f"{p}_mod.linear", 6 * h, h)
            _linear(s, f"{p}_attn_qkv", 3 * h, h)
            s[f"{p}_attn_q_norm.weight"] = (128,)
            s[f"{p}_attn_k_norm.weight"] = (128,)
            _linear(s, f"{p}_attn_proj", h, h)
            _linear(s, f"{p}_mlp.fc1", 4 * h, h)
            _linear(s, f"{p}_mlp.fc2", h, 4 * h)
    for i in range(single):
        p = f"single_blocks.{i}"
        _linear(s, f"{p}.linear1", 7 * h, h)
        _linear(s, f"{p}.linear2", h, 5 * h)
        s[f"{p}.q_norm.weight"] = (128,)
        s[f"{p}.k_norm.weight"] = (128,)
        _linear(s, f"{p}.modulation.linear", 3 * h, h)
    _linear(s, "final_layer.linear", 64, h)
    _linear(s, "final_layer.adaLN_modulation.1", 2 * h, h)
    return s


def hidream(hidden=2560, double=16, single=32, experts=4, ffn=6912, llama=4096, t5=4096) -> Shapes:
    h = hidden
    s: Shapes = {}
    _linear(s, "t_embedder.timestep_embedder.linear_1", h, 256)
    _linear(s, "t_embedder.timestep_embedder.linear_2", h, h)
    _linear(s, "p_embedder.pooled_embedder.linear_1", h, 2048)
    _linear(s, "p_embedder.pooled_embedder.linear_2", h, h)
    _linear(s, "x_embedder.proj", h, 64)
    for i in range(49):
        _linear(s, f"caption_projection.{i}.linear", h, t5 if i == 48 else llama, bias=False)

    def block(p, double_stream):
        _linear(s, f"{p}.adaLN_modulation.1", (12 if double_stream else 6) * h, h)
        for side in (("", "_t") if double_stream else ("",)):
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                _linear(s, f"{p}.attn1.{proj}{side}", h, h)
            s[f"{p}.attn1.q_rms_norm{side}.weight"] = (h,)
            s[f"{p}.attn1.k_rms_norm{side}.weight"] = (h,)
        s[f"{p}.ff_i.gate.weight"] = (experts, h)
        for w, (n, k) in (("w1", (ffn, h)), ("w2", (h, ffn)), ("w3", (ffn, h))):
            _linear(s, f"{p}.ff_i.shared_experts.{w}", n, k, bias=False)
            for e in range(experts):
                _linear(s, f"{p}.ff_i.experts.{e}.{w}", n, k, bias=False)
            if double_stream:
                _linear(s, f"{p}.ff_t.{w}", n, k, bias=False)

    for i in range(double):
        block(f"double_stream_blocks.{i}.block", True)
    for i in range(single):
        block(f"single_stream_blocks.{i}.block", False)
    _linear(s, "final_layer.linear", 64, h)
    _linear(s, "final_layer.adaLN_modulation.1", 2 * h, h)
    return s


def lumina2(dim=2304, depth=26, refiner=2, cap=2304, heads=24, kv_heads=8, ffn=6144) -> Shapes:
    hd = dim // heads
    s: Shapes = {}
    _linear(s, "x_embedder", dim, 64)
    _linear(s, "t_embedder.mlp.0", min(dim, 1024), 256)
    _linear(s, "t_embedder.mlp.2", min(dim, 1024), min(dim, 1024))
    s["cap_embedder.0.weight"] = (cap,)
    _linear(s, "cap_embedder.1", dim, cap)

    def block(p, modulation):
        _linear(s, f"{p}.attention.qkv", (heads + 2 * kv_heads) * hd, dim, bias=False)
        _linear(s, f"{p}.attention.out", dim, heads * hd, bias=False)
        s[f"{p}.attention.q_norm.weight"] = (hd,)
        s[f"{p}.attention.k_norm.weight"] = (hd,)
        _linear(s, f"{p}.feed_forward.w1", ffn, dim, bias=False)
        _linear(s, f"{p}.feed_forward.w2", dim, ffn, bias=False)
        _linear(s, f"{p}.feed_forward.w3", ffn, dim, bias=False)
        for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            s[f"{p}.{n}.weight"] = (dim,)
        if modulation:
            _linear(s, f"{p}.adaLN_modulation.1", 4 * dim, min(dim, 1024))

    for i in range(refiner):
        block(f"noise_refiner.{i}", True)
        block(f"context_refiner.{i}", False)
    for i in range(depth):
        block(f"layers.{i}", True)
    s["norm_final.weight"] = (dim,)
    _linear(s, "final_layer.linear", 64, dim)
    _linear(s, "final_layer.adaLN_modulation.1", dim, min(dim, 1024))
    return s


BUILDERS = {"flux": flux, "chroma": chroma, "sd3": sd3, "qwen_image": qwen_image, "wan": wan,
            "hunyuan_video": hunyuan_video, "hidream": hidream, "lumina2": lumina2}


def shapes(arch: str, **dims) -> Shapes:
    """Names and shapes of ``arch`` (full size by default), in sorted key order as
    safetensors files store them."""
    s = BUILDERS[arch](**dims)
    return {k: s[k] for k in sorted(s)}


def params(s: Shapes) -> int:
    return sum(math.prod(v) for v in s.values())


def realistic_weight(shape, generator: torch.Generator, dtype=torch.bfloat16, outliers: float = 0.005,
                     outlier_gain: float = 8.0, df: float = 4.0) -> torch.Tensor:
    """Heavy-tailed weights (Student-t, ``df`` degrees of freedom) scaled like a trained
    layer (std ~ 1/sqrt(K)), with a few input channels ``outlier_gain`` times larger and
    per-output-row gains (what attention / MLP weights of diffusion transformers show)."""
    shape = tuple(shape)
    if len(shape) != 2:
        return (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    N, K = shape
    # Student-t by normal / sqrt(chi2/df): keeps one generator, reproducible.
    z = torch.randn(N, K, generator=generator)
    chi2 = torch.randn(N, K, int(df), generator=generator).square_().sum(-1) if df <= 8 else None
    w = z / torch.sqrt(chi2 / df) if chi2 is not None else z
    w *= (1.0 / math.sqrt(K)) * 0.6
    n_out = max(1, int(K * outliers))
    cols = torch.randperm(K, generator=generator)[:n_out]
    w[:, cols] *= outlier_gain
    w *= torch.exp(0.25 * torch.randn(N, 1, generator=generator))
    return w.to(dtype)


def write(path: str, s: Shapes, dtype=torch.bfloat16, seed: int = 0, metadata: dict | None = None,
          progress=None) -> int:
    """Write a synthetic checkpoint of shapes ``s`` to ``path``; returns its size in bytes.
    Tensors are slices, at random offsets, of one pool of realistic values as large as
    the largest tensor (made once, block by block), so a 24 GB model is written at disk
    speed with ~0.5 GB of memory. Norm scales are drawn near 1."""
    g = torch.Generator().manual_seed(seed)
    largest = max(math.prod(v) for v in s.values())
    block = (1024, 4096)
    blocks = max(1, math.ceil(largest / math.prod(block))) + 1
    pool = torch.cat([realistic_weight(block, g, dtype).reshape(-1) for _ in range(blocks)])
    specs = [OutputSpec(k, dtype, v) for k, v in s.items()]
    with SafetensorsWriter(path, specs, metadata or {"modelspec.title": "synthetic"}, reserve=False) as w:
        for k, shape in s.items():
            n = math.prod(shape)
            if len(shape) == 1 and ("norm" in k or k.endswith(".scale")):
                t = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
            else:
                off = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=g))
                t = pool[off : off + n].view(shape)
            w.write(k, t)
            if progress is not None:
                progress(t.numel() * t.element_size())
        w.commit()
    return w.total_size
