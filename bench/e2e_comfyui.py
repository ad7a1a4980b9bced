"""End-to-end step time of a Flux-dev-architecture model in ComfyUI's own model classes:
bf16, each of our formats through Quantize Model, ComfyUI's own fp8 paths, and an
eager-PyTorch NF4 dequantize-per-layer baseline (the GGUF-style route). A benchmark, not a test.

    COMFYUI_PATH=/path/to/ComfyUI python3 bench/e2e_comfyui.py [--out table.md] [--profile]
    # tiny, on a CPU (seconds):
    python3 bench/e2e_comfyui.py --device cpu --hidden 256 --depth-double 2 --depth-single 2 \
        --tokens 256 --txt-tokens 64 --no-compile --no-lowvram

One process, one run. The model: Flux-dev's key names and shapes (19 double + 38 single
blocks, hidden 3072, T5 context 4096, pooled 768; fewer blocks or a smaller hidden by
argument), random weights randn/sqrt(fan_in) made on the device, loaded through
``comfy.sd.load_diffusion_model_state_dict`` so that ComfyUI's detection builds its Flux.
A step is one call of ``BaseModel.apply_model`` (latent 16 x 2h x 2w for h*w image tokens,
T5 context of --txt-tokens, pooled vector, guidance 3.5) with the transformer options the
sampler would pass (so a torch.compile wrapper set by ComfyUI's helper applies), under
torch.inference_mode as ComfyUI's executor runs nodes; timed with CUDA events after
warm-up, median of --steps calls.

Configurations (--formats):
  bf16        the model as loaded (ComfyUI's bf16 weights, its default ops)
  nf4 fp4 int8_block int8_lode int8_row
              Quantize Model (comfy_quant_native.comfy.quantize.quantize_model, presets
              as the node: blocks and modulation quantized) on the bf16 model
  fp8         UNETLoader weight_dtype "fp8_e4m3fn": fp8 storage, cast to bf16 per layer
  fp8_fast    UNETLoader "fp8_e4m3fn_fast": fp8 weights and torch._scaled_mm (where
              ComfyUI supports fp8 compute; else it falls back to the cast, noted)
  fp8_scaled  a scaled-fp8 checkpoint (per-tensor scale, comfy_quant metadata) through
              ComfyUI's mixed-precision ops and comfy-kitchen
  eager_nf4   the nf4 weights of Quantize Model, run by plain PyTorch per layer:
              unpack nibbles, table lookup, * absmax, cast to bf16, F.linear
Columns: step ms eager and under torch.compile (ComfyUI's set_torch_compile_wrapper,
inductor), ratio to bf16 in the same column, peak VRAM during the steps, the
transformer's weight bytes (every parameter and buffer, quantized data + scales) and their
ratio to bf16, the output's relative L2 error against bf16, and the issue's targets.
--profile: a torch.profiler table of the top kernels/ops for each format that misses.

Low-VRAM (--lowvram-formats, default bf16,nf4): ComfyUI limited to --lowvram-gb of VRAM
(as --reserve-vram <total - budget> does, with the allocator capped at the budget too),
loaded by ComfyUI's own estimate-based loader; reports whether it offloaded and the times.
Every configuration runs in its own try/except: an error lands in the table, the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from e2e_report import (  # noqa: E402
    ALL_FORMATS,
    BASELINE,
    DEFAULT_FORMATS,
    GiB,
    OURS,
    compact,
    fmt,
    fmt_ms,
    missed,
    report,
)
CONTEXT_DIM, VEC_DIM, IN_CH = 4096, 768, 64  # T5-XXL, CLIP-L pooled, 16 latent channels x 2x2 patch


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (COMFYUI_PATH)")
    ap.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    ap.add_argument("--hidden", type=int, default=3072, help="multiple of 128 (heads of 128)")
    ap.add_argument("--depth-double", type=int, default=19)
    ap.add_argument("--depth-single", type=int, default=38)
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens (4096 = 1024x1024)")
    ap.add_argument("--txt-tokens", type=int, default=512)
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help=f"comma list of {','.join(ALL_FORMATS)}")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--compile-formats", default=None, help="compile only these (default: all run)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: None)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--no-lowvram", action="store_true", help="skip the low-VRAM runs")
    ap.add_argument("--lowvram-gb", default="12",
                    help="the card to emulate, GiB; 'auto': a 12 GiB card scaled to this model's share of "
                         "Flux-dev's bf16 bytes (for runs with fewer blocks)")
    ap.add_argument("--lowvram-formats", default="bf16,nf4")
    ap.add_argument("--lowvram-steps", type=int, default=3)
    ap.add_argument("--lowvram-last", action="store_true", help="run the low-VRAM part after the formats")
    ap.add_argument("--profile", nargs="?", const="missed", default=None,
                    help="per-op profile of formats that miss a target ('all': every format)")
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--dynamic-vram", action="store_true",
                    help="ComfyUI's dynamic VRAM (comfy-aimdo), as main.py enables on NVIDIA; default: "
                         "the estimate-based loader (--disable-dynamic-vram)")
    ap.add_argument("--min-params", type=int, default=None,
                    help="Quantize Model's min_params (default: the node's, 1M; 0 for tiny models)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: skip what would end past this (the report is written after each config)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the report as markdown here")
    ap.add_argument("--json", default=None, help="also write the raw results as JSON here")
    ap.add_argument("--verbose", action="store_true", help="ComfyUI's INFO logging")
    args = ap.parse_args(argv)
    if args.depth_double < 1 or args.depth_single < 0:
        ap.error("--depth-double must be >= 1 (ComfyUI detects Flux by its double blocks)")
    if args.hidden % 128:
        ap.error("--hidden must be a multiple of 128 (Flux heads are 128 wide)")
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in ALL_FORMATS]
    if bad:
        ap.error(f"unknown formats {bad}; choose from {ALL_FORMATS}")
    if "bf16" not in args.formats:
        args.formats.insert(0, "bf16")  # every ratio is against bf16 in the same run
    # bf16 first (every ratio is to it), then the eager baseline (ours are compared with it,
    # and a format that misses is profiled while it is still loaded).
    args.formats.sort(key=lambda f: (f != "bf16", f != BASELINE))
    if args.compile_formats is not None:  # bf16 too: the compiled column's ratios are to it
        args.compile_formats = ["bf16"] + [f.strip() for f in args.compile_formats.split(",") if f.strip()]
    args.lowvram_formats = [f.strip() for f in args.lowvram_formats.split(",") if f.strip()]
    if args.lowvram_gb != "auto":
        try:
            args.lowvram_gb = float(args.lowvram_gb)
        except ValueError:
            ap.error("--lowvram-gb takes a number of GiB or 'auto'")
    return args


# ----------------------------------------------------------------------------- ComfyUI
def import_comfyui(args):
    """ComfyUI's modules in this process, the way tests/comfy_harness.py sets them up
    (stubs for torchvision/torchaudio where they are not importable)."""
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "main.py")):
        sys.exit("COMFYUI_PATH (or --comfyui) must point at a ComfyUI checkout")
    os.environ["COMFYUI_PATH"] = args.comfyui
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ["COMFY_TEST_DEVICE"] = args.device
    os.environ["COMFY_TEST_DYNAMIC_VRAM"] = "1" if args.dynamic_vram else "0"
    import logging

    import comfy_harness as H

    comfy = H.import_comfyui()
    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.WARNING)
    return comfy


# ----------------------------------------------------------------------------- the model
def flux_shapes(args) -> dict:
    from comfy_quant_native.convert import synthetic

    return synthetic.flux(hidden=args.hidden, depth=args.depth_double, single=args.depth_single,
                          in_ch=IN_CH, ctx=CONTEXT_DIM, vec=VEC_DIM)


def flux_state_dict(args, device, dtype=None, transform=None) -> dict:
    """Flux key names and shapes, random bf16 weights made on ``device``: Linear weights
    randn/sqrt(fan_in) (activations stay O(1) through the blocks), biases 0.02 randn, norm
    scales 1 + 0.1 randn. ``transform(name, tensor) -> {name: tensor}`` per tensor (fp8)."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sd = {}
    for name, shape in flux_shapes(args).items():
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if name.endswith(".weight") and len(shape) == 2:
            t.mul_(1.0 / math.sqrt(shape[1]))
        elif name.endswith(".scale"):
            t.mul_(0.1).add_(1.0)
        else:
            t.mul_(0.02)
        t = t.to(dtype or torch.bfloat16)
        if transform is None:
            sd[name] = t
        else:
            sd.update(transform(name, t))
    return sd


def load_flux(args, model_options=None, transform=None):
    import comfy.sd

    sd = flux_state_dict(args, args.device, transform=transform)
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=dict(model_options or {}),
                                                       disable_dynamic=not args.dynamic_vram)
    del sd
    if patcher is None:
        raise RuntimeError("ComfyUI did not detect a model architecture in the state dict")
    if type(patcher.model).__name__ != "Flux":
        raise RuntimeError(f"ComfyUI detected {type(patcher.model).__name__}, not Flux")
    free_memory()
    return patcher


def fp8_scaled_transform(name, t):
    """A scaled-fp8 checkpoint's tensors (per-tensor scale, comfy_quant JSON) for the
    block layers (those Quantize Model's flux preset quantizes); the rest as they are."""
    from comfy_quant_native.formats.common import json_tensor

    if not (name.endswith(".weight") and t.dim() == 2 and name.startswith(("double_blocks.", "single_blocks."))):
        return {name: t}
    layer = name[: -len(".weight")]
    scale = (t.float().abs().amax() / 448.0).clamp_min(1e-12)
    return {name: (t.float() / scale).to(torch.float8_e4m3fn), layer + ".weight_scale": scale.reshape(()),
            layer + ".comfy_quant": json_tensor({"format": "float8_e4m3fn"})}


class EagerDequantLinear(torch.nn.Module):
    """The GGUF-style baseline: one of our nf4 layers' packed weights and absmax held as
    ordinary parameters; forward dequantizes in eager PyTorch per call (unpack nibbles,
    table lookup, * absmax in float32, cast to the activation dtype) and runs F.linear.
    No native kernel."""

    def __init__(self, layer):
        super().__init__()
        from comfy_quant_native import layouts as L

        qt = layer.weight
        p = qt._params
        N, K = p.orig_shape
        if (N * K) % p.group_size:
            raise ValueError(f"eager baseline needs whole groups: {N}x{K} with group {p.group_size}")
        self.packed = torch.nn.Parameter(qt._qdata, requires_grad=False)
        self.absmax = torch.nn.Parameter(p.scale, requires_grad=False)
        self.table = torch.nn.Parameter(L.codebook_table(layer.comfy_quant_layout).clone(), requires_grad=False)
        self.bias = None if layer.bias is None else torch.nn.Parameter(layer.bias.detach(), requires_grad=False)
        self.group, self.shape = p.group_size, (N, K)

    def forward(self, x):
        n = self.shape[0] * self.shape[1]
        codes = torch.stack((self.packed >> 4, self.packed & 0xF), dim=1).reshape(-1)[:n].long()
        vals = self.table[codes].view(-1, self.group) * self.absmax[:, None]
        w = vals.reshape(self.shape).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


_NF4_CACHE = {}  # the nf4 Quantize Model clone, shared by nf4 and eager_nf4


def _cached(patcher) -> bool:
    return any(patcher is q for q, _ in _NF4_CACHE.values())


def quantized(base, layout, args):
    from comfy_quant_native.comfy import quantize

    if layout == "nf4" and "nf4" in _NF4_CACHE:
        return _NF4_CACHE["nf4"]
    kwargs = {} if args.min_params is None else {"min_params": args.min_params}
    q = quantize.quantize_model(base, layout, **kwargs)
    if layout == "nf4":
        _NF4_CACHE["nf4"] = q
    return q


def make_config(name, base, args):
    """(patcher, note) for one configuration. ``base``: the bf16 patcher (on the CPU)."""
    if name == "bf16":
        m = base.model
        return base, (f"ComfyUI {type(first_block_linear(base)).__qualname__}, weights {base.model_dtype()}, "
                      f"compute {m.manual_cast_dtype or base.model_dtype()}")
    if name in OURS:
        q, summary = quantized(base, name, args)
        return q, "Quantize Model: " + summary.split(";")[0]
    if name == BASELINE:
        q, _ = quantized(base, "nf4", args)
        eager = base.clone()
        for key, module in q.object_patches.items():
            if getattr(module, "comfy_quant_layout", None) is not None:
                eager.add_object_patch(key, EagerDequantLinear(module))
        return eager, "nf4 weights, eager unpack + lookup + F.linear per layer"
    if name in ("fp8", "fp8_fast"):
        opts = {"dtype": torch.float8_e4m3fn}
        if name == "fp8_fast":
            opts["fp8_optimizations"] = True
        p = load_flux(args, opts)
        return p, f"UNETLoader fp8_e4m3fn{'_fast' if name == 'fp8_fast' else ''}: " \
                  f"{type(first_block_linear(p)).__qualname__}"
    if name == "fp8_scaled":
        p = load_flux(args, transform=fp8_scaled_transform)
        w = first_block_linear(p).weight
        return p, f"scaled fp8 file: {getattr(w, '_layout_cls', type(w).__name__)}"
    raise ValueError(name)


def first_block_linear(patcher):
    """The first block's first Linear as the patcher runs it (its object patch, if any)."""
    dm = patcher.model.diffusion_model
    name = "double_blocks.0.img_attn.qkv" if len(dm.double_blocks) else "single_blocks.0.linear1"
    return patcher.object_patches.get("diffusion_model." + name) or dm.get_submodule(name)


# ----------------------------------------------------------------------------- measuring
def tensor_bytes(t) -> int:
    from comfy_kitchen.tensor import QuantizedTensor

    if isinstance(t, QuantizedTensor):
        inner, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, a)) for a in inner)
    return t.numel() * t.element_size()


def weight_bytes(patcher) -> dict:
    """Bytes of every parameter and buffer of the diffusion model as it runs (object
    patches in place: call while loaded), split into double blocks, single blocks and the
    rest, and the total."""
    parts = {"double": 0, "single": 0, "other": 0}
    seen = set()
    dm = patcher.model.diffusion_model
    for name, t in list(dm.named_parameters()) + list(dm.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        part = "double" if name.startswith("double_blocks.") else "single" if name.startswith("single_blocks.") else "other"
        parts[part] += tensor_bytes(t)
    parts["total"] = sum(parts.values())
    return parts


def full_depth_bytes(parts: dict, args) -> float:
    """The same weights at Flux-dev's 19 + 38 blocks (blocks are identical, so bytes per
    block scale exactly): the bytes target is about the real model, in which the unquantized
    embedders weigh less than in a model of fewer blocks."""
    b = parts["other"]
    if args.depth_double:
        b += parts["double"] / args.depth_double * 19
    if args.depth_single:
        b += parts["single"] / args.depth_single * 38
    return b


def free_memory():
    import comfy.model_management as mm

    gc.collect()
    if mm.get_torch_device().type != "cpu":
        mm.soft_empty_cache(True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unload_all():
    import comfy.model_management as mm

    mm.unload_all_models()
    free_memory()


class Inputs:
    def __init__(self, args):
        h_tok = max(d for d in range(1, int(math.isqrt(args.tokens)) + 1) if args.tokens % d == 0)
        w_tok = args.tokens // h_tok
        g = torch.Generator().manual_seed(args.seed + 1)
        dev = args.device
        self.noise_shape = (1, 16, 2 * h_tok, 2 * w_tok)
        self.x = torch.randn(self.noise_shape, generator=g).to(dev)
        self.sigma = torch.tensor([0.75], device=dev)
        self.context = torch.randn(1, args.txt_tokens, CONTEXT_DIM, generator=g).to(dev)
        self.y = torch.randn(1, VEC_DIM, generator=g).to(dev)
        self.guidance = torch.tensor([3.5], device=dev)


def load_for_sampling(patcher, inputs, lowvram_budget=None):
    """Load as the sampler does (comfy.sampler_helpers: memory estimate, load_models_gpu)."""
    import comfy.model_management as mm
    import comfy.sampler_helpers

    mm.unload_all_models()
    free_memory()
    if mm.get_torch_device().type == "cpu" and lowvram_budget is not None:
        # ComfyUI never runs a CPU model in lowvram mode; drive the patcher's loader directly
        # (the tests' route) so that the offload path runs here too.
        patcher.patch_model(device_to=patcher.load_device, lowvram_model_memory=max(1, int(lowvram_budget)))
        return
    mem, mem_min = comfy.sampler_helpers.estimate_memory(patcher, inputs.noise_shape, {})
    mm.load_models_gpu([patcher], memory_required=mem, minimum_memory_required=mem_min)


def make_step(patcher, inputs):
    import comfy.patcher_extension as pe

    def step():
        to = dict(patcher.model_options.get("transformer_options", {}))
        to["wrappers"] = pe.merge_nested_dicts(to.get("wrappers", {}), patcher.wrappers)
        to["callbacks"] = pe.merge_nested_dicts(to.get("callbacks", {}), patcher.callbacks)
        to.update(cond_or_uncond=[0], sigmas=inputs.sigma)
        return patcher.model.apply_model(inputs.x, inputs.sigma, c_crossattn=inputs.context, y=inputs.y,
                                         guidance=inputs.guidance, transformer_options=to)

    return step


def time_steps(step, warmup, steps, cuda) -> tuple[float, list[float], object]:
    """Median ms of ``steps`` calls after ``warmup`` calls; also the last output."""
    out = None
    for _ in range(warmup):
        out = step()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times, out


def profile_step(step, cuda, rows) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    with profile(activities=acts, record_shapes=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    by_op = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by=key, row_limit=rows, max_name_column_width=40, max_shapes_column_width=60)
    return f"top ops:\n{by_op}\ntop ops by input shape:\n{by_shape}"


def prediction(out, inputs):
    """The model's output (flow prediction) from apply_model's denoised latent
    (x - sigma * prediction for Flux): the denoised latent carries x itself, which would
    hide errors."""
    return ((inputs.x.float() - out.float()) / inputs.sigma.float()).cpu()


def rel_err(pred, ref) -> float | None:
    if pred is None or ref is None:
        return None
    return float((pred - ref).norm() / ref.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- one config
def run_config(name, base, inputs, args, results, ref):
    cuda = args.device == "cuda"
    row = dict(format=name, note="", setup_s=None, eager_ms=None, compiled_ms=None, peak_gib=None, gpu_gib=None,
               weight_bytes=None, full_depth_bytes=None, rel_err=None, finite=None, error=None,
               compile_error=None, profile=None, times=None, compiled_times=None)
    results.append(row)
    patcher = None
    t_start = time.time()
    try:
        patcher, row["note"] = make_config(name, base, args)
        alloc0 = torch.cuda.memory_allocated() if cuda else 0
        load_for_sampling(patcher, inputs)
        row["setup_s"] = time.time() - t_start
        parts = weight_bytes(patcher)
        row["weight_bytes"], row["full_depth_bytes"] = parts["total"], full_depth_bytes(parts, args)
        row["gpu_gib"] = ((torch.cuda.memory_allocated() - alloc0) if cuda else parts["total"]) / GiB
        step = make_step(patcher, inputs)
        with torch.inference_mode():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            row["eager_ms"], row["times"], out = time_steps(step, args.warmup, args.steps, cuda)
            if cuda:
                row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
            row["finite"] = bool(torch.isfinite(out).all())
            pred = prediction(out, inputs)
            if name == "bf16":
                ref["pred"] = pred
            row["rel_err"] = rel_err(pred, ref.get("pred"))
            del out, pred
            if not args.no_compile and (args.compile_formats is None or name in args.compile_formats):
                row["compiled_ms"], row["compiled_times"], row["compile_error"] = run_compiled(patcher, step, args, cuda)
            row["_step"] = step  # kept for --profile after the targets are known
            row["_patcher"] = patcher
            if args.profile == "all":
                row["profile"] = profile_step(step, cuda, args.profile_rows)
    except Exception as e:  # noqa: BLE001 - one failure must not lose the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        traceback.print_exc()
    row["seconds"] = time.time() - t_start
    print(f"# {name}: {fmt_ms(row['eager_ms'])} ms eager, {fmt_ms(row['compiled_ms'])} ms compiled; "
          f"{fmt(row['setup_s'], '{:.1f}')} s to make and load, {row['seconds']:.1f} s in all"
          f"{'; ERROR ' + row['error'] if row['error'] else ''}", flush=True)
    return patcher


def run_compiled(patcher, step, args, cuda):
    from comfy.patcher_extension import WrappersMP
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY

    torch._dynamo.reset()
    try:
        set_torch_compile_wrapper(patcher, backend=args.compile_backend, mode=args.compile_mode)
        t0 = time.time()
        step()  # compiles
        print(f"#   compiled in {time.time() - t0:.1f} s", flush=True)
        ms, times, _ = time_steps(step, args.warmup, args.steps, cuda)
        return ms, times, None
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        patcher.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)
        patcher.model_options.pop("torch_compile_kwargs", None)
        torch._dynamo.reset()


def release(row, patcher, base):
    row.pop("_step", None)
    row.pop("_patcher", None)
    unload_all()
    if patcher is not None and patcher is not base and not _cached(patcher):
        patcher.object_patches.clear()  # drop the quantized layers now, not at the next gc
    free_memory()


# ----------------------------------------------------------------------------- low VRAM
def lowvram_budget(args, base, inputs) -> tuple[int, int, str]:
    """(card bytes, weight bytes ComfyUI can load in it, description). ComfyUI keeps
    its reserve plus the larger of 0.8 GiB and the model's memory estimate for this
    latent free for inference (model_management.load_models_gpu); the rest takes weights."""
    import comfy.model_management as mm
    import comfy.sampler_helpers

    _, mem_min = comfy.sampler_helpers.estimate_memory(base, inputs.noise_shape, {})
    overhead = mm.extra_reserved_memory() + max(0.8 * GiB, mem_min)
    if args.lowvram_gb == "auto":
        parts = weight_bytes(base)
        share = parts["total"] / full_depth_bytes(parts, args)
        weights = (12 * GiB - overhead) * share
        card = overhead + weights
        desc = (f"a 12 GiB card scaled to this model ({share:.3f} of Flux-dev's bf16 bytes): {card / GiB:.2f} GiB, "
                f"{weights / GiB:.2f} GiB of it for weights")
    else:
        card = args.lowvram_gb * GiB
        weights = card - overhead
        desc = f"{args.lowvram_gb:g} GiB, {weights / GiB:.2f} GiB of it for weights"
    return int(card), int(max(weights, 1)), desc


def run_lowvram(name, base, inputs, args, lowvram_rows):
    import comfy.model_management as mm

    cuda = args.device == "cuda"
    row = dict(format=name, budget_gib=None, budget=None, ms=None, loaded_gib=None, model_gib=None,
               offloaded=None, peak_gib=None, error=None)
    lowvram_rows.append(row)
    patcher = None
    old_reserved = mm.EXTRA_RESERVED_VRAM
    try:
        unload_all()
        card, weights, row["budget"] = lowvram_budget(args, base, inputs)
        row["budget_gib"] = card / GiB
        if cuda:
            total = torch.cuda.get_device_properties(mm.get_torch_device()).total_memory
            # A card of `card` bytes: what --reserve-vram (total - card, on top of the usual
            # reserve) makes ComfyUI plan with; the allocator cap makes the limit real.
            mm.EXTRA_RESERVED_VRAM = old_reserved + max(0, total - card)
            torch.cuda.set_per_process_memory_fraction(min(1.0, card / total))
        patcher, _ = make_config(name, base, args)
        load_for_sampling(patcher, inputs, lowvram_budget=weights)
        row["model_gib"] = patcher.model_size() / GiB
        row["loaded_gib"] = patcher.loaded_size() / GiB
        # The estimate-based loader sets model_lowvram when it left any layer in system RAM.
        row["offloaded"] = bool(getattr(patcher.model, "model_lowvram", False))
        with torch.inference_mode():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            row["ms"], _, out = time_steps(make_step(patcher, inputs), 1, args.lowvram_steps, cuda)
            if cuda:
                row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
            del out
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        traceback.print_exc()
    finally:
        mm.EXTRA_RESERVED_VRAM = old_reserved
        if patcher is not None and not cuda:
            patcher.unpatch_model(patcher.offload_device)  # loaded by hand: not in ComfyUI's list
        unload_all()
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
        if patcher is not None and patcher is not base and not _cached(patcher):
            patcher.object_patches.clear()
        free_memory()
    print(f"# lowvram {name}: {fmt_ms(row['ms'])} ms, offloaded {row['offloaded']}"
          f"{'; ERROR ' + row['error'] if row['error'] else ''}", flush=True)


# ----------------------------------------------------------------------------- environment
def environment(args) -> list[str]:
    import comfy.model_management as mm
    from comfy_quant_native import ops

    lines = [f"date {datetime.datetime.now().isoformat(timespec='seconds')}, host {platform.node()}, "
             f"python {platform.python_version()}, torch {torch.__version__}"]
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU {p.name}, {p.total_memory / GiB:.1f} GiB, sm_{p.major}{p.minor}, "
                     f"CUDA {torch.version.cuda}; allocator {os.environ.get('PYTORCH_CUDA_ALLOC_CONF') or 'default'} "
                     f"(ComfyUI's main.py would pick cudaMallocAsync)")
    else:
        lines.append(f"CPU, {torch.get_num_threads()} threads")
    try:
        import comfyui_version

        cv = comfyui_version.__version__
    except ImportError:
        cv = "?"
    try:
        import comfy_kitchen as ck

        kb = ", ".join(f"{k}:{'on' if v.get('available') and not v.get('disabled') else 'off'}"
                       for k, v in ck.list_backends().items())
    except Exception as e:  # noqa: BLE001
        kb = f"? ({e})"
    lines.append(f"ComfyUI {cv} ({args.comfyui}), VRAM state {mm.vram_state.name}, "
                 f"{'dynamic VRAM' if args.dynamic_vram else 'estimate-based loader'}; comfy-kitchen backends: {kb}")
    lines.append(f"comfy_quant_native backends: {ops.list_backends()}")
    h, mlp = args.hidden, 4 * args.hidden
    params = sum(math.prod(s) for s in flux_shapes(args).values())
    lines.append(f"model: Flux-dev architecture, {args.depth_double} double + {args.depth_single} single blocks, "
                 f"hidden {h} (mlp {mlp}), {params / 1e9:.2f} G parameters; batch 1, {args.tokens} image + "
                 f"{args.txt_tokens} text tokens; {args.warmup} warm-up + {args.steps} timed steps (median)")
    return lines


# ----------------------------------------------------------------------------- main
def write_outputs(args, env, rows, lowvram_rows, t0, final=False) -> str:
    """The markdown report (and JSON) as it stands: written after every configuration, so
    that a run stopped at a time limit still leaves what it measured."""
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    md = report(args, env, clean, lowvram_rows)
    md += f"\n\n{'Total' if final else 'Partial (still running):'} run time {time.time() - t0:.0f} s.\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            f.write(md)
        os.replace(args.out + ".tmp", args.out)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(dict(env=env, rows=clean, lowvram=lowvram_rows, args=vars(args)), f, indent=1, default=str)
        os.replace(args.json + ".tmp", args.json)
    return md


def over_budget(args, t0, durations) -> bool:
    """True when the next piece of work (estimated as the mean of those so far) would end
    past --time-budget. An overshoot loses only the piece in flight: the report on disk
    is rewritten after every piece."""
    if args.time_budget is None:
        return False
    return time.time() - t0 + (statistics.mean(durations) if durations else 0.0) > args.time_budget


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    import_comfyui(args)
    env = environment(args)
    print("\n".join("# " + line for line in env), flush=True)
    inputs = Inputs(args)
    rows, lowvram_rows, ref = [], [], {}
    try:
        base = load_flux(args, {"dtype": torch.bfloat16})
    except Exception as e:  # noqa: BLE001 - nothing else can run; still write the report
        traceback.print_exc()
        rows.append(dict(format="bf16", error=f"loading the model: {type(e).__name__}: {e}", note=""))
        base = None
    print(f"# ComfyUI imported and the bf16 model loaded in {time.time() - t0:.1f} s", flush=True)
    durations = []

    def lowvram_section():
        for name in args.lowvram_formats:
            if over_budget(args, t0, durations):
                lowvram_rows.append(dict(format=name, budget_gib=None,
                                         error=f"skipped: --time-budget {args.time_budget:g} s"))
                continue
            start = time.time()
            run_lowvram(name, base, inputs, args, lowvram_rows)
            durations.append(time.time() - start)
            write_outputs(args, env, rows, lowvram_rows, t0)

    if base is not None:
        # The low-VRAM runs first by default: the one claim no other row shows, and cheap
        # next to a full pass; formats at the end of the list go first when time runs out.
        if not args.no_lowvram and not args.lowvram_last:
            lowvram_section()
        for name in args.formats:
            if over_budget(args, t0, durations):
                rows.append(dict(format=name, error=f"skipped: --time-budget {args.time_budget:g} s", note=""))
                continue
            start = time.time()
            patcher = run_config(name, base, inputs, args, rows, ref)
            row = rows[-1]
            if args.profile == "missed" and not row["error"] and missed(row, {r["format"]: r for r in rows}):
                try:
                    with torch.inference_mode():
                        row["profile"] = profile_step(row["_step"], args.device == "cuda", args.profile_rows)
                except Exception as e:  # noqa: BLE001
                    row["profile"] = f"profile failed: {type(e).__name__}: {e}"
            release(row, patcher, base)
            durations.append(time.time() - start)
            write_outputs(args, env, rows, lowvram_rows, t0)
        if not args.no_lowvram and args.lowvram_last:
            lowvram_section()
    md = write_outputs(args, env, rows, lowvram_rows, t0, final=True)
    print("\n" + md + "\n")
    print(compact(rows, lowvram_rows), flush=True)
    # Patchers released while the interpreter still works (ModelPatcher.__del__ needs ComfyUI).
    _NF4_CACHE.clear()
    base = None  # noqa: F841
    gc.collect()
    return rows, lowvram_rows


if __name__ == "__main__":
    main()
