"""The main job on a built-in default model, no download:

    python -m comfy_quant_native demo [--device cpu|cuda] [--width 1024] [--blocks 4]

Builds a small DiT-style transformer (the layer shapes of a Flux block at reduced width,
heavy-tailed random weights with outlier channels, as trained weights have), quantizes it
in every layout, and reports for each: weight bytes against bf16, relative output error
of the whole model against bf16, forward time against bf16 at 1 and 512 tokens, then
saves the quantized model to a safetensors file and checks that the reloaded model gives
bit-identical outputs.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import formats, ops
from .layouts import LAYOUTS
from .nn import QuantLinear, quantize_module


class Block(nn.Module):
    """A pre-norm transformer block with Flux's single-block proportions (MLP ratio 4)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.mlp_out(F.gelu(self.mlp_in(self.norm2(x)), approximate="tanh"))


class TinyDiT(nn.Module):
    def __init__(self, width: int = 1024, blocks: int = 4, heads: int = 8):
        super().__init__()
        self.img_in = nn.Linear(64, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(blocks))
        self.final = nn.Linear(width, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.img_in(x)
        for b in self.blocks:
            h = b(h)
        return self.final(h)


def realistic_(linear: nn.Linear, gen: torch.Generator) -> None:
    """Heavy-tailed weights (Student-t with 4 degrees of freedom) and a few outlier
    input channels 8x larger, as trained transformer weights have."""
    N, K = linear.weight.shape
    z = torch.randn(N, K, generator=gen)
    chi2 = sum(torch.randn(N, K, generator=gen) ** 2 for _ in range(4))
    w = z / torch.sqrt(chi2 / 4) / math.sqrt(K) * 0.5
    outliers = torch.randperm(K, generator=gen)[: max(1, K // 256)]
    w[:, outliers] *= 8.0
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(torch.randn(N, generator=gen) * 0.02)


def build_model(width: int, blocks: int, seed: int = 0) -> TinyDiT:
    gen = torch.Generator().manual_seed(seed)
    model = TinyDiT(width, blocks)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            realistic_(m, gen)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.qweight.nbytes
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def time_forward(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        model(x)
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def save_quantized(model: nn.Module, path: str) -> None:
    """The model as one file in our comfy_quant form (formats.emit_state_dict + save_file)."""
    layers = {name: m.qweight.to("cpu") for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    # A QuantLinear's state dict holds only its bias: the quantized weight is emitted above.
    plain = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    formats.save_file(path, *formats.emit_state_dict(layers, plain))


def reload(model_template: nn.Module, path: str, device) -> nn.Module:
    """A fresh model whose quantized layers come from the file at ``path``."""
    loaded = formats.load_file(path)
    model = copy.deepcopy(model_template)
    for name, qw in loaded.layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantLinear(qw, loaded.tensors.get(f"{name}.bias")))
    model.load_state_dict(loaded.tensors, strict=False)
    return model.to(device)


def run(width: int, blocks: int, device: str, tokens: int, repeats: int) -> list[dict]:
    dev = torch.device(device)
    base = build_model(width, blocks)
    ref = base.to(dev, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    x_big = torch.randn(1, tokens, 64, generator=gen).to(dev, torch.bfloat16)
    x_one = torch.randn(1, 1, 64, generator=gen).to(dev, torch.bfloat16)
    with torch.inference_mode():
        y_ref = ref(x_big).float()
    bf16_bytes = weight_bytes(ref)
    t_big_ref = time_forward(ref, x_big, repeats)
    t_one_ref = time_forward(ref, x_one, repeats)
    rows = [dict(layout="bf16", bytes=bf16_bytes, err=0.0, t_one=t_one_ref, t_big=t_big_ref, reload="-")]
    with tempfile.TemporaryDirectory() as tmp:
        for layout in LAYOUTS:
            model = copy.deepcopy(ref)
            # The first and last layers are small and sensitive: they stay bf16 (as the presets do).
            quantize_module(model, layout, exclude=r"^(img_in|final)$")
            with torch.inference_mode():
                y = model(x_big).float()
            err = (torch.linalg.vector_norm(y - y_ref) / torch.linalg.vector_norm(y_ref)).item()
            path = os.path.join(tmp, f"tiny_dit_{layout}.safetensors")
            save_quantized(model, path)
            again = reload(ref, path, dev)
            with torch.inference_mode():
                same = torch.equal(again(x_big), model(x_big).to(torch.bfloat16))
            rows.append(dict(
                layout=layout,
                bytes=weight_bytes(model),
                err=err,
                t_one=time_forward(model, x_one, repeats),
                t_big=time_forward(model, x_big, repeats),
                reload=f"{'identical' if same else 'DIFFERENT'} ({os.path.getsize(path) / 2**20:.1f} MiB)",
            ))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m comfy_quant_native demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"comfy-quant-native demo: TinyDiT width {args.width}, {args.blocks} blocks, on {args.device}; "
          f"backends {ops.list_backends()}")
    rows = run(args.width, args.blocks, args.device, args.tokens, args.repeats)
    base = rows[0]
    print(f"\n{'layout':<11} {'weights':>10} {'vs bf16':>8} {'rel.err':>8} "
          f"{'1 tok':>9} {'ratio':>6} {args.tokens:>5} tok {'ratio':>6}  save+reload")
    for r in rows:
        print(f"{r['layout']:<11} {r['bytes'] / 2**20:>8.1f}Mi {r['bytes'] / base['bytes']:>8.3f} {r['err']:>8.4f} "
              f"{r['t_one'] * 1e3:>7.2f}ms {r['t_one'] / base['t_one']:>6.2f} {r['t_big'] * 1e3:>7.1f}ms "
              f"{r['t_big'] / base['t_big']:>6.2f}  {r['reload']}")
    bad = [r["layout"] for r in rows if r["reload"].startswith("DIFFERENT")]
    if bad:
        print(f"reloaded outputs differ for: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
