"""Files in the wild: convert_to_quant's December-2025 outputs (built here the way that tool
writes them: low-nibble packing, its JSON spellings and key names) and the formats stock
ComfyUI loads itself (detected, passed through, never parsed)."""

from __future__ import annotations

import json

import pytest
import torch
from formats_util import (CountingMapping, assert_same_layer, expect_error, json_bytes, make_qw,
                          pack_lo, unpack_hi)

from comfy_quant_native import QuantizedWeight
from comfy_quant_native import formats as F
from comfy_quant_native import layouts as L

# convert_to_quant's own tables, as it builds them (float32; FP4 normalized by its max).
CTQ_NF4 = L.codebook_table("nf4")
CTQ_FP4 = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                        -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]) / 12.0


def ctq_4bit_layer(prefix: str, qw: QuantizedWeight, comfy_quant: bool = True, input_scale: bool = False,
                   extra: dict | None = None) -> dict:
    """One 4-bit layer as convert_to_quant wrote it on 2025-12-21 (--comfy_quant or legacy)."""
    p = qw.params
    codes = unpack_hi(qw.data, p.numel)
    fmt_type = p.layout
    qmap = CTQ_NF4 if fmt_type == "nf4" else CTQ_FP4
    dtype = str(p.orig_dtype).replace("torch.", "")
    out = {f"{prefix}.weight": pack_lo(codes), f"{prefix}.absmax": qw.scale.clone()}
    if comfy_quant:
        cfg = {"format": f"bnb_{fmt_type}", "group_size": p.group_size, "quant_type": fmt_type,
               "dtype": dtype, "shape": list(p.shape), "quant_map": qmap.tolist(), **(extra or {})}
        out[f"{prefix}.comfy_quant"] = json_bytes(cfg)  # json.dumps defaults, as the tool
        if input_scale:
            out[f"{prefix}.input_scale"] = torch.tensor([1.0])
    else:
        out[f"{prefix}.quant_map"] = qmap.clone()
        qs = {"quant_type": fmt_type, "blocksize": p.group_size, "dtype": dtype, "shape": list(p.shape)}
        out[f"{prefix}.quant_state.bitsandbytes__{fmt_type}"] = json_bytes(qs)
    return out


def ctq_int8_layer(prefix: str, qw: QuantizedWeight, comfy_quant: bool = True, scale_shape=None,
                   cfg: dict | None = None) -> dict:
    scale = qw.scale if scale_shape is None else qw.scale.reshape(scale_shape)
    if not comfy_quant:
        return {f"{prefix}.weight": qw.data, f"{prefix}.scale_weight": scale}
    if cfg is None:
        cfg = {"format": L.DISK_NAME[qw.layout]}
        if qw.layout != "int8_row":
            cfg["group_size"] = qw.params.group_size
    return {f"{prefix}.weight": qw.data, f"{prefix}.weight_scale": scale, f"{prefix}.comfy_quant": json_bytes(cfg)}


@pytest.mark.parametrize("layout", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,group", [((33, 67), 64), ((1, 7), 32), ((128, 64), 128), ((5, 3, 9), 64)])
@pytest.mark.parametrize("comfy_quant", [True, False])
def test_convert_to_quant_4bit(layout, shape, group, comfy_quant):
    qw = make_qw(layout, shape, group)
    sd = ctq_4bit_layer("diffusion_model.blocks.3.mlp.fc1", qw, comfy_quant, input_scale=True)
    sd["diffusion_model.blocks.3.mlp.fc1.bias"] = torch.randn(shape[0])
    assert F.probe(sd).form == "convert_to_quant"
    got = F.load_state_dict(sd)
    assert got.form == "convert_to_quant"
    # low-nibble bytes come back as our canonical high-nibble bytes, pad nibble included
    assert_same_layer(got.layers["diffusion_model.blocks.3.mlp.fc1"], qw)
    assert list(got.tensors) == ["diffusion_model.blocks.3.mlp.fc1.bias"]


def test_convert_to_quant_json_flags_and_params_bug():
    qw = make_qw("nf4", (9, 10), 32)
    sd = ctq_4bit_layer("L", qw, extra={"full_precision_matrix_mult": True})
    got = F.load_state_dict(sd)
    assert got.configs["L"]["full_precision_matrix_mult"] is True
    assert got.configs["L"]["nibble_order"] == "hi"  # configs describe what we hold now
    q8 = make_qw("int8_block", (64, 96), 32)
    sd = ctq_int8_layer("M", q8, cfg={"format": "int8_blockwise", "params": {"group_size": 32}})
    assert_same_layer(F.load_state_dict(sd).layers["M"], q8)


@pytest.mark.parametrize("layout,group", [("int8_block", 32), ("int8_block", 128), ("int8_lode", 64)])
@pytest.mark.parametrize("comfy_quant", [True, False])
def test_convert_to_quant_int8(layout, group, comfy_quant):
    qw = make_qw(layout, (256, 384), group)  # the tool needs dims divisible by the block
    sd = ctq_int8_layer("blocks.0.qkv", qw, comfy_quant)
    if not comfy_quant:
        sd["blocks.0.qkv.scale_input"] = torch.ones(1)
        assert F.detect_form(sd) == "convert_to_quant"
    got = F.load_state_dict(sd)
    assert got.form == ("comfy_quant" if comfy_quant else "convert_to_quant")
    got_qw = got.layers["blocks.0.qkv"]
    assert got_qw.layout == layout and got_qw.params.group_size == group
    assert_same_layer(got_qw, QuantizedWeight(got_qw.params, qw.data, qw.scale))
    assert not got.tensors


@pytest.mark.parametrize("scale_shape", [(), (1,), (256,), (256, 1)])
def test_int8_tensorwise_scale_shapes(scale_shape):
    q = make_qw("int8_row", (256, 96))
    if scale_shape in ((), (1,)):  # one scale for the whole tensor (later convert_to_quant)
        scale = torch.full(scale_shape, 0.0123)
        q = QuantizedWeight(q.params, q.data, torch.full((256,), 0.0123))
    else:
        scale = q.scale.reshape(scale_shape)
    sd = {"L.weight": q.data, "L.weight_scale": scale, "L.comfy_quant": json_bytes({"format": "int8_tensorwise"})}
    assert_same_layer(F.load_state_dict(sd).layers["L"], q)
    legacy = {"L.weight": q.data, "L.scale_weight": scale}
    assert_same_layer(F.load_state_dict(legacy).layers["L"], q)


def test_16bit_int8_scales_widen_exactly():
    q = make_qw("int8_lode", (64, 96), 32)
    half = q.scale.to(torch.bfloat16)
    sd = ctq_int8_layer("L", QuantizedWeight(q.params, q.data, q.scale), scale_shape=None)
    sd["L.weight_scale"] = half
    assert torch.equal(F.load_state_dict(sd).layers["L"].scale, half.float())


def test_convert_to_quant_header_plus_tensors():
    layers = {"a": make_qw("int8_block", (64, 64), 32), "b": make_qw("nf4", (9, 10), 32)}
    sd = {**ctq_int8_layer("a", layers["a"]), **ctq_4bit_layer("b", layers["b"])}
    header = {k: json.loads(bytes(sd[f"{k}.comfy_quant"].tolist())) for k in layers}
    meta = {F.HEADER_KEY: json.dumps({"format_version": "1.0", "layers": header})}
    got = F.load_state_dict(sd, meta)
    assert got.form == "quantization_metadata"
    for k, qw in layers.items():
        assert_same_layer(got.layers[k], qw)


BAD = [
    (lambda: ctq_4bit_layer("L", make_qw("nf4", (9, 10), 32), extra={"format": "bnb_af4", "quant_type": "af4"}),
     "bnb_af4"),
    (lambda: {**ctq_4bit_layer("L", make_qw("nf4", (9, 10), 32)),
              "L.comfy_quant": json_bytes({"format": "bnb_nf4", "group_size": 32})}, "no orig_shape"),
    (lambda: ctq_4bit_layer("L", make_qw("nf4", (9, 10), 32), extra={"quant_type": "fp4"}), "contradicts"),
    (lambda: ctq_4bit_layer("L", make_qw("nf4", (9, 10), 32), extra={"quant_map": [0.0] * 16}), "not the nf4"),
    (lambda: ctq_4bit_layer("L", make_qw("nf4", (9, 10), 32), extra={"quant_map": "nf4"}), "16 numbers"),
    (lambda: {**ctq_4bit_layer("L", make_qw("fp4", (9, 10), 32), comfy_quant=False),
              "L.quant_map": CTQ_NF4}, "not the fp4 table"),
    (lambda: {"L.weight": torch.zeros(64, 96, dtype=torch.int8), "L.scale_weight": torch.ones(3, 5)},
     "fits no int8 layout"),
    (lambda: {"L.weight": torch.zeros(64, 96, dtype=torch.float8_e4m3fn), "L.scale_weight": torch.ones(())},
     "no scaled_fp8 marker"),
    (lambda: {"L.weight": torch.zeros(64, 96, dtype=torch.float16), "L.scale_weight": torch.ones(())},
     "expected dtype int8"),
    (lambda: {"L.weight": torch.zeros(64, 96, dtype=torch.int8), "L.scale_weight": torch.ones(64, 6)},
     "power of two"),
]


@pytest.mark.parametrize("make,fragment", BAD, ids=range(len(BAD)))
def test_bad_convert_to_quant_input(make, fragment):
    sd = make()
    expect_error(lambda: F.load_state_dict(sd, source="ctq.safetensors"), fragment, layer="L",
                 source="ctq.safetensors")


# ----------------------------------------------------------------------------- ComfyUI-native
def fp8_layer(prefix):
    return {f"{prefix}.weight": torch.randn(16, 32).to(torch.float8_e4m3fn),
            f"{prefix}.weight_scale": torch.tensor(0.01),
            f"{prefix}.input_scale": torch.tensor(1.0),
            f"{prefix}.comfy_quant": json_bytes({"format": "float8_e4m3fn"})}


def nvfp4_layer(prefix):
    return {f"{prefix}.weight": torch.zeros(16, 16, dtype=torch.uint8),
            f"{prefix}.weight_scale": torch.zeros(128, 4).to(torch.float8_e4m3fn),
            f"{prefix}.weight_scale_2": torch.tensor(1.0),
            f"{prefix}.comfy_quant": json_bytes({"format": "nvfp4", "group_size": 16})}


def mxfp8_layer(prefix):
    return {f"{prefix}.weight": torch.zeros(32, 32).to(torch.float8_e4m3fn),
            f"{prefix}.weight_scale": torch.zeros(128, 4, dtype=torch.uint8),
            f"{prefix}.comfy_quant": json_bytes({"format": "mxfp8"})}


def convrot_layer(prefix):
    return {f"{prefix}.weight": torch.zeros(16, 256, dtype=torch.int8),
            f"{prefix}.weight_scale": torch.ones(16),
            f"{prefix}.comfy_quant": json_bytes({"format": "int8_tensorwise", "convrot": True,
                                                 "convrot_groupsize": 256})}


def convrot_params_layer(prefix):
    sd = convrot_layer(prefix)
    sd[f"{prefix}.comfy_quant"] = json_bytes({"format": "int8_tensorwise", "params": {"convrot": True}})
    return sd


@pytest.mark.parametrize("make", [fp8_layer, nvfp4_layer, mxfp8_layer, convrot_layer, convrot_params_layer])
def test_comfyui_native_layers_are_passed_through(make):
    sd = {**make("blocks.0.a"), **make("blocks.0.b"), "final.weight": torch.randn(3)}
    assert F.detect_form(sd) == "comfy_quant"  # keys alone cannot tell; the JSON can
    assert F.probe(sd).form == "comfyui_native"
    counting = CountingMapping(sd)
    got = F.load_state_dict(counting)
    assert got.form == "comfyui_native" and not got.layers
    assert set(got.native) == {"blocks.0.a", "blocks.0.b"}
    assert set(got.tensors) == set(sd) and all(got.tensors[k] is sd[k] for k in sd)
    assert set(counting.reads.values()) == {1}


def test_scaled_fp8_marker_file():
    sd = {"model.diffusion_model.scaled_fp8": torch.empty(2, dtype=torch.float8_e4m3fn),
          "model.diffusion_model.x.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn),
          "model.diffusion_model.x.scale_weight": torch.tensor(1.0)}
    assert F.detect_form(sd) == "comfyui_native"
    got = F.load_state_dict(sd)
    assert got.form == "comfyui_native" and not got.layers and set(got.tensors) == set(sd)


def test_native_header_file_gets_comfy_quant_tensors():
    sd = {k: v for k, v in nvfp4_layer("x").items() if not k.endswith(".comfy_quant")}
    meta = F.header_metadata({"x": {"format": "nvfp4", "group_size": 16}})
    assert F.detect_form(sd, meta) == "comfyui_native"
    got = F.load_state_dict(sd, meta)
    assert got.form == "comfyui_native"
    assert json.loads(bytes(got.tensors["x.comfy_quant"].tolist())) == {"format": "nvfp4", "group_size": 16}


def test_mixed_ours_and_native():
    """convert_to_quant's fallback: our int8 layers beside fp8 layers ComfyUI runs."""
    q = make_qw("int8_block", (64, 64), 32)
    n4 = make_qw("nf4", (9, 10), 32)
    sd = {**F.layer_tensors("blocks.0.attn", q), **fp8_layer("blocks.0.norm_proj"),
          **ctq_4bit_layer("blocks.1.mlp", n4), "blocks.0.attn.bias": torch.zeros(64)}
    got = F.load_state_dict(sd)
    assert got.form == "convert_to_quant"
    assert_same_layer(got.layers["blocks.0.attn"], q)
    assert_same_layer(got.layers["blocks.1.mlp"], n4)
    assert set(got.native) == {"blocks.0.norm_proj"}
    assert set(got.tensors) == {"blocks.0.attn.bias"} | set(fp8_layer("blocks.0.norm_proj"))
    assert got.counts == {"int8_block": 1, "nf4": 1, "comfyui:float8_e4m3fn": 1}
    probe = F.probe(sd)
    assert probe.form == "convert_to_quant"
    assert probe.formats == {"int8_blockwise": 1, "float8_e4m3fn": 1, "bnb_nf4": 1}


def test_layer_in_two_forms_is_refused():
    qw = make_qw("nf4", (9, 10), 32)
    sd = {**F.layer_tensors("L", qw), **{k: v for k, v in F.bnb_layer_tensors("L", qw).items()
                                         if k != "L.weight"}}
    expect_error(lambda: F.load_state_dict(sd), "two ways", layer="L")


def test_wild_forms_read_each_tensor_once():
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(67, 33, bias=True, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(33, 67), requires_grad=False, compress_statistics=True,
                                   quant_type="nf4")._quantize("cpu")
    q8 = make_qw("int8_lode", (64, 96), 32)
    sd = {**{f"bnb.{k}": v for k, v in lin.state_dict().items()},
          **ctq_4bit_layer("ctq", make_qw("fp4", (9, 10), 32), comfy_quant=False),
          **ctq_int8_layer("legacy", q8, comfy_quant=False), **fp8_layer("native"),
          **ctq_4bit_layer("ctqjson", make_qw("nf4", (9, 10), 32), input_scale=True)}
    counting = CountingMapping(sd)
    got = F.load_state_dict(counting)
    assert set(got.layers) == {"bnb", "ctq", "legacy", "ctqjson"} and set(got.native) == {"native"}
    assert set(counting.reads) == set(sd) and set(counting.reads.values()) == {1}
