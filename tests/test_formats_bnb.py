"""bitsandbytes / Forge / diffusers 4-bit checkpoints: files made by bitsandbytes itself
(Linear4bit state dicts) load to exactly the weights bitsandbytes dequantizes, and what we
write in that form bitsandbytes loads back to our weights."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import pytest
import safetensors.torch
import torch
from formats_util import assert_same_layer, edited, expect_error, json_bytes, make_qw

from comfy_quant_native import formats as F

PREFIX = "model.diffusion_model.double_blocks.0.img_attn.qkv"  # Forge's key layout


def bnb_linear(N, K, quant_type, compress_statistics, blocksize=64, dtype=torch.bfloat16,
               quant_storage=torch.uint8, bias=True):
    lin = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=dtype, compress_statistics=compress_statistics,
                            quant_type=quant_type, quant_storage=quant_storage)
    w = torch.randn(N, K).to(dtype)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=compress_statistics,
                                   quant_type=quant_type, blocksize=blocksize,
                                   quant_storage=quant_storage)._quantize("cpu")
    return lin


def bnb_reference(lin) -> torch.Tensor:
    return BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state)


def prefixed(sd, prefix=PREFIX):
    return {f"{prefix}.{k}": v for k, v in sd.items()}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("N,K,blocksize,dtype", [
    (33, 67, 64, torch.bfloat16),  # odd element count, partial last block
    (1, 7, 32, torch.float16),
    (64, 300, 128, torch.float32),
    (96, 768, 64, torch.bfloat16),  # 1152 blocks: several nested blocks of 256
])
def test_bitsandbytes_file_loads_to_bnb_weights(tmp_path, quant_type, compress_statistics, N, K, blocksize, dtype):
    lin = bnb_linear(N, K, quant_type, compress_statistics, blocksize, dtype)
    sd = prefixed(lin.state_dict())
    assert f"{PREFIX}.weight.quant_state.bitsandbytes__{quant_type}" in sd
    path = tmp_path / "forge.safetensors"
    safetensors.torch.save_file(sd, path)
    assert F.probe_file(path).form == "bnb"
    got = F.load_file(path)
    assert got.form == "bnb" and list(got.layers) == [PREFIX] and list(got.tensors) == [f"{PREFIX}.bias"]
    qw = got.layers[PREFIX]
    assert qw.params.shape == (N, K) and qw.params.group_size == blocksize and qw.params.orig_dtype == dtype
    assert qw.layout == quant_type and (qw.nested is not None) == compress_statistics
    want = bnb_reference(lin)
    assert qw.dequantize().dtype == want.dtype
    assert torch.equal(qw.dequantize(), want)
    assert torch.equal(qw.data, lin.weight.data.reshape(-1))


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float32])
def test_bitsandbytes_quant_storage(quant_storage):
    lin = bnb_linear(32, 64, "nf4", True, quant_storage=quant_storage, bias=False)
    sd = prefixed(lin.state_dict())
    assert sd[f"{PREFIX}.weight"].dtype == quant_storage
    got = F.load_state_dict(sd)
    assert torch.equal(got.layers[PREFIX].dequantize(), bnb_reference(lin))


@pytest.mark.parametrize("layout", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,group", [((33, 67), 64), ((96, 768), 32)])
def test_bnb_form_we_write_loads_in_bitsandbytes(tmp_path, layout, double_quant, shape, group):
    qw = make_qw(layout, shape, group, double_quant=double_quant, dtype=torch.float16)
    sd, meta = F.emit_state_dict({"blk": qw}, {"blk.bias": torch.zeros(shape[0])}, form="bnb")
    path = tmp_path / "ours_bnb.safetensors"
    F.save_file(path, sd, meta)
    disk = safetensors.torch.load_file(path)
    stats = {k: v for k, v in disk.items() if k.startswith("blk.weight.")}
    p = bnb.nn.Params4bit.from_prequantized(data=disk["blk.weight"], quantized_stats=stats, device="cpu")
    assert torch.equal(BF.dequantize_4bit(p.data, p.quant_state), qw.dequantize())
    got = F.load_file(path)
    assert got.form == "bnb"
    assert_same_layer(got.layers["blk"], qw)


def _bnb_sd(compress=True, quant_type="nf4"):
    return prefixed(bnb_linear(33, 67, quant_type, compress).state_dict(), "blk")


def _qs(sd, **changes):
    key = next(k for k in sd if ".quant_state." in k)
    meta = json.loads(bytes(sd[key].tolist()))
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    return edited(sd, key, json_bytes(meta))


BAD = [
    (lambda: edited(_bnb_sd(), "blk.weight.absmax", None), "missing tensor 'blk.weight.absmax'"),
    (lambda: edited(_bnb_sd(), "blk.weight.quant_map", None), "missing tensor 'blk.weight.quant_map'"),
    (lambda: edited(_bnb_sd(), "blk.weight.nested_quant_map", None), "missing tensor 'blk.weight.nested_quant_map'"),
    (lambda: _qs(_bnb_sd(), nested_offset=None), "has no nested_offset"),
    (lambda: _qs(_bnb_sd(), nested_blocksize=128), "nested_blocksize 128"),
    (lambda: _qs(_bnb_sd(), nested_dtype="float16"), "nested_dtype"),
    (lambda: _qs(_bnb_sd(), nested_offset="0.5"), "nested_offset must be a number"),
    (lambda: _qs(_bnb_sd(False), quant_type="fp4"), "says quant_type 'fp4'"),
    (lambda: _qs(_bnb_sd(False), blocksize=128), "expected 18 elements"),
    (lambda: _qs(_bnb_sd(False), blocksize=None), "has no blocksize"),
    (lambda: _qs(_bnb_sd(False), shape=None), "has no shape"),
    (lambda: _qs(_bnb_sd(False), shape=[33, 66]), "expected 1089 elements"),
    (lambda: _qs(_bnb_sd(False), dtype="int8"), "dtype must be"),
    (lambda: edited(_bnb_sd(False), "blk.weight.quant_map", torch.linspace(-1, 1, 16)), "not the nf4 table"),
    (lambda: edited(_bnb_sd(False), "blk.weight.absmax", torch.ones(35, dtype=torch.float16)), "dtype float32"),
    (lambda: edited(_bnb_sd(), "blk.weight.absmax", torch.ones(35)), "dtype uint8"),
    (lambda: edited(_bnb_sd(False), "blk.weight", torch.zeros(1105, 1, dtype=torch.uint8)), "expected 1106"),
    (lambda: edited(_bnb_sd(False), "blk.weight.SCB", torch.ones(3)), "unexpected bitsandbytes tensors"),
    (lambda: edited(_bnb_sd(False), "blk.weight.quant_state.bitsandbytes__nf4", json_bytes([1])), "JSON list"),
    (lambda: {**{k.replace("bitsandbytes__nf4", "bitsandbytes__int4"): v for k, v in _bnb_sd(False).items()}},
     "'int4'"),
]


@pytest.mark.parametrize("make,fragment", BAD, ids=range(len(BAD)))
def test_bad_bitsandbytes_input(make, fragment):
    sd = make()
    expect_error(lambda: F.load_state_dict(sd, source="forge.safetensors"), fragment, layer="blk",
                 source="forge.safetensors")
