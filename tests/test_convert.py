"""convert_file end to end on small synthetic checkpoints: every format, presets and
architecture detection, include/exclude, bad input, Ctrl-C, inspect."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from comfy_quant_native import QuantizedWeight, formats
from comfy_quant_native.convert import ConvertError, Converter, convert_file, inspect_file
from comfy_quant_native.convert import converter as converter_mod
from comfy_quant_native.presets import LayerSelector, detect_architecture
from comfy_quant_native.convert.rounding import quantize_fp8
from convert_helpers import json_of, listing, load_file, save_file, tiny_shapes, write_tiny

OUR_FORMATS = {"nf4": ("nf4", 64), "fp4": ("fp4", 64), "int8_blockwise": ("int8_block", 128),
               "int8_lodewise": ("int8_lode", 128), "int8_tensorwise": ("int8_row", None)}
FLUX_QUANTIZED = ("_mod.lin", "_attn.qkv", "_attn.proj", "_mlp.0", "_mlp.2",
                  "linear1", "linear2", "modulation.lin")
FLUX_KEPT = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "guidance_in.out_layer",
             "final_layer.linear", "final_layer.adaLN_modulation.1")


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("in") / "flux.safetensors", "flux")


def _layer_names(sd):
    return {k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")}


@pytest.mark.parametrize("fmt", list(OUR_FORMATS))
def test_our_formats_bit_exact_and_loadable(flux_file, tmp_path, fmt):
    layout, group = OUR_FORMATS[fmt]
    out = str(tmp_path / "o.safetensors")
    summary = convert_file(flux_file, out, format=fmt, min_params=0)
    src, got = load_file(flux_file), load_file(out)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "tiny" and meta["note"] == "kept"  # input metadata kept
    assert '"format": "%s"' % fmt in meta["comfy_quant_native.convert"]
    layers = _layer_names(got)
    assert layers and all(any(n in p for n in FLUX_QUANTIZED) for p in layers)
    assert not any(any(p.startswith(k) for k in FLUX_KEPT) for p in layers)
    assert summary.quantized == len(layers) and summary.architecture == "flux"
    loaded = formats.load_state_dict(got, meta, source=out)
    assert set(loaded.layers) == layers and loaded.counts[layout] == len(layers)
    for prefix, qw in loaded.layers.items():
        ref = QuantizedWeight.from_float(src[prefix + ".weight"], layout, group)
        assert torch.equal(qw.data, ref.data) and torch.equal(qw.scale.reshape(-1), ref.scale.reshape(-1)), prefix
        assert qw.params.shape == tuple(src[prefix + ".weight"].shape)
    for k, t in loaded.tensors.items():  # everything else is byte for byte the input
        assert torch.equal(t, src[k]), k
    assert set(loaded.tensors) | {p + ".weight" for p in layers} == set(src)


def test_int8_tensorwise_loads_as_stock_comfyui_would(flux_file, tmp_path):
    """Stock ComfyUI hands L.weight and L.weight_scale to comfy-kitchen's
    TensorWiseINT8Layout, which dequantizes q.float() * scale: scale must be [N, 1]."""
    tensor_mod = pytest.importorskip("comfy_kitchen.tensor")
    out = str(tmp_path / "o.safetensors")
    convert_file(flux_file, out, format="int8_tensorwise", min_params=0)
    got, src = load_file(out), load_file(flux_file)
    ours = formats.load_state_dict(got).layers
    for prefix in _layer_names(got):
        conf = json_of(got[prefix + ".comfy_quant"])
        assert conf["format"] == "int8_tensorwise"
        q, scale = got[prefix + ".weight"], got[prefix + ".weight_scale"]
        assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
        cls = tensor_mod.get_layout_class("TensorWiseINT8Layout")
        params = cls.Params(scale=scale, orig_dtype=torch.float32, orig_shape=tuple(q.shape))
        stock = tensor_mod.QuantizedTensor(q, "TensorWiseINT8Layout", params).dequantize()
        assert torch.equal(stock.float(), ours[prefix].dequantize(torch.float32))
        assert (stock.float() - src[prefix + ".weight"].float()).abs().max() <= scale.max() * 0.5 + 1e-6


def test_float8_is_stock_comfyui_form(flux_file, tmp_path):
    tensor_mod = pytest.importorskip("comfy_kitchen.tensor")
    out = str(tmp_path / "o.safetensors")
    convert_file(flux_file, out, format="float8_e4m3fn", min_params=0)
    got, src = load_file(out), load_file(flux_file)
    layers = _layer_names(got)
    assert layers
    for prefix in layers:
        assert set(k for k in got if k.startswith(prefix + ".")) <= {
            prefix + s for s in (".weight", ".weight_scale", ".comfy_quant", ".bias")}
        assert json_of(got[prefix + ".comfy_quant"]) == {"format": "float8_e4m3fn"}
        q, scale = got[prefix + ".weight"], got[prefix + ".weight_scale"]
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == ()
        w = src[prefix + ".weight"]
        ref_q, ref_s = quantize_fp8(w)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_s)
        cls = tensor_mod.get_layout_class("TensorCoreFP8Layout")
        params = cls.Params(scale=scale, orig_dtype=torch.float32, orig_shape=tuple(q.shape))
        deq = tensor_mod.QuantizedTensor(q, "TensorCoreFP8Layout", params).dequantize().float()
        rel = (deq - w.float()).norm() / w.float().norm()
        assert rel < 0.04, (prefix, float(rel))


def test_fp8_quantize_exact_and_edge_cases():
    w = torch.randn(64, 128).bfloat16()
    q, s = quantize_fp8(w)
    assert float(s) == float(w.float().abs().max() / 448)
    assert torch.equal(q.view(torch.uint8), (w.float() * (1 / s)).to(torch.float8_e4m3fn).view(torch.uint8))
    assert q.float().abs().max() == 448
    q0, s0 = quantize_fp8(torch.zeros(3, 4))
    assert float(s0) == 1.0 and not q0.float().any()
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_fp8(bad)


def test_converter_plan_matches_convert_every_format():
    w = torch.randn(256, 384, dtype=torch.float16)
    for fmt in converter_mod.FORMATS:
        conv = Converter(fmt)
        out = conv.convert("blocks.3.attn.qkv.weight", w)
        plan = conv.plan("blocks.3.attn.qkv", w.shape, w.dtype)
        assert [(s.key, s.dtype, s.shape) for s in plan] == [(k, t.dtype, tuple(t.shape)) for k, t in out.items()]
        assert all(k.startswith("blocks.3.attn.qkv.") for k in out)
        assert all(t.device.type == "cpu" for t in out.values())


def test_converter_argument_errors():
    with pytest.raises(ValueError, match="format must be one of"):
        Converter("int4")
    with pytest.raises(ValueError, match="power of two"):
        Converter("nf4", group_size=48)
    with pytest.raises(ValueError, match="does not apply"):
        Converter("float8_e4m3fn", group_size=64)
    with pytest.raises(ValueError, match="does not lower"):
        Converter("float8_e4m3fn", rounding="mse")
    with pytest.raises(ValueError, match="cannot take nf4"):
        Converter("nf4", group_size=128).convert("x", torch.randn(4, 192))
    with pytest.raises(ValueError, match="out_features 130"):
        Converter("int8_blockwise").plan("x", (130, 256))


# ----------------------------------------------------------------------------- presets
EXPECT = {  # (a layer the preset keeps, a layer it quantizes)
    "flux": ("txt_in", "double_blocks.1.img_mod.lin"),
    "chroma": ("distilled_guidance_layer.layers.1.in_layer", "single_blocks.0.linear1"),
    "sd3": ("context_embedder", "joint_blocks.0.x_block.adaLN_modulation.1"),
    "qwen_image": ("transformer_blocks.0.img_mod.1", "transformer_blocks.1.img_mod.1"),
    "wan": ("img_emb.proj.3", "blocks.1.ffn.0"),
    "hunyuan_video": ("txt_in.individual_token_refiner.blocks.0.self_attn_qkv", "double_blocks.0.img_attn_qkv"),
    "hidream": ("double_stream_blocks.0.block.ff_i.gate", "double_stream_blocks.0.block.ff_i.experts.1.w2"),
    "lumina2": ("layers.1.adaLN_modulation.1", "layers.1.feed_forward.w3"),
}


@pytest.mark.parametrize("arch", list(EXPECT))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_architecture_detection_and_preset(arch, prefix):
    shapes = {prefix + k: v for k, v in tiny_shapes(arch).items()}
    assert detect_architecture(shapes) == (arch, prefix)
    sel = LayerSelector("auto", shapes, min_params=0)
    kept, quantized = EXPECT[arch]
    d = sel.decide(prefix + kept, shapes[prefix + kept + ".weight"], True)
    assert not d.quantize and d.reason.startswith(arch + ":"), d
    assert sel.decide(prefix + quantized, shapes[prefix + quantized + ".weight"], True).quantize
    # the default size threshold keeps every toy layer
    assert not LayerSelector("auto", shapes).decide(prefix + quantized, shapes[prefix + quantized + ".weight"],
                                                    True).quantize


def test_full_checkpoint_keeps_what_is_outside_the_model(tmp_path):
    extra = {"first_stage_model.decoder.conv_in.weight": (32, 16, 3, 3),
             "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512),
             "text_encoders.t5.encoder.block.0.layer.0.SelfAttention.q.weight": (256, 256)}
    path = write_tiny(tmp_path / "full.safetensors", "flux", prefix="model.diffusion_model.", extra=extra)
    out = str(tmp_path / "o.safetensors")
    s = convert_file(path, out, format="nf4", min_params=0)
    assert s.architecture == "flux" and s.kept["outside the diffusion model"] == 2
    layers = _layer_names(load_file(out))
    assert layers and all(p.startswith("model.diffusion_model.") for p in layers)


def test_generic_preset_for_unknown_architecture(tmp_path):
    p = str(tmp_path / "x.safetensors")
    save_file({"encoder.layers.0.fc.weight": torch.randn(128, 128), "encoder.embed_tokens.weight": torch.randn(128, 128),
               "encoder.layers.0.norm.weight": torch.randn(128)}, p)
    s = convert_file(p, str(tmp_path / "o.safetensors"), format="int8_lodewise", min_params=0)
    assert s.architecture == "generic" and s.quantized == 1 and s.kept["generic: embedding"] == 1


def test_include_exclude(flux_file, tmp_path):
    out = str(tmp_path / "o.safetensors")
    s = convert_file(flux_file, out, format="nf4", min_params=0, exclude=r"^single_blocks\.", include=r"^img_in$")
    layers = _layer_names(load_file(out))
    assert "img_in" in layers and not any(p.startswith("single_blocks") for p in layers)
    assert s.kept["excluded by --exclude"] == 6
    # exclude wins over include
    s = convert_file(flux_file, out, format="nf4", min_params=0, include="img_in", exclude="img_in")
    assert "img_in" not in _layer_names(load_file(out))


def test_dry_run_writes_nothing(flux_file, tmp_path):
    s = convert_file(flux_file, str(tmp_path / "o.safetensors"), format="nf4", min_params=0, dry_run=True)
    assert s.quantized > 0 and listing(tmp_path) == []
    assert "planned" in str(s)


# ----------------------------------------------------------------------------- bad input
def _fails(tmp_path, match, *args, **kw):
    before = listing(tmp_path)
    with pytest.raises((ConvertError, ValueError), match=match) as e:
        convert_file(*args, **kw)
    assert "\n" not in str(e.value)
    assert listing(tmp_path) == before  # nothing written, no partial file
    return e.value


def test_bad_inputs(flux_file, tmp_path):
    out = str(tmp_path / "o.safetensors")
    _fails(tmp_path, "no such file", str(tmp_path / "missing.safetensors"), out, format="nf4")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(open(flux_file, "rb").read()[:-1000])
    _fails(tmp_path, "truncated", str(trunc), out, format="nf4")
    text = tmp_path / "notes.safetensors"
    text.write_text("not a model at all\n" * 50)
    _fails(tmp_path, "not a safetensors file", str(text), out, format="nf4")
    _fails(tmp_path, "format must be one of", flux_file, out, format="q4_k")


def test_already_quantized_inputs(flux_file, tmp_path):
    ours = str(tmp_path / "ours.safetensors")
    convert_file(flux_file, ours, format="nf4", min_params=0)
    out = str(tmp_path / "again.safetensors")
    _fails(tmp_path, "already quantized .*bnb_nf4", ours, out, format="int8_blockwise")
    fp8 = str(tmp_path / "fp8.safetensors")
    convert_file(flux_file, fp8, format="float8_e4m3fn", min_params=0)
    _fails(tmp_path, "already quantized .*float8_e4m3fn", fp8, out, format="nf4")
    legacy = str(tmp_path / "legacy.safetensors")
    save_file({"a.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn), "a.scale_weight": torch.ones(()),
               "scaled_fp8": torch.empty(0).to(torch.float8_e4m3fn)}, legacy)
    _fails(tmp_path, "already quantized", legacy, out, format="nf4")
    bnb = str(tmp_path / "bnb.safetensors")
    save_file({"a.weight": torch.zeros(8, dtype=torch.uint8), "a.weight.absmax": torch.ones(1),
               "a.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b'{"shape": [4, 4]}'), dtype=torch.uint8)},
              bnb)
    _fails(tmp_path, "already quantized .*bitsandbytes", bnb, out, format="nf4")


def test_group_size_that_does_not_fit(flux_file, tmp_path):
    e = _fails(tmp_path, "cannot take nf4: in_features 256 is not a multiple of group size 512", flux_file,
               str(tmp_path / "o.safetensors"), format="nf4", group_size=512, min_params=0)
    assert "--group-size" in str(e)
    _fails(tmp_path, r"final_layer.linear.weight \[64, 256\] cannot take int8_blockwise: out_features 64 .*--include",
           flux_file, str(tmp_path / "o.safetensors"), format="int8_blockwise", min_params=0, include="final_layer")


def test_unwritable_outputs(flux_file, tmp_path):
    _fails(tmp_path, "does not exist", flux_file, str(tmp_path / "no" / "dir" / "o.safetensors"), format="nf4")
    _fails(tmp_path, "is a directory", flux_file, str(tmp_path), format="nf4")
    _fails(tmp_path, "overwrite the input", flux_file, flux_file, format="nf4")
    link = tmp_path / "link.safetensors"
    os.symlink(flux_file, link)
    _fails(tmp_path, "overwrite the input", flux_file, str(link), format="nf4")
    os.unlink(link)
    if os.path.isdir("/proc/self"):  # not writable even for root
        with pytest.raises(ConvertError, match="cannot"):
            convert_file(flux_file, "/proc/self/o.safetensors", format="nf4", min_params=0)


def test_interrupt_leaves_no_output(flux_file, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = Converter.convert

    def flaky(self, name, w):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, name, w)

    monkeypatch.setattr(Converter, "convert", flaky)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"an older output")  # an existing output survives an interrupted run
    with pytest.raises(KeyboardInterrupt):
        convert_file(flux_file, str(out), format="nf4", min_params=0)
    assert listing(tmp_path) == ["o.safetensors"] and out.read_bytes() == b"an older output"
    assert calls["n"] == 3


def test_input_never_modified(flux_file, tmp_path):
    before = open(flux_file, "rb").read()
    convert_file(flux_file, str(tmp_path / "o.safetensors"), format="fp4", min_params=0, include="img_in",
                 exclude="blocks", rounding="mse")
    assert open(flux_file, "rb").read() == before


# ----------------------------------------------------------------------------- inspect
def test_inspect_our_output(flux_file, tmp_path):
    out = str(tmp_path / "o.safetensors")
    s = convert_file(flux_file, out, format="nf4", min_params=0)
    r = inspect_file(out, deep=True)
    assert r.architecture == "flux" and r.problems == []
    assert r.sources == {"comfy-quant-native": s.quantized}
    rows = r.by_format()
    assert rows["bnb_nf4"]["layers"] == s.quantized
    assert 4.5 <= rows["bnb_nf4"]["bits_per_weight"] < 4.6  # 4 bits + a float32 per 64 (+ JSON)
    assert rows["bfloat16"]["bits_per_weight"] == 16
    text = r.format_text()
    assert "comfy-quant-native" in text and "inconsistencies: none" in text
    plain = inspect_file(flux_file)
    assert plain.source_summary().startswith("plain") and plain.form == "plain"


def test_inspect_other_forms_and_inconsistencies(tmp_path):
    n = 64 * 128
    ctq_json = torch.tensor(list(b'{"format": "bnb_nf4", "group_size": 64, "orig_shape": [64, 128]}'),
                            dtype=torch.uint8)
    fp8_json = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    sd = {
        "ctq.weight": torch.zeros(n // 2, dtype=torch.uint8), "ctq.absmax": torch.ones(n // 64),
        "ctq.comfy_quant": ctq_json,
        "bad.weight": torch.zeros(n // 2, dtype=torch.uint8), "bad.absmax": torch.ones(7),
        "bad.comfy_quant": ctq_json.clone(),
        "stock.weight": torch.zeros(64, 128).to(torch.float8_e4m3fn), "stock.weight_scale": torch.ones(()),
        "stock.comfy_quant": fp8_json,
        "orphan.absmax": torch.ones(3),
        "plain.weight": torch.randn(64, 128).half(),
    }
    p = str(tmp_path / "mixed.safetensors")
    save_file(sd, p)
    r = inspect_file(p)
    assert r.sources["convert_to_quant"] == 2 and r.sources["stock ComfyUI"] == 1
    assert any("bad: absmax has shape [7]" in x for x in r.problems)
    assert any("orphan.absmax" in x for x in r.problems)
    assert r.by_format()["float16"]["layers"] == 1


def test_package_level_api_example(flux_file, tmp_path):
    """docs/CONVERTER.md's Python example."""
    import comfy_quant_native as cqn

    summary = cqn.convert_file(flux_file, str(tmp_path / "o.safetensors"), format="nf4", min_params=0)
    assert summary.quantized > 0 and summary.bytes_out < summary.bytes_in and "wrote" in str(summary)
    w = torch.randn(256, 384)
    conv = cqn.Converter("int8_blockwise", group_size=128)
    tensors = conv.convert("double_blocks.0.img_attn.qkv", w)
    assert set(tensors) == {f"double_blocks.0.img_attn.qkv.{s}" for s in ("weight", "weight_scale", "comfy_quant")}
    assert tensors["double_blocks.0.img_attn.qkv.weight_scale"].shape == (2, 3)
    assert json_of(tensors["double_blocks.0.img_attn.qkv.comfy_quant"])["format"] == "int8_blockwise"
    assert cqn.inspect_file(str(tmp_path / "o.safetensors")).architecture == "flux"


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8_blockwise", "int8_lodewise",
                                 "int8_tensorwise", "float8_e4m3fn"])
def test_cuda_converter_matches_cpu(fmt):
    w = torch.randn(768, 1536).bfloat16()
    a, b = Converter(fmt).convert("l", w), Converter(fmt, device="cuda").convert("l", w)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k
