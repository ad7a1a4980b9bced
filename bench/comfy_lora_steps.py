"""Step time of a quantized model in ComfyUI with 0, 1 and 4 LoRAs (a benchmark, not a test).

    COMFYUI_PATH=/path/to/ComfyUI python bench/comfy_lora_steps.py [--hidden 1024] [--tokens 1024]

Builds a Flux-type model (tests/comfy_harness.py, random weights) of the given width, loads it
with ComfyUI on the CPU (or the GPU when ComfyUI sees one), quantizes it with Quantize Model,
adds rank-``--rank`` LoRAs on every attention/MLP layer with the stock patch mechanism, and
times sampling steps after the model is loaded (the fastest of ``--repeats`` runs: the
machine may be shared, and interference only ever adds time). Prints one row
per (format, LoRA mode, LoRA count) with the ratio to the same format without LoRA.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import comfy_harness as H  # noqa: E402


def lora_for(layers_shapes, rank, seed, torch):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer, (n, k) in layers_shapes.items():
        sd[f"diffusion_model.{layer}.lora_down.weight"] = (torch.randn(rank, k, generator=g) / k ** 0.5).to(torch.bfloat16)
        sd[f"diffusion_model.{layer}.lora_up.weight"] = (torch.randn(n, rank, generator=g) * 0.1).to(torch.bfloat16)
        sd[f"diffusion_model.{layer}.alpha"] = torch.tensor(float(rank))
    return sd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens (latent pixels / 4)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--formats", default="nf4,int8_row")
    args = ap.parse_args()

    H.import_comfyui()
    import torch
    import comfy.lora
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    from safetensors.torch import save_file

    from comfy_quant_native.comfy import quantize

    h = args.hidden
    sd = H.tiny_flux_state_dict(seed=0, hidden=h, depth=args.depth, single=args.single)
    path = f"/tmp/cq_bench_flux_{h}.safetensors"
    save_file(sd, path)
    base = comfy.sd.load_diffusion_model(path)
    shapes = {k[: -len(".weight")]: tuple(v.shape) for k, v in sd.items()
              if k.endswith(".weight") and v.dim() == 2 and any(s in k for s in ("_attn.qkv", "_attn.proj", "_mlp.", "linear1", "linear2"))}
    side = int(round((args.tokens * 4) ** 0.5))
    latent = torch.zeros(1, 16, side // 2 * 2, side // 2 * 2)
    g = torch.Generator().manual_seed(5)
    cond = [[torch.randn(1, 64, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]
    noise = comfy.sample.prepare_noise(latent, 0)

    def step_time(model):
        mm.load_models_gpu([model])
        comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", cond, cond, latent, seed=0, disable_pbar=True)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            comfy.sample.sample(model, noise, args.steps, 1.0, "euler", "simple", cond, cond, latent, seed=0,
                                disable_pbar=True)
            times.append((time.perf_counter() - t) / args.steps)
        return min(times)

    def with_loras(model, n):
        if n == 0:
            return model
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        m = model.clone()
        for i in range(n):
            m.add_patches(comfy.lora.load_lora(lora_for(shapes, args.rank, 10 + i, torch), key_map), 1.0)
        return m

    dev = mm.get_torch_device()
    print(f"# Flux-type hidden {h}, {args.depth}+{args.single} blocks, {latent.shape[-1] * latent.shape[-2] // 4} image "
          f"tokens + 64 text, {args.steps} steps, LoRA rank {args.rank} on {len(shapes)} layers; device {dev}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | LoRA mode | LoRAs | s/step | vs 0 LoRAs |")
    print("|---|---|---|---|---|")
    t0 = step_time(base)
    print(f"| unquantized ({base.model_dtype()}) | - | 0 | {t0:.4f} | 1.00 |")
    for n in (1, 4):
        t = step_time(with_loras(base, n))
        print(f"| unquantized | stock | {n} | {t:.4f} | {t / t0:.2f} |")
    for fmt in args.formats.split(","):
        for mode in ("exact", "merged"):
            q, _ = quantize.quantize_model(base, fmt, min_params=0, lora_mode=mode)
            tq = step_time(q)
            print(f"| {fmt} | {mode} | 0 | {tq:.4f} | 1.00 |")
            for n in (1, 4):
                t = step_time(with_loras(q, n))
                print(f"| {fmt} | {mode} | {n} | {t:.4f} | {t / tq:.2f} |")
            mm.unload_all_models()


if __name__ == "__main__":
    main()
