"""The ComfyUI glue that needs only comfy-kitchen (pip): our layouts as QuantizedTensor
layouts, the layer presets and the safetensors header check.
These run in CI; tests/test_comfyui_*.py need a ComfyUI checkout."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("comfy_kitchen")

from comfy_kitchen.tensor import QuantizedTensor, get_layout_class  # noqa: E402

from comfy_quant_native import QuantizedWeight, ops  # noqa: E402
from comfy_quant_native.comfy import presets, qtensor  # noqa: E402
from comfy_quant_native.formats import read_safetensors_header  # noqa: E402
from comfy_quant_native.formats import FormatError  # noqa: E402

LAYOUTS = ("nf4", "fp4", "int8_block", "int8_lode", "int8_row")
# Awkward shapes: odd sizes, partial groups and tiles, one row.
SHAPES = ((1, 64), (7, 65), (63, 129), (130, 257))


def _weight(shape, dtype=torch.bfloat16):
    return (torch.randn(*shape) / shape[1] ** 0.5).to(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_tensor_matches_quantized_weight(layout, shape):
    w = _weight(shape)
    qt = qtensor.quantize(w, layout)
    qw = QuantizedWeight.from_float(w, layout)
    assert isinstance(qt, QuantizedTensor) and qtensor.layout_of(qt) == layout
    assert tuple(qt.shape) == shape and qt.dtype == torch.bfloat16
    assert torch.equal(qt._qdata, qw.data) and torch.equal(qt._params.scale, qw.scale)
    assert torch.equal(qt.dequantize(), qw.dequantize(torch.bfloat16))
    back = qtensor.to_quantized_weight(qt)
    assert back.params == qw.params and torch.equal(back.data, qw.data)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 9)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_dispatch_is_the_native_linear(layout, lead, with_bias):
    """F.linear on our tensor (aten.linear, or t + mm/addmm) gives exactly what the native
    linear gives: the quantized path runs, not a dequantized fallback."""
    N, K = 70, 192
    w = _weight((N, K))
    qt = qtensor.quantize(w, layout)
    x = torch.randn(*lead, K, dtype=torch.bfloat16)
    b = torch.randn(N, dtype=torch.bfloat16) if with_bias else None
    expected = QuantizedWeight.from_float(w, layout).linear(x, b)
    assert torch.equal(qtensor.native_linear(qt, x, b), expected)
    assert torch.equal(F.linear(x, qt, b), expected)


def test_int8_activation_quantization_is_per_weight_option():
    w = _weight((64, 256))
    x = torch.randn(9, 256)
    w8a8 = qtensor.quantize(w.float(), "int8_lode", w8a8=True)
    wonly = qtensor.quantize(w.float(), "int8_lode", w8a8=False)
    qw = QuantizedWeight.from_float(w.float(), "int8_lode")
    assert torch.equal(F.linear(x, w8a8), qw.linear(x, None, act_quant=True))
    assert torch.equal(F.linear(x, wonly), qw.linear(x, None, act_quant=False))
    assert not torch.equal(F.linear(x, w8a8), F.linear(x, wonly))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensor_ops_keep_the_layout(layout):
    w = _weight((40, 128))
    qt = qtensor.quantize(w, layout)
    f32 = qt.to(torch.float32)  # compute dtype only; the data stays quantized
    assert f32.dtype == torch.float32 and torch.equal(f32._qdata, qt._qdata)
    assert f32._params.source_dtype == torch.bfloat16
    assert torch.equal(f32.dequantize(), QuantizedWeight.from_float(w, layout).dequantize(torch.float32))
    assert qt.to("cpu") is qt
    for copy in (qt.clone(), qt.detach()):
        assert qtensor.layout_of(copy) == layout and torch.equal(copy.dequantize(), qt.dequantize())
    empty = torch.empty_like(qt)
    empty.copy_(qt)
    assert torch.equal(empty._qdata, qt._qdata) and torch.equal(empty._params.scale, qt._params.scale)
    meta = qt.to("meta")  # any device move carries the scales with the data
    assert meta._qdata.device.type == "meta" and meta._params.scale.device.type == "meta"
    inner, ctx = qt.__tensor_flatten__()
    again = QuantizedTensor.__tensor_unflatten__({a: getattr(qt, a) for a in inner}, ctx, None, None)
    assert torch.equal(again.dequantize(), qt.dequantize())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_requantize_keeps_group_and_options(layout):
    """ComfyUI's set_weight requantizes a patched weight with scale='recalculate' and a
    stochastic-rounding seed: our layouts keep their group size and options."""
    w = _weight((64, 256), torch.float32)
    group = None if layout == "int8_row" else 32 * (2 if layout in ("nf4", "fp4") else 1)
    qt = qtensor.quantize(w, layout, group, w8a8=False)
    re = qt.requantize_from_float(w, scale="recalculate", stochastic_rounding=1234, inplace_ops=True)
    same = ("group_size", "source_dtype", "w8a8", "orig_shape", "orig_dtype")
    assert all(getattr(re._params, f) == getattr(qt._params, f) for f in same)
    assert torch.equal(re._qdata, qt._qdata)  # always round to nearest: same codes
    assert torch.equal(re._params.scale, qt._params.scale)


def test_layouts_registered_with_comfy_kitchen():
    for layout, cls in qtensor.LAYOUT_CLASSES.items():
        assert get_layout_class(qtensor.LAYOUT_NAME[layout]) is cls
        assert cls.LAYOUT == layout


def _aot_graph_ops(fn, *args):
    """Compile ``fn`` with fullgraph=True (a graph break raises) and return the aten/custom
    ops of the graph AOTAutograd hands to the backend, and the compiled output."""
    from torch._dynamo.backends.common import aot_autograd

    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=record), fullgraph=True)
    return seen, compiled(*args)


@pytest.mark.parametrize("layout", ["nf4", "int8_block"])
def test_compile_traces_custom_ops_without_graph_break(layout):
    w = _weight((96, 256))
    qt = qtensor.quantize(w, layout)
    x = torch.randn(2, 5, 256, dtype=torch.bfloat16)
    b = torch.randn(96, dtype=torch.bfloat16)
    ops_seen, out = _aot_graph_ops(lambda x, w, b: F.linear(x, w, b) * 2, x, qt, b)
    op = "comfy_quant.linear_4bit" if layout == "nf4" else "comfy_quant.linear_int8"
    assert any(op in s for s in ops_seen), ops_seen
    assert not any("dequantize" in s for s in ops_seen), ops_seen
    assert torch.equal(out, qtensor.native_linear(qt, x, b) * 2)


@pytest.mark.parametrize("layout", ["nf4", "int8_row"])
def test_compile_traces_large_m_as_dequantize_and_gemm(layout):
    """Above the fused kernel's token range the compiled graph holds our dequantize op and
    a plain GEMM (so the compiler owns the GEMM and its epilogue), with the eager result."""
    w = _weight((96, 256))
    x = torch.randn(3, 200, 256, dtype=torch.bfloat16)  # 600 tokens: above every threshold
    b = torch.randn(96, dtype=torch.bfloat16)
    if layout == "nf4":
        packed, absmax = ops.quantize_4bit(w, "nf4", 64)
        fn = lambda x, b: ops.linear_4bit(x, packed, absmax, "nf4", 64, (96, 256), b) * 2  # noqa: E731
        eager = ops.linear_4bit(x, packed, absmax, "nf4", 64, (96, 256), b) * 2
        op = "comfy_quant.dequantize_4bit"
    else:
        q, s = ops.quantize_int8(w, layout, None)
        fn = lambda x, b: ops.linear_int8(x, q, s, layout, None, b, act_quant=False) * 2  # noqa: E731
        eager = ops.linear_int8(x, q, s, layout, None, b, act_quant=False) * 2
        op = "comfy_quant.dequantize_int8"
    assert math.prod(x.shape[:-1]) > ops.fused_max_m(layout, "cpu", x.dtype)
    ops_seen, out = _aot_graph_ops(fn, x, b)
    assert any(op in t for t in ops_seen), ops_seen
    assert not any("comfy_quant.linear" in t for t in ops_seen), ops_seen
    assert any(t.startswith("aten.mm") or t.startswith("aten.addmm") for t in ops_seen), ops_seen
    assert torch.equal(out, eager)


# ----------------------------------------------------------------------------- presets
def _flux_names(depth=2, single=2):
    names = ["img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    names += [f"{e}.{p}" for e in ("time_in", "vector_in", "guidance_in") for p in ("in_layer", "out_layer")]
    for i in range(depth):
        for s in ("img", "txt"):
            names += [f"double_blocks.{i}.{s}_attn.norm.key_norm", f"double_blocks.{i}.{s}_mod.lin",
                      f"double_blocks.{i}.{s}_attn.qkv",
                      f"double_blocks.{i}.{s}_attn.proj", f"double_blocks.{i}.{s}_mlp.0", f"double_blocks.{i}.{s}_mlp.2"]
    for i in range(single):
        names += [f"single_blocks.{i}.linear1", f"single_blocks.{i}.linear2", f"single_blocks.{i}.modulation.lin"]
    return names


def test_flux_preset_keeps_embedders_and_final_layer_and_modulation_on_request():
    names = _flux_names()
    linears = [n for n in names if not n.endswith("key_norm")]
    sel = presets.LayerSelector(names, "nf4", min_params=0)
    assert sel.detected == "flux" and sel.architecture == "flux"
    quantized = {n for n in linears if sel.decide(n, (3072, 3072)).quantize}
    blocks = {n for n in linears if any(s in n for s in ("_attn.", "_mlp.", "linear1", "linear2"))}
    modulation = {n for n in linears if n.endswith(("_mod.lin", "modulation.lin"))}
    assert quantized == blocks | modulation  # shared presets: modulation is quantized by default
    keep = presets.LayerSelector(names, "nf4", min_params=0, keep_modulation=True)
    assert {n for n in linears if keep.decide(n, (3072, 3072)).quantize} == blocks
    assert "modulation" in keep.decide("single_blocks.0.modulation.lin", (3072, 3072)).reason
    assert "small" in presets.LayerSelector(names, "nf4").decide("double_blocks.0.img_attn.proj", (128, 128)).reason


def test_selection_order_exclude_include_preset_size_shape():
    names = _flux_names()
    sel = presets.LayerSelector(names, "int8_block", exclude=r"img_mlp", include=r"img_in|mlp", min_params=10**6)
    assert not sel.decide("double_blocks.0.img_mlp.0", (4096, 4096)).quantize  # exclude first
    assert sel.decide("img_in", (3072, 64)).quantize  # include beats the preset and the size
    assert sel.decide("double_blocks.0.txt_mlp.2", (3, 5)).quantize  # and the shape rule
    assert not sel.decide("double_blocks.0.txt_attn.qkv", (100, 100)).quantize  # small
    assert "not a multiple of group size" in sel.decide("double_blocks.0.txt_attn.qkv", (9216, 3000)).reason
    assert "block size" in sel.decide("double_blocks.0.txt_attn.qkv", (9000, 3072)).reason
    assert not presets.LayerSelector(names, "nf4", preset="none", min_params=0).decide("img_in", (64, 64)).reason


def test_architectures_detected_from_layer_names():
    assert presets.detect_architecture(_flux_names()) == "flux"
    chroma = [n for n in _flux_names() if "_mod" not in n] + ["distilled_guidance_layer.in_proj"]
    assert presets.detect_architecture(chroma) == "chroma"
    assert presets.detect_architecture(["blocks.0.self_attn.q", "blocks.0.ffn.0", "head"]) == "wan"
    assert presets.detect_architecture(["transformer_blocks.0.img_mod.1",
                                        "transformer_blocks.0.attn.add_q_proj"]) == "qwen_image"
    assert presets.detect_architecture(["foo.bar"]) is None
    assert presets.LayerSelector(["foo.bar"], "nf4").architecture == "generic"


def test_bad_selector_arguments_raise():
    with pytest.raises(ValueError, match="include"):
        presets.LayerSelector(["a"], "nf4", include="(")
    with pytest.raises(ValueError, match="preset"):
        presets.LayerSelector(["a"], "nf4", preset="sdxl")
    with pytest.raises(ValueError, match="group_size"):
        presets.LayerSelector(["a"], "nf4", group_size=48)


# ----------------------------------------------------------------------------- files
def _write_raw(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_header_checks(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.ones(4, 8), "b": torch.zeros(3, dtype=torch.uint8)}, str(good), {"k": "v"})
    header, meta, _ = read_safetensors_header(str(good))
    assert set(header) == {"a.weight", "b"} and meta == {"k": "v"}

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(FormatError, match=r"truncated\.safetensors.*(a\.weight|'b').*truncated"):
        read_safetensors_header(str(truncated))

    text = tmp_path / "notes.safetensors"
    text.write_text("this is a text file, not a model\n" * 3)
    with pytest.raises(FormatError, match=r"notes\.safetensors.*not a safetensors file"):
        read_safetensors_header(str(text))

    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(FormatError, match="too short for the 8-byte"):
        read_safetensors_header(str(tiny))

    wrong = tmp_path / "wrong.safetensors"
    _write_raw(wrong, {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, bytes(32))
    with pytest.raises(FormatError, match=r"tensor 'w': F32 \[4, 4\] needs 64 bytes, the header gives 32"):
        read_safetensors_header(str(wrong))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("M", [1, 3, 40])
@pytest.mark.parametrize("w8a8", [True, False])
def test_linear_with_lora_delta(layout, M, w8a8):
    """native_linear_lora = x (W + up down)^T + b: fused into the dequantized weight where the
    native path dequantizes anyway, beside it otherwise."""
    N, K, R = 96, 256, 12
    w = _weight((N, K), torch.float32)
    qt = qtensor.quantize(w, layout, w8a8=w8a8)
    x = torch.randn(M, K)
    b = torch.randn(N)
    down, up = torch.randn(R, K) / 16, torch.randn(N, R) / 4
    got = qtensor.native_linear_lora(qt, x, b, down, up)
    side = qtensor.native_linear(qt, x, b) + x @ down.t() @ up.t()
    assert torch.allclose(got, side, rtol=1e-4, atol=1e-4), (got - side).abs().max()
