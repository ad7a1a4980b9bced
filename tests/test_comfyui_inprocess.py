"""The ComfyUI glue against a real ComfyUI (COMFYUI_PATH), in this process, on the CPU:
model detection, Quantize Model, Save/Load round trips, stock formats, bad files, LoRA,
lowvram offload and torch.compile. The HTTP workflows are in test_comfyui_server.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

import comfy_harness as H

pytestmark = pytest.mark.comfyui

FORMATS = ("nf4", "fp4", "int8_block", "int8_lode", "int8_row")
# Relative L2 error of the final latent (tiny Flux, 4 Euler steps) against the unquantized
# model. Measured over model seeds 0-2: nf4 0.064-0.093, fp4 0.087-0.090, int8 0.006-0.009.
BOUND = {"nf4": 0.15, "fp4": 0.15, "int8_block": 0.02, "int8_lode": 0.02, "int8_row": 0.02}
# Relative error of a LoRA's effect (LoRA'd minus plain latent) against the same on the
# unquantized model, exact side path. Measured: nf4 0.15, int8_row 0.015 (LoRA effect 0.54).
LORA_BOUND = {"nf4": 0.25, "fp4": 0.3, "int8_block": 0.05, "int8_lode": 0.05, "int8_row": 0.05}


@pytest.fixture(scope="module")
def comfy():
    if H.comfyui_path() is None:
        pytest.skip("COMFYUI_PATH not set (a ComfyUI checkout)")
    return H.import_comfyui()


@pytest.fixture(scope="module")
def glue(comfy):
    from comfy_quant_native.comfy import loader, lora, operations, quantize, save

    return type("Glue", (), dict(loader=loader, lora=lora, operations=operations, quantize=quantize, save=save))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, comfy):
    from safetensors.torch import save_file

    path = str(tmp_path_factory.mktemp("models") / "tiny_flux.safetensors")
    save_file(H.tiny_flux_state_dict(seed=0), path)
    return path


@pytest.fixture(scope="module")
def base(comfy, tiny_path):
    import comfy.sd

    return comfy.sd.load_diffusion_model(tiny_path)


def sample(model, seed=0, steps=4):
    import comfy.sample

    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    g = torch.Generator().manual_seed(5)
    cond = [[torch.randn(1, 8, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, seed=seed,
                               disable_pbar=True)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def with_lora(model, lora_sd, strength=1.0):
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patched = model.clone()
    loaded = patched.add_patches(comfy.lora.load_lora(lora_sd, key_map), strength)
    assert len(loaded) == len(lora_sd) // 3
    return patched


def our_layers(model):
    return {n: m for n, m in model.model.diffusion_model.named_modules() if getattr(m, "comfy_quant_layout", None)}


@pytest.fixture(scope="module")
def base_latent(base):
    return sample(base)


# ----------------------------------------------------------------------------- detection, stock
def test_tiny_flux_detected_and_plain_file_loaded_by_stock(comfy, glue, tiny_path):
    model, summary = glue.loader.load_diffusion_model(tiny_path)
    assert "loaded by ComfyUI" in summary
    assert type(model.model.model_config).__name__ == "Flux"
    assert model.model.diffusion_model.img_in.weight.shape == (128, 64)
    assert not our_layers(model)


# ----------------------------------------------------------------------------- Quantize Model
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_model_clone(glue, base, base_latent, fmt, monkeypatch):
    assert torch.equal(sample(base), base_latent)  # base loaded: the model holds its layers
    weights_before = {k: v.clone() for k, v in base.model.state_dict().items()}
    q, summary = glue.quantize.quantize_model(base, fmt, min_params=0)
    # Shared presets: blocks and modulation quantized; embedders and final layer kept.
    assert "26 of 36 Linear layers" in summary and "architecture flux" in summary
    assert q.model_size() < base.model_size()

    calls = []
    real = glue.operations.native_linear
    monkeypatch.setattr(glue.operations, "native_linear", lambda *a: calls.append(1) or real(*a))
    out = sample(q)
    layers = our_layers(q)
    assert len(layers) == 26
    # 26 quantized layers run natively in each of the 4 model calls; weights stay quantized.
    assert len(calls) == 26 * 4
    assert all(type(m.weight).__name__ == "QuantizedTensor" for m in layers.values())
    assert rel(out, base_latent) < BOUND[fmt], rel(out, base_latent)

    # The input model is untouched and still runs as before (loading it swaps the
    # original layers back into the model the two patchers share).
    assert torch.equal(sample(base), base_latent)
    assert not our_layers(base)
    for k, v in base.model.state_dict().items():
        assert torch.equal(v, weights_before[k]), k
    assert torch.equal(sample(q), out)


def test_quantize_model_presets_and_errors(glue, base):
    _, summary = glue.quantize.quantize_model(base, "nf4", min_params=0, exclude=r"single_blocks")
    assert "20 of 36" in summary
    _, summary = glue.quantize.quantize_model(base, "nf4", min_params=0, keep_modulation=True)
    assert "20 of 36" in summary and "modulation (keep_modulation)" in summary
    _, summary = glue.quantize.quantize_model(base, "int8_row", min_params=0, preset="none")
    assert "36 of 36" in summary
    with pytest.raises(ValueError, match="no layer to quantize"):
        glue.quantize.quantize_model(base, "nf4")  # every tiny layer is under 1M weights
    with pytest.raises(ValueError, match="layout"):
        glue.quantize.quantize_model(base, "q4_0", min_params=0)


# ----------------------------------------------------------------------------- Save / Load
@pytest.mark.parametrize("fmt", FORMATS)
def test_save_then_load_reads_back_identically(glue, base, tmp_path, fmt):
    from safetensors import safe_open

    q, _ = glue.quantize.quantize_model(base, fmt, min_params=0)
    expected = sample(q)
    path = str(tmp_path / f"tiny_{fmt}.safetensors")
    summary = glue.save.save_model(q, path)
    assert "26 " + fmt in summary
    with safe_open(path, "pt") as f:
        meta = json.loads(bytes(f.get_tensor("double_blocks.0.img_attn.qkv.comfy_quant").tolist()))
        assert meta["format"] == {"nf4": "bnb_nf4", "fp4": "bnb_fp4", "int8_block": "int8_blockwise",
                                  "int8_lode": "int8_lodewise", "int8_row": "int8_tensorwise"}[fmt]
    loaded, summary = glue.loader.load_diffusion_model(path)
    assert "26 " + fmt in summary
    saved_layers, loaded_layers = our_layers(q), our_layers(loaded)
    assert saved_layers.keys() == loaded_layers.keys()
    for name, m in saved_layers.items():
        a, b = m.weight, loaded_layers[name].weight
        assert torch.equal(a._qdata, b._qdata) and torch.equal(a._params.scale, b._params.scale), name
    # Same data, same kernels; the rest of the model runs through the mixed-precision ops
    # class ComfyUI picks for a file with quantized layers (norms differ in the last bit).
    assert rel(sample(loaded), expected) < 1e-5
    with pytest.raises(FileExistsError):
        glue.save.save_model(q, path)


def test_int8_row_files_also_load_in_stock_comfyui(comfy, glue, base, base_latent, tmp_path):
    """Our int8_row is ComfyUI's int8_tensorwise with one scale per row: stock loads it."""
    import comfy.sd

    q, _ = glue.quantize.quantize_model(base, "int8_row", min_params=0)
    path = str(tmp_path / "row.safetensors")
    glue.save.save_model(q, path)
    stock = comfy.sd.load_diffusion_model(path)
    assert type(stock.model.diffusion_model.double_blocks[0].img_attn.qkv.weight).__name__ == "QuantizedTensor"
    assert rel(sample(stock), base_latent) < BOUND["int8_row"]


def _fp8_layer(sd, layer):
    w = sd[layer + ".weight"].float()
    scale = w.abs().amax() / 448.0
    sd[layer + ".weight"] = (w / scale).to(torch.float8_e4m3fn)
    sd[layer + ".weight_scale"] = scale.reshape(())
    return {"format": "float8_e4m3fn"}


def test_stock_formats_load_through_our_node(comfy, glue, base_latent, tmp_path):
    """fp8 files (per-layer comfy_quant or a _quantization_metadata header) go to ComfyUI;
    a file mixing fp8 and our nf4 loads both kinds of layers."""
    from safetensors.torch import save_file

    from comfy_quant_native import QuantizedWeight, formats
    from comfy_quant_native.formats.common import json_tensor

    layers = [f"double_blocks.{i}.{s}_{p}" for i in range(2) for s in ("img", "txt") for p in ("attn.qkv", "mlp.0")]
    sd = H.tiny_flux_state_dict(seed=0)
    for layer in layers:
        sd[layer + ".comfy_quant"] = json_tensor(_fp8_layer(sd, layer))
    save_file(sd, str(tmp_path / "fp8.safetensors"))
    model, summary = glue.loader.load_diffusion_model(str(tmp_path / "fp8.safetensors"))
    assert "loaded by ComfyUI" in summary
    qkv = model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    assert qkv._layout_cls.startswith("TensorCoreFP8")
    assert rel(sample(model), base_latent) < 0.05

    sd = H.tiny_flux_state_dict(seed=0)
    header = {"format_version": "1.0", "layers": {layer: _fp8_layer(sd, layer) for layer in layers}}
    save_file(sd, str(tmp_path / "fp8_header.safetensors"), {"_quantization_metadata": json.dumps(header)})
    model, summary = glue.loader.load_diffusion_model(str(tmp_path / "fp8_header.safetensors"))
    assert "loaded by ComfyUI" in summary
    assert model.model.diffusion_model.double_blocks[1].txt_mlp[0].weight._layout_cls.startswith("TensorCoreFP8")

    sd = H.tiny_flux_state_dict(seed=0)
    for layer in layers[:4]:
        sd[layer + ".comfy_quant"] = json_tensor(_fp8_layer(sd, layer))
    for i in range(2):
        layer = f"single_blocks.{i}.linear1"
        sd.update(formats.layer_tensors(layer, QuantizedWeight.from_float(sd.pop(layer + ".weight"), "nf4")))
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    model, summary = glue.loader.load_diffusion_model(str(tmp_path / "mixed.safetensors"))
    assert "2 nf4" in summary and "4 comfyui:float8_e4m3fn" in summary
    dm = model.model.diffusion_model
    assert dm.double_blocks[0].img_attn.qkv.weight._layout_cls.startswith("TensorCoreFP8")
    assert dm.single_blocks[1].linear1.comfy_quant_layout == "nf4"
    assert rel(sample(model), base_latent) < 0.1


# ----------------------------------------------------------------------------- bad files
def _nf4_file(path, mutate):
    from safetensors.torch import save_file

    from comfy_quant_native import QuantizedWeight, formats

    sd = H.tiny_flux_state_dict(seed=0)
    layer = "double_blocks.1.img_mlp.0"
    sd.update(formats.layer_tensors(layer, QuantizedWeight.from_float(sd.pop(layer + ".weight"), "nf4")))
    mutate(sd, layer)
    save_file(sd, path)


def _json(sd, layer, **changes):
    meta = json.loads(bytes(sd[layer + ".comfy_quant"].tolist()))
    meta.update(changes)
    from comfy_quant_native.formats.common import json_tensor

    sd[layer + ".comfy_quant"] = json_tensor(meta)


BAD_FILES = {
    "unknown_format": (lambda sd, layer: _json(sd, layer, format="bnb_q3"), "q3"),
    "missing_scale": (lambda sd, layer: sd.pop(layer + ".absmax"), "absmax"),
    "wrong_scale_shape": (lambda sd, layer: sd.__setitem__(layer + ".absmax", sd[layer + ".absmax"][:-3]), "absmax"),
    "wrong_orig_shape": (lambda sd, layer: _json(sd, layer, orig_shape=[256, 512]), "img_mlp.0"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_quantized_files_name_file_and_layer(glue, tmp_path, case):
    from comfy_quant_native.formats import FormatError

    mutate, needle = BAD_FILES[case]
    path = str(tmp_path / f"{case}.safetensors")
    _nf4_file(path, mutate)
    with pytest.raises(FormatError) as e:
        glue.loader.load_diffusion_model(path)
    msg = str(e.value)
    assert f"{case}.safetensors" in msg and needle in msg, msg
    assert "double_blocks.1.img_mlp.0" in msg, msg


def test_unreadable_files_name_the_file(glue, tmp_path, tiny_path):
    from comfy_quant_native.formats import FormatError

    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(open(tiny_path, "rb").read()[:-1000])
    with pytest.raises(FormatError, match=r"cut\.safetensors.*truncated"):
        glue.loader.load_diffusion_model(str(truncated))
    text = tmp_path / "readme.safetensors"
    text.write_text("not a model")
    with pytest.raises(FormatError, match=r"readme\.safetensors.*not a safetensors file"):
        glue.loader.load_diffusion_model(str(text))
    pickle = tmp_path / "garbage.ckpt"
    pickle.write_bytes(os.urandom(300))
    with pytest.raises(FormatError, match=r"garbage\.ckpt.*ComfyUI could not load it"):
        glue.loader.load_diffusion_model(str(pickle))


# ----------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def lora_sd():
    return H.tiny_flux_lora(seed=1, scale=1.0)


@pytest.fixture(scope="module")
def base_lora_delta(base, base_latent, lora_sd):
    return sample(with_lora(base, lora_sd)) - base_latent


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_exact_side_path(glue, base, base_lora_delta, lora_sd, fmt):
    q, _ = glue.quantize.quantize_model(base, fmt, min_params=0)
    plain = sample(q)
    ql = with_lora(q, lora_sd)
    delta = sample(ql) - plain
    assert torch.equal(sample(ql) - plain, delta)  # a second run on the loaded model: same
    layers = our_layers(ql)
    assert sum(m.comfy_quant_lora is not None for m in layers.values()) == 20
    assert all(type(m.weight).__name__ == "QuantizedTensor" for m in layers.values())
    assert float(delta.norm()) > 0.3 * float(plain.norm())  # the LoRA does change the output
    assert rel(delta, base_lora_delta) < LORA_BOUND[fmt], rel(delta, base_lora_delta)
    # Unpatched again: the side path is gone and the plain clone gives its old output.
    assert torch.equal(sample(q), plain)
    assert all(m.comfy_quant_lora is None for m in our_layers(q).values())


def test_lora_merged_mode_requantizes_and_restores(glue, base, base_lora_delta, lora_sd):
    # The test LoRA patches the block layers only: keep modulation out of the check.
    q, _ = glue.quantize.quantize_model(base, "int8_row", min_params=0, lora_mode="merged", keep_modulation=True)
    plain = sample(q)
    original = {n: m.weight._qdata for n, m in our_layers(q).items()}
    ql = with_lora(q, lora_sd)
    delta = sample(ql) - plain
    assert all(m.comfy_quant_lora is None for m in our_layers(ql).values())
    assert not any(torch.equal(m.weight._qdata, original[n]) for n, m in our_layers(ql).items())  # requantized
    assert rel(delta, base_lora_delta) < 0.08
    assert torch.equal(sample(q), plain)
    assert all(torch.equal(m.weight._qdata, original[n]) for n, m in our_layers(q).items())  # restored


def test_lora_non_lora_patch_falls_back_to_merged(glue, base):
    """A 'diff' patch is not low-rank: the layer requantizes the patched weight."""
    q, _ = glue.quantize.quantize_model(base, "int8_row", min_params=0)
    plain = sample(q)
    key = "diffusion_model.double_blocks.0.img_mlp.0.weight"
    patched = q.clone()
    patched.add_patches({key: (torch.full((512, 128), 0.02),)}, 1.0)
    out = sample(patched)
    layer = patched.model.diffusion_model.double_blocks[0].img_mlp[0]
    assert layer.comfy_quant_lora is None and type(layer.weight).__name__ == "QuantizedTensor"
    assert not torch.equal(out, plain)
    assert torch.equal(sample(q), plain)


def test_saved_model_bakes_the_lora(glue, base, lora_sd, tmp_path):
    q, _ = glue.quantize.quantize_model(base, "int8_row", min_params=0)
    ql = with_lora(q, lora_sd)
    lora_out = sample(ql)
    path = str(tmp_path / "baked.safetensors")
    glue.save.save_model(ql, path)
    loaded, _ = glue.loader.load_diffusion_model(path)
    assert rel(sample(loaded), lora_out) < 0.02  # merged = requantized, so not bit-exact


# ----------------------------------------------------------------------------- offload
def _forward(model):
    """One diffusion-model call through the patcher as it is loaded now."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ctx = torch.randn(1, 8, 64, generator=g)
    y = torch.randn(1, 32, generator=g)
    dm = model.model.diffusion_model
    with torch.no_grad():
        return dm(x, torch.tensor([0.5]), context=ctx, y=y, guidance=torch.tensor([3.5]))


def test_lowvram_offload_and_reload(comfy, glue, base, lora_sd):
    import comfy.model_management as mm

    if base.is_dynamic():
        pytest.skip("dynamic VRAM offloads per layer by itself; this drives the legacy lowvram loader")

    # The test LoRA patches the block layers only: keep modulation out of the check.
    q, _ = glue.quantize.quantize_model(base, "nf4", min_params=0, keep_modulation=True)
    cpu = torch.device("cpu")
    mm.unload_all_models()
    q.patch_model(device_to=cpu, lowvram_model_memory=0)  # full load
    full = _forward(q)
    q.unpatch_model(cpu)
    q.patch_model(device_to=cpu, lowvram_model_memory=1)  # nothing fits: every layer offloaded
    assert q.model.model_lowvram
    assert all(m.comfy_cast_weights for m in our_layers(q).values())
    assert torch.equal(_forward(q), full)
    q.unpatch_model(cpu)

    # With a LoRA: offloaded layers run ComfyUI's per-call patch (dequantize + patch, float),
    # loaded layers the exact side path; both are the exact LoRA.
    ql = with_lora(q, lora_sd)
    ql.patch_model(device_to=cpu, lowvram_model_memory=0)
    side = _forward(ql)
    assert all(m.comfy_quant_lora is not None for m in our_layers(ql).values())
    ql.unpatch_model(cpu)
    ql.patch_model(device_to=cpu, lowvram_model_memory=1)
    assert all(len(m.weight_function) == 1 and m.comfy_quant_lora is None for m in our_layers(ql).values())
    per_call = _forward(ql)
    assert rel(per_call, side) < 1e-4, rel(per_call, side)
    freed = ql.partially_unload(cpu, memory_to_free=10**12)
    assert freed >= 0
    assert rel(_forward(ql), side) < 1e-4
    ql.unpatch_model(cpu)
    mm.unload_all_models()


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_model_without_graph_breaks_in_our_ops(comfy, glue, base):
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    q, _ = glue.quantize.quantize_model(base, "int8_block", min_params=0)
    eager = sample(q, steps=2)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = q.clone()
    set_torch_compile_wrapper(compiled, backend="aot_eager")
    out = sample(compiled, steps=2)
    assert rel(out, eager) < 1e-3
    breaks = torch._dynamo.utils.counters["graph_break"]
    ours = [reason for reason in breaks if "comfy_quant" in reason or "qtensor" in reason]
    assert not ours, ours

    # One of our layers alone compiles as a single graph (fullgraph raises on any break).
    layer = next(iter(our_layers(q).values()))
    x = torch.randn(3, 128)
    torch._dynamo.reset()
    fn = torch.compile(layer.forward, backend="aot_eager", fullgraph=True)
    assert torch.allclose(fn(x), layer(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- nodes
def test_nodes_describe_every_input(comfy):
    from comfy_quant_native.comfy import nodes

    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        assert cls.DESCRIPTION and cls.CATEGORY == "comfy_quant_native"
        for name, spec in cls.INPUT_TYPES()["required"].items():
            assert spec[1].get("tooltip"), (cls.__name__, name)


def test_quantize_a_loaded_quantized_model_to_another_format(glue, base, base_latent, tmp_path):
    """Load Quantized Diffusion Model -> Quantize Model (another format) -> Save: the int8
    layers are dequantized and requantized; the result is still within the nf4 bound."""
    q, _ = glue.quantize.quantize_model(base, "int8_lode", min_params=0)
    path = str(tmp_path / "lode.safetensors")
    glue.save.save_model(q, path)
    loaded, _ = glue.loader.load_diffusion_model(path)
    again, summary = glue.quantize.quantize_model(loaded, "nf4", min_params=0)
    assert "26 of 36" in summary
    assert {m.comfy_quant_layout for m in our_layers_after_sampling(again)} == {"nf4"}
    assert rel(sample(again), base_latent) < BOUND["nf4"]
    assert rel(sample(loaded), base_latent) < BOUND["int8_lode"]  # the input is unchanged
    path2 = str(tmp_path / "resaved.safetensors")
    glue.save.save_model(loaded, path2)  # a loaded model saves as it is
    reloaded, summary = glue.loader.load_diffusion_model(path2)
    assert "26 int8_lode" in summary


def our_layers_after_sampling(model):
    sample(model, steps=1)
    return our_layers(model).values()


# ----------------------------------------------------------------------------- files in the wild
def _wild_file(path, form):
    """The tiny Flux with its 20 attention/MLP layers in nf4, written in ``form``; returns
    the same model in our comfy_quant form (the reference)."""
    from comfy_quant_native import QuantizedWeight, formats

    sd = H.tiny_flux_state_dict(seed=0)
    names = [k[: -len(".weight")] for k in sd if k.endswith(".weight")
             and any(s in k for s in ("_attn.qkv", "_attn.proj", "_mlp.", "linear1", "linear2"))]
    layers = {n: QuantizedWeight.from_float(sd.pop(n + ".weight"), "nf4", double_quant=(form == "bnb"))
              for n in names}
    if form == "convert_to_quant":
        tensors = dict(sd)
        for n, qw in layers.items():
            t = formats.layer_tensors(n, qw)
            packed = t[n + ".weight"]
            t[n + ".weight"] = ((packed & 0x0F) << 4) | (packed >> 4)  # element 2j in the LOW nibble
            meta = json.loads(bytes(t[n + ".comfy_quant"].tolist()))
            del meta["nibble_order"]
            from comfy_quant_native.formats.common import json_tensor

            t[n + ".comfy_quant"] = json_tensor(meta)
            tensors.update(t)
        metadata = {}
    else:
        tensors, metadata = formats.emit_state_dict(layers, sd, form)
    formats.save_file(path, tensors, metadata or None)
    reference, _ = formats.emit_state_dict(layers, sd, "comfy_quant")
    return reference


@pytest.mark.parametrize("form", ["bnb", "quantization_metadata", "convert_to_quant"])
def test_files_in_the_wild_load_like_ours(glue, tmp_path, form):
    from comfy_quant_native import formats

    path = str(tmp_path / f"{form}.safetensors")
    reference = _wild_file(path, form)
    formats.save_file(str(tmp_path / "ours.safetensors"), reference)
    ours, _ = glue.loader.load_diffusion_model(str(tmp_path / "ours.safetensors"))
    wild, summary = glue.loader.load_diffusion_model(path)
    assert "20 nf4" in summary and form.split("_")[0] in summary, summary
    a, b = our_layers(ours), our_layers(wild)
    assert a.keys() == b.keys() and len(a) == 20
    for name in a:
        assert torch.equal(a[name].weight._qdata, b[name].weight._qdata), name
        assert torch.equal(a[name].weight._params.scale, b[name].weight._params.scale), name
    assert rel(sample(wild), sample(ours)) < 1e-6
