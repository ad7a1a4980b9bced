"""Streaming safetensors reader and writer (convert/safetensors_stream.py)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfy_quant_native.convert.safetensors_stream import (
    ConvertError, OutputSpec, SafetensorsReader, SafetensorsWriter, read_header,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64,
          torch.float8_e4m3fn, torch.bool]


def _random(shape, dtype):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)


def test_writer_round_trip_any_order_every_dtype(tmp_path):
    tensors = {}
    for i, dt in enumerate(DTYPES):
        for shape in [(), (1,), (7,), (3, 5), (2, 3, 4)]:
            tensors[f"t{i}.{len(shape)}"] = _random(shape, dt)
    tensors["empty"] = torch.empty(0, 3)
    specs = [OutputSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    out = tmp_path / "o.safetensors"
    w = SafetensorsWriter(str(out), specs, {"a": "1", "b": "two"})
    for k in reversed(list(tensors)):  # order of arrival does not matter
        w.write(k, tensors[k])
    w.commit()
    got = load_file(str(out))
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"a": "1", "b": "two"}
    # every tensor starts aligned to its element size, as safetensors lays files out
    infos, _, _ = read_header(str(out))
    for k, info in infos.items():
        assert info.begin % tensors[k].element_size() == 0, k
    assert [p for p in os.listdir(tmp_path)] == ["o.safetensors"]


def test_reader_reads_what_safetensors_wrote(tmp_path):
    tensors = {"a.weight": torch.randn(33, 17).bfloat16(), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(3).half(), "z": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "x.safetensors"), {"k": "v"})
    with SafetensorsReader(str(tmp_path / "x.safetensors")) as r:
        assert r.metadata == {"k": "v"}
        for k, v in tensors.items():
            t = r.read(k)
            assert t.dtype == v.dtype and torch.equal(t, v)
            t.add_(1)  # private mapping: the file is not touched
    again = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in tensors.items())


def test_writer_refuses_undeclared_wrong_shape_and_missing(tmp_path):
    out = tmp_path / "o.safetensors"
    w = SafetensorsWriter(str(out), [OutputSpec("a", torch.float32, (2, 2)), OutputSpec("b", torch.int8, (3,))])
    with pytest.raises(ConvertError, match="not declared"):
        w.write("c", torch.zeros(1))
    with pytest.raises(ConvertError, match="declared torch.float32 \\[2, 2\\]"):
        w.write("a", torch.zeros(2, 3))
    w.write("a", torch.zeros(2, 2))
    with pytest.raises(ConvertError, match="never written"):
        w.commit()
    assert os.listdir(tmp_path) == []  # the partial file is gone


def test_abort_and_failed_verification_leave_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    w = SafetensorsWriter(str(out), [OutputSpec("a", torch.float32, (4,))])
    w.write("a", torch.ones(4))

    def verify(path):
        raise ConvertError("no")

    with pytest.raises(ConvertError):
        w.commit(verify)
    assert os.listdir(tmp_path) == []
    with SafetensorsWriter(str(out), [OutputSpec("a", torch.float32, (4,))]) as w2:
        assert len(os.listdir(tmp_path)) == 1
        w2.abort()
    assert os.listdir(tmp_path) == []


def _header_file(path, header: dict, data: bytes = b"", declared_len=None):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if declared_len is None else declared_len) + raw + data)


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file"),
    ("empty", "too short"),
    ("text", "not a safetensors file"),
    ("huge_len", "implausible"),
    ("short_header", "truncated"),
    ("short_data", "truncated"),
    ("hole", "hole or overlap"),
    ("bad_nbytes", "needs 16 bytes, the header gives 12"),
    ("bad_dtype", "dtype 'Q7' is not one this converter reads"),
    ("not_object", "not a JSON object"),
])
def test_read_header_rejects_bad_files(tmp_path, case, match):
    p = str(tmp_path / "f.safetensors")
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    if case == "empty":
        open(p, "wb").close()
    elif case == "text":
        with open(p, "w") as f:
            f.write("this is a text file, not a model; " * 10)
    elif case == "huge_len":
        _header_file(p, {"a": entry}, bytes(16), declared_len=1 << 40)
    elif case == "short_header":
        _header_file(p, {"a": entry}, declared_len=10_000)
    elif case == "short_data":
        _header_file(p, {"a": entry}, bytes(10))
    elif case == "hole":
        _header_file(p, {"a": {**entry, "data_offsets": [4, 20]}}, bytes(20))
    elif case == "bad_nbytes":
        _header_file(p, {"a": {**entry, "data_offsets": [0, 12]}}, bytes(12))
    elif case == "bad_dtype":
        _header_file(p, {"a": {**entry, "dtype": "Q7"}}, bytes(16))
    elif case == "not_object":
        raw = b"[1, 2]"
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ConvertError, match=match) as e:
        read_header(p)
    assert "\n" not in str(e.value)


def test_truncated_real_file(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(100, 100)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(ConvertError, match="truncated"):
        read_header(str(p))
