"""Our on-disk form (per-layer comfy_quant JSON), the _quantization_metadata header form,
detection, validation of bad input, and safetensors files in and out."""

from __future__ import annotations

import errno
import json
import os

import pytest
import safetensors.torch
import torch
from formats_util import (CountingMapping, assert_same_layer, edited, expect_error, json_bytes, make_qw,
                          raw_bytes)

from comfy_quant_native import formats as F
from comfy_quant_native.formats import FormatError

# (layout, shape, group): odd element counts, partial groups, one row, 3-D 4-bit weights
CASES = [
    ("nf4", (1, 7), 64),
    ("nf4", (7, 63), 32),
    ("nf4", (33, 67), 64),
    ("nf4", (2, 3, 65), 128),
    ("fp4", (1, 7), 64),
    ("fp4", (33, 67), 32),
    ("fp4", (65, 33), 256),
    ("int8_block", (1, 7), 32),
    ("int8_block", (33, 67), 32),
    ("int8_block", (130, 257), 128),
    ("int8_lode", (1, 7), 32),
    ("int8_lode", (33, 67), 64),
    ("int8_row", (1, 7), None),
    ("int8_row", (33, 67), None),
]


@pytest.mark.parametrize("layout,shape,group", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_every_layout(layout, shape, group, dtype):
    qw = make_qw(layout, shape, group, dtype=dtype)
    sd = F.layer_tensors("blocks.0.attn.qkv", qw)
    sd["blocks.0.attn.qkv.bias"] = torch.randn(shape[0])
    got = F.load_state_dict(sd)
    assert got.form == "comfy_quant"
    assert list(got.layers) == ["blocks.0.attn.qkv"]
    assert_same_layer(got.layers["blocks.0.attn.qkv"], qw)
    assert list(got.tensors) == ["blocks.0.attn.qkv.bias"]
    assert got.counts == {layout: 1}
    assert got.configs["blocks.0.attn.qkv"] == F.layer_json(qw)


@pytest.mark.parametrize("layout", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,group", [((33, 67), 64), ((65, 300), 64), ((3, 5), 32)])
def test_round_trip_double_quant(layout, shape, group):
    qw = make_qw(layout, shape, group, double_quant=True)
    sd = F.layer_tensors("L", qw)
    assert sd["L.absmax"].dtype == torch.uint8
    assert set(sd) == {"L.weight", "L.comfy_quant", "L.absmax", "L.nested_absmax", "L.nested_quant_map",
                       "L.nested_offset"}
    got = F.load_state_dict(sd)
    assert_same_layer(got.layers["L"], qw)
    assert json.loads(bytes(sd["L.comfy_quant"].tolist()))["double_quant"] is True


def test_layer_json_fields():
    j = F.layer_json(make_qw("nf4", (3, 5), 32, dtype=torch.float16))
    assert j == {"format": "bnb_nf4", "group_size": 32, "orig_shape": [3, 5], "orig_dtype": "float16",
                 "nibble_order": "hi"}
    assert F.layer_json(make_qw("int8_block", (3, 5), 64)) == {"format": "int8_blockwise", "group_size": 64,
                                                               "orig_dtype": "bfloat16"}
    assert F.layer_json(make_qw("int8_lode", (3, 5), 32))["format"] == "int8_lodewise"
    assert F.layer_json(make_qw("int8_row", (3, 5))) == {"format": "int8_tensorwise", "per_row": True,
                                                         "orig_dtype": "bfloat16"}


def _all_layouts():
    return {
        "double_blocks.0.img_attn.qkv": make_qw("nf4", (33, 67), 64),
        "double_blocks.0.img_mlp.0": make_qw("fp4", (7, 63), 32, double_quant=True),
        "double_blocks.0.txt_attn.proj": make_qw("int8_block", (33, 67), 32),
        "single_blocks.0.linear1": make_qw("int8_lode", (33, 67), 64),
        "single_blocks.0.linear2": make_qw("int8_row", (5, 9)),
    }


def test_header_form_round_trip(tmp_path):
    layers = _all_layouts()
    plain = {"img_in.weight": torch.randn(4, 4), "double_blocks.0.img_attn.qkv.bias": torch.randn(33)}
    sd, meta = F.emit_state_dict(layers, plain, form="quantization_metadata", metadata={"note": "x"})
    assert not any(k.endswith(".comfy_quant") for k in sd)
    header = json.loads(meta[F.HEADER_KEY])
    assert header["format_version"] == "1.0" and set(header["layers"]) == set(layers)
    assert meta["note"] == "x"
    assert F.detect_form(sd.keys(), meta) == "quantization_metadata"
    path = tmp_path / "m.safetensors"
    F.save_file(path, sd, meta)
    got = F.load_file(path)
    assert got.form == "quantization_metadata"
    for k, qw in layers.items():
        assert_same_layer(got.layers[k], qw)
    assert set(got.tensors) == set(plain)


def test_comfy_quant_form_file_round_trip(tmp_path):
    layers = _all_layouts()
    sd, meta = F.emit_state_dict(layers, {"final.weight": torch.randn(2, 2)})
    path = tmp_path / "m.safetensors"
    F.save_file(path, sd, meta)
    assert F.probe_file(path).form == "comfy_quant"
    got = F.load_file(path)
    assert got.form == "comfy_quant"
    for k, qw in layers.items():
        assert_same_layer(got.layers[k], qw)
    assert list(got.tensors) == ["final.weight"]
    assert got.summary() == "comfy_quant: 1 fp4, 1 int8_block, 1 int8_lode, 1 int8_row, 1 nf4, 1 other tensors"


def test_header_and_tensor_json_must_agree():
    qw = make_qw("int8_block", (33, 67), 32)
    sd = F.layer_tensors("L", qw)
    meta = F.layers_header({"L": qw})
    assert F.load_state_dict(sd, meta).form == "quantization_metadata"  # both, identical: fine
    other = F.header_metadata({"L": {"format": "int8_blockwise", "group_size": 64}})
    expect_error(lambda: F.load_state_dict(sd, other), "header says", layer="L")


def test_header_layer_names_without_model_prefix():
    qw = make_qw("nf4", (9, 10), 32)
    sd = F.layer_tensors("model.diffusion_model.blocks.1.proj", qw, with_json=False)
    meta = F.header_metadata({"blocks.1.proj": F.layer_json(qw)})
    got = F.load_state_dict(sd, meta)
    assert_same_layer(got.layers["model.diffusion_model.blocks.1.proj"], qw)
    expect_error(lambda: F.load_state_dict(sd, F.header_metadata({"blocks.9.proj": F.layer_json(qw)})),
                 "no blocks.9.proj.weight", layer="blocks.9.proj")


@pytest.mark.parametrize("raw,fragment", [
    ("{not json", "not JSON"),
    ('["a"]', "object"),
    ('{"layers": 3}', "object"),
    ('{"format_version": "2.0", "layers": {}}', "format_version"),
    ('{"layers": {"L": 5}}', "expected an object"),
])
def test_bad_header(raw, fragment):
    sd = F.layer_tensors("L", make_qw("int8_row", (3, 4)), with_json=False)
    expect_error(lambda: F.load_state_dict(sd, {F.HEADER_KEY: raw}, source="f.safetensors"), fragment,
                 source="f.safetensors")
    with pytest.raises(FormatError):
        F.detect_form(sd.keys(), {F.HEADER_KEY: raw})


def test_read_once_and_lazy_mapping():
    layers = _all_layouts()
    sd, meta = F.emit_state_dict(layers, {"x.weight": torch.randn(3)})
    counting = CountingMapping(sd)
    F.load_state_dict(counting, meta)
    assert set(counting.reads) == set(sd) and set(counting.reads.values()) == {1}
    sd, meta = F.emit_state_dict(layers, {"x.weight": torch.randn(3)}, form="quantization_metadata")
    counting = CountingMapping(sd)
    F.load_state_dict(counting, meta)
    assert set(counting.reads.values()) == {1}


def test_detection_from_keys_alone():
    nf4 = make_qw("nf4", (3, 4), 32)
    ours = F.layer_tensors("L", nf4)
    assert F.detect_form(ours) == "comfy_quant"
    assert F.detect_form(["a.weight", "a.bias"]) == "plain"
    assert F.detect_form(F.layer_tensors("L", nf4, with_json=False), F.layers_header({"L": nf4})) == \
        "quantization_metadata"
    assert F.detect_form(F.bnb_layer_tensors("L", nf4)) == "bnb"
    assert F.detect_form(["L.weight", "L.absmax", "L.quant_map", "L.quant_state.bitsandbytes__nf4"]) == \
        "convert_to_quant"
    assert F.detect_form(["L.weight", "L.scale_weight"]) == "convert_to_quant"
    assert F.detect_form(["L.weight", "L.scale_weight", "scaled_fp8"]) == "comfyui_native"
    assert F.detect_form(["L.weight", "L.scale_weight", "model.diffusion_model.scaled_fp8"]) == "comfyui_native"
    assert F.detect_form(["L.weight", "L.weight_scale"], F.header_metadata({"L": {"format": "nvfp4"}})) == \
        "comfyui_native"
    assert set(F.FORMS) >= {"comfy_quant", "quantization_metadata", "bnb", "convert_to_quant",
                            "comfyui_native", "plain"}


# ----------------------------------------------------------------------------- bad input
def _nf4_sd(double_quant=False):
    return F.layer_tensors("blk.fc", make_qw("nf4", (33, 67), 64, double_quant=double_quant))


def _int8_sd(layout="int8_block", group=32):
    return F.layer_tensors("blk.fc", make_qw(layout, (33, 67), group))


def _with_json(sd, **changes):
    cfg = json.loads(bytes(sd["blk.fc.comfy_quant"].tolist()))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return edited(sd, "blk.fc.comfy_quant", json_bytes(cfg))


BAD = [
    # missing tensors
    (lambda: edited(_nf4_sd(), "blk.fc.absmax", None), "missing tensor 'blk.fc.absmax'"),
    (lambda: edited(_nf4_sd(), "blk.fc.weight", None), "missing tensor 'blk.fc.weight'"),
    (lambda: edited(_int8_sd(), "blk.fc.weight_scale", None), "missing tensor 'blk.fc.weight_scale'"),
    (lambda: edited(_nf4_sd(True), "blk.fc.nested_quant_map", None), "missing blk.fc.nested_quant_map"),
    # wrong shapes: truncated packed data, absmax length vs orig_shape and group size
    (lambda: edited(_nf4_sd(), "blk.fc.weight", _nf4_sd()["blk.fc.weight"][:-1]), "expected 1106 elements"),
    (lambda: edited(_nf4_sd(), "blk.fc.absmax", torch.ones(34)), "expected 35 elements"),
    (lambda: _with_json(_nf4_sd(), group_size=32), "expected 70 elements"),
    (lambda: _with_json(_nf4_sd(), orig_shape=[33, 68]), "expected 1122 elements"),
    (lambda: edited(_nf4_sd(), "blk.fc.weight", _nf4_sd()["blk.fc.weight"].reshape(2, 553)), "1-D"),
    (lambda: edited(_nf4_sd(True), "blk.fc.nested_absmax", torch.ones(2)), "expected 1 elements"),
    (lambda: edited(_nf4_sd(True), "blk.fc.nested_offset", torch.ones(2)), "expected 1 elements"),
    # int8 scale shape vs layout
    (lambda: edited(_int8_sd(), "blk.fc.weight_scale", torch.ones(33, 3)), "expected shape [2, 3]"),
    (lambda: edited(_int8_sd("int8_lode"), "blk.fc.weight_scale", torch.ones(2, 3)), "expected shape [33, 3]"),
    (lambda: edited(_int8_sd("int8_row", None), "blk.fc.weight_scale", torch.ones(2)), "[N, 1]"),
    (lambda: _with_json(_int8_sd(), group_size=64), "expected shape [1, 2]"),
    (lambda: edited(_int8_sd(), "blk.fc.weight", torch.zeros(33, 97, dtype=torch.int8)), "expected shape [2, 4]"),
    (lambda: edited(_int8_sd(), "blk.fc.weight", torch.zeros(33 * 67, dtype=torch.int8)), "2-D"),
    # wrong dtypes
    (lambda: edited(_nf4_sd(), "blk.fc.absmax", _nf4_sd()["blk.fc.absmax"].half()), "dtype float32"),
    (lambda: edited(_nf4_sd(), "blk.fc.weight", _nf4_sd()["blk.fc.weight"].to(torch.int8)), "dtype uint8"),
    (lambda: edited(_int8_sd(), "blk.fc.weight", torch.zeros(33, 67, dtype=torch.uint8)), "dtype int8"),
    (lambda: edited(_int8_sd(), "blk.fc.weight_scale", torch.ones(2, 3, dtype=torch.int32)), "dtype float32"),
    (lambda: edited(_nf4_sd(True), "blk.fc.absmax", torch.ones(35)), "dtype uint8"),
    (lambda: edited(_nf4_sd(), "blk.fc.comfy_quant", _nf4_sd()["blk.fc.comfy_quant"].float()), "expected uint8"),
    # the JSON
    (lambda: _with_json(_nf4_sd(), format="bnb_nf5"), "unknown format 'bnb_nf5'"),
    (lambda: _with_json(_nf4_sd(), format=None), "unknown format None"),
    (lambda: edited(_nf4_sd(), "blk.fc.comfy_quant", raw_bytes(b'{"format": "bnb_nf4",')), "not UTF-8 JSON"),
    (lambda: edited(_nf4_sd(), "blk.fc.comfy_quant", raw_bytes(b"\xff\xfe")), "not UTF-8 JSON"),
    (lambda: edited(_nf4_sd(), "blk.fc.comfy_quant", raw_bytes(b"[1, 2]")), "JSON list"),
    (lambda: _with_json(_nf4_sd(), orig_shape=None), "no orig_shape"),
    (lambda: _with_json(_nf4_sd(), orig_shape=[33, -67]), "positive integers"),
    (lambda: _with_json(_nf4_sd(), orig_dtype="float8"), "orig_dtype must be"),
    (lambda: _with_json(_nf4_sd(), group_size=48), "power of two"),
    (lambda: _with_json(_nf4_sd(), group_size="64"), "must be an integer"),
    (lambda: _with_json(_nf4_sd(), nibble_order="mid"), "nibble_order"),
    (lambda: _with_json(_nf4_sd(), double_quant="yes"), "double_quant must be"),
    (lambda: _with_json(_nf4_sd(True), double_quant=None), "does not say double_quant"),
    (lambda: _with_json(_nf4_sd(), double_quant=True), "is missing blk.fc.nested_absmax"),
    (lambda: _with_json(_int8_sd("int8_row", None), per_row="1"), "per_row"),
    (lambda: edited(_int8_sd(), "blk.fc.absmax", torch.ones(3)), "also has blk.fc.absmax"),
]


@pytest.mark.parametrize("make,fragment", BAD, ids=range(len(BAD)))
def test_bad_input_names_source_layer_reason(make, fragment):
    sd = make()
    expect_error(lambda: F.load_state_dict(sd, source="model.safetensors"), fragment, layer="blk.fc",
                 source="model.safetensors")


def test_unreadable_tensor_is_a_format_error():
    class Broken(dict):
        def __getitem__(self, key):
            if key.endswith(".absmax"):
                raise OSError("short read")
            return super().__getitem__(key)

    expect_error(lambda: F.load_state_dict(Broken(_nf4_sd()), source="s"), "cannot read tensor", "short read",
                 layer="blk.fc")


@pytest.mark.parametrize("make,key", [(_nf4_sd, "blk.fc.absmax"), (_int8_sd, "blk.fc.weight_scale")])
def test_non_finite_scales_rejected(make, key):
    sd = make()
    bad = sd[key].clone()
    bad.view(-1)[1] = float("inf")
    expect_error(lambda: F.load_state_dict(edited(sd, key, bad)), "NaN or Inf (first at index 1)", layer="blk.fc")


def test_non_finite_nested_offset_rejected():
    sd = edited(_nf4_sd(True), "blk.fc.nested_offset", torch.tensor(float("nan")))
    expect_error(lambda: F.load_state_dict(sd), "finite", layer="blk.fc")


# ----------------------------------------------------------------------------- files
def test_load_file_errors_name_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    F.save_file(good, _nf4_sd())
    data = good.read_bytes()
    for name, content, reason in [
        ("trunc.safetensors", data[:-10], "(truncated file)"),
        ("header.safetensors", data[:20], "truncated file: the header needs"),
        ("junk.safetensors", b"GGUF this is not safetensors at all", "not a safetensors file"),
        ("empty.safetensors", b"", "not a safetensors file: 0 bytes"),
    ]:
        p = tmp_path / name
        p.write_bytes(content)
        expect_error(lambda p=p: F.load_file(p), reason, source=str(p))
        expect_error(lambda p=p: F.probe_file(p), reason, source=str(p))


def test_save_file_is_atomic_and_never_overwrites_input(tmp_path, monkeypatch):
    src = tmp_path / "in.safetensors"
    F.save_file(src, {"a": torch.ones(3)})
    before = src.read_bytes()
    with pytest.raises(ValueError, match="input"):
        F.save_file(src, {"a": torch.zeros(3)}, overwrite=True, inputs=[src])
    with pytest.raises(FileExistsError):
        F.save_file(src, {"a": torch.zeros(3)})
    assert src.read_bytes() == before

    def interrupted(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        F.save_file(src, {"a": torch.zeros(3)}, overwrite=True)
    out = tmp_path / "new.safetensors"
    with pytest.raises(KeyboardInterrupt):
        F.save_file(out, {"a": torch.zeros(3)})
    assert src.read_bytes() == before and not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    F.save_file(src, {"a": torch.zeros(3)}, overwrite=True)
    assert torch.equal(safetensors.torch.load_file(src)["a"], torch.zeros(3))
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


_real_st_save = safetensors.torch.save_file


def _writes_then_races(race_path, race_content):
    """A safetensors writer that, once the new file is written (after save_file checked the
    destination, before it commits), lets another process create ``race_path``."""
    def save(tensors, path, metadata=None):
        _real_st_save(tensors, path, metadata=metadata)
        with open(race_path, "xb") as f:
            f.write(race_content)
    return save


def _no_temp_left(folder) -> bool:
    return not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_save_file_commits_by_link_and_never_replaces_a_racing_file(tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    real_link = os.link

    def link_after_race(src, dst, *a, **k):  # the file appears in the last instant before the commit
        with open(dst, "xb") as f:
            f.write(b"theirs")
        return real_link(src, dst, *a, **k)

    def no_rename(*a):
        raise AssertionError("a new file must not be committed by rename")

    monkeypatch.setattr(os, "link", link_after_race)
    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(FileExistsError, match="appeared while") as err:
        F.save_file(out, {"a": torch.ones(3)})
    assert str(out) in str(err.value)
    assert out.read_bytes() == b"theirs" and _no_temp_left(tmp_path)
    # Created during the write (after the first check): also left alone.
    monkeypatch.setattr(os, "link", real_link)
    racing = tmp_path / "racing.safetensors"
    monkeypatch.setattr(safetensors.torch, "save_file", _writes_then_races(racing, b"theirs too"))
    with pytest.raises(FileExistsError, match="racing.safetensors"):
        F.save_file(racing, {"a": torch.ones(3)})
    assert racing.read_bytes() == b"theirs too" and _no_temp_left(tmp_path)
    # No race: the whole file under the name, one link, no temp file.
    monkeypatch.setattr(safetensors.torch, "save_file", _real_st_save)
    new = tmp_path / "new.safetensors"
    F.save_file(new, {"a": torch.arange(5.0)}, {"k": "v"})
    assert torch.equal(safetensors.torch.load_file(new)["a"], torch.arange(5.0))
    assert os.stat(new).st_nlink == 1 and _no_temp_left(tmp_path)


@pytest.mark.parametrize("hard_links", ["EPERM", "EXDEV", "missing"])
def test_save_file_falls_back_to_rename_without_hard_links(tmp_path, monkeypatch, hard_links):
    if hard_links == "missing":
        monkeypatch.delattr(os, "link")
    else:
        code = {"EPERM": errno.EPERM, "EXDEV": errno.EXDEV}[hard_links]

        def no_link(src, dst, *a, **k):  # FAT, some network or FUSE filesystems
            raise OSError(code, os.strerror(code), src, None, dst)
        monkeypatch.setattr(os, "link", no_link)
    new = tmp_path / "new.safetensors"
    F.save_file(new, {"a": torch.arange(5.0)})
    assert torch.equal(safetensors.torch.load_file(new)["a"], torch.arange(5.0))
    assert sorted(os.listdir(tmp_path)) == ["new.safetensors"]
    with pytest.raises(FileExistsError, match="new.safetensors"):
        F.save_file(new, {"a": torch.ones(1)})
    # A file created during the write is still seen at commit and left alone.
    late = tmp_path / "late.safetensors"
    monkeypatch.setattr(safetensors.torch, "save_file", _writes_then_races(late, b"late"))
    with pytest.raises(FileExistsError, match="late.safetensors") as err:
        F.save_file(late, {"a": torch.ones(3)})
    assert str(late) in str(err.value) and late.read_bytes() == b"late"
    assert sorted(os.listdir(tmp_path)) == ["late.safetensors", "new.safetensors"]
    monkeypatch.setattr(safetensors.torch, "save_file", _real_st_save)
    F.save_file(new, {"a": torch.zeros(2)}, overwrite=True)
    assert torch.equal(safetensors.torch.load_file(new)["a"], torch.zeros(2))


def test_atomic_output_refuses_an_input_linked_in_while_writing(tmp_path):
    src = tmp_path / "in.safetensors"
    F.save_file(src, {"a": torch.ones(3)})
    before = src.read_bytes()
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="input file"):
        with F.atomic_output(out, overwrite=True, inputs=[src]) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"new content")
            os.link(src, out)  # the output name now points at the input
    assert src.read_bytes() == before and out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "out.safetensors"]


def test_save_file_shared_and_strided_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    p = tmp_path / "s.safetensors"
    F.save_file(p, {"t": base.t(), "a": base, "b": base[0]}, {"k": "v"})
    got = safetensors.torch.load_file(p)
    assert torch.equal(got["t"], base.t()) and torch.equal(got["b"], base[0])
    with pytest.raises(TypeError):
        F.save_file(tmp_path / "m.safetensors", {"a": base}, {"k": 1})


def test_emit_rejects_bad_requests():
    qw = make_qw("int8_row", (3, 4))
    with pytest.raises(ValueError):
        F.emit_state_dict({"L": qw}, form="gguf")
    with pytest.raises(ValueError, match="clashes"):
        F.emit_state_dict({"L": qw}, {"L.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="nf4/fp4"):
        F.emit_state_dict({"L": qw}, form="bnb")
