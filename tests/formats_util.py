"""Helpers shared by the formats tests: building layers, comparing them, editing files."""

from __future__ import annotations

import json

import torch

from comfy_quant_native import QuantizedWeight
from comfy_quant_native.formats import FormatError


def make_qw(layout: str, shape, group=None, double_quant=False, dtype=torch.bfloat16) -> QuantizedWeight:
    w = torch.randn(*shape, dtype=torch.float32).to(dtype)
    if layout in ("nf4", "fp4"):
        return QuantizedWeight.from_float(w, layout, group, double_quant=double_quant)
    return QuantizedWeight.from_float(w, layout, group)


def assert_same_layer(got: QuantizedWeight, want: QuantizedWeight) -> None:
    """Bit-identical tensors and equal params (nested absmax too)."""
    assert got.params == want.params
    assert got.data.dtype == want.data.dtype and torch.equal(got.data, want.data)
    assert got.scale.dtype == want.scale.dtype and torch.equal(got.scale, want.scale)
    assert (got.nested is None) == (want.nested is None)
    if want.nested is not None:
        assert torch.equal(got.nested.codes, want.nested.codes)
        assert torch.equal(got.nested.nested_absmax, want.nested.nested_absmax)
        assert torch.equal(got.nested.quant_map, want.nested.quant_map)
        assert got.nested.offset == want.nested.offset
    assert torch.equal(got.dequantize(), want.dequantize())


def json_bytes(obj, **dumps) -> torch.Tensor:
    data = json.dumps(obj, **dumps).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8)


def raw_bytes(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def unpack_hi(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Codes of high-nibble-first bytes (element 2j high)."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]


def pack_lo(codes: torch.Tensor) -> torch.Tensor:
    """convert_to_quant's pack_4bit: element 2j in the LOW nibble, an odd count padded with
    code 0 in the last high nibble (written independently of formats/)."""
    codes = codes.to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.zeros(1, dtype=torch.uint8)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def expect_error(fn, *fragments: str, layer: str | None = None, source: str | None = None) -> FormatError:
    try:
        fn()
    except FormatError as e:
        msg = str(e)
        for frag in fragments:
            assert frag in msg, f"{frag!r} not in {msg!r}"
        if layer is not None:
            assert e.layer == layer, (e.layer, msg)
        if source is not None:
            assert e.source == source and source in msg, msg
        return e
    raise AssertionError(f"no FormatError (wanted {fragments})")


class CountingMapping(dict):
    """A dict that counts reads per key (load_state_dict must read each tensor once)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.reads: dict[str, int] = {}

    def __getitem__(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().__getitem__(key)


def edited(sd, key, value):
    """A copy of ``sd`` with ``key`` set to ``value`` (removed when value is None)."""
    sd = dict(sd)
    if value is None:
        del sd[key]
    else:
        sd[key] = value
    return sd
