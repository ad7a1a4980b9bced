"""Rounding methods: ``nearest`` is the kernels' rounding bit for bit; ``mse`` gives each
group an unbiased reconstruction whose error is never above that of round-to-nearest's
codes (scored the same way), and lowers the layer's output error on realistic
(heavy-tailed, outlier-channel) weights."""

from __future__ import annotations

import math

import pytest
import torch

from comfy_quant_native import QuantizedWeight
from comfy_quant_native import layouts as L
from comfy_quant_native.convert import Converter
from comfy_quant_native.convert import rounding as R
from comfy_quant_native.convert.synthetic import realistic_weight

LAYOUTS = list(R.MSE_LAYOUTS)


def _groups(t: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """t [N, K] as [groups, values] by the layout's scale groups."""
    p = qw.params
    if p.layout in L.FOUR_BIT:
        flat = t.reshape(-1)
        G = math.ceil(flat.numel() / p.group_size)
        return torch.nn.functional.pad(flat, (0, G * p.group_size - flat.numel())).view(G, -1)
    gn, gk = L.int8_tile(p.layout, p.group_size, p.K)
    N, K = t.shape
    nb, kb = math.ceil(N / gn), math.ceil(K / gk)
    return torch.nn.functional.pad(t, (0, kb * gk - K, 0, nb * gn - N)).view(nb, gn, kb, gk) \
        .permute(0, 2, 1, 3).reshape(nb * kb, -1)


def _unbiased_errors(qw: QuantizedWeight, w: torch.Tensor) -> torch.Tensor:
    """Per group: ||c d - w||^2 with d the dequantized group and c = <w,w>/<d,w> (1 when
    <d,w> <= 0): the score the search minimises."""
    d, x = _groups(qw.dequantize(torch.float32), qw).double(), _groups(w.float(), qw).double()
    dw, ww = (d * x).sum(1), (x * x).sum(1)
    c = torch.where(dw > 0, ww / torch.where(dw > 0, dw, torch.ones_like(dw)), torch.ones_like(dw))
    return (d * c[:, None] - x).square().sum(1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(256, 384), (7, 200), (1, 96)])
def test_mse_never_worse_than_nearest_per_group(layout, shape):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    w = realistic_weight(shape, g, torch.bfloat16)
    w[0, :5] = 0  # zeros and a constant run inside a group
    w[-1, -3:] = 0.01
    group = 64
    rtn = QuantizedWeight.from_float(w, layout, group)
    mse = R.quantize_weight(w, layout, group, "mse")
    assert mse.params == rtn.params
    e_rtn, e_mse = _unbiased_errors(rtn, w), _unbiased_errors(mse, w)
    assert bool((e_mse <= e_rtn * (1 + 1e-5) + 1e-12).all())
    if w.numel() >= 4096:  # a few groups may all keep round-to-nearest's codes
        assert float(e_mse.sum()) < float(e_rtn.sum())
    # the stored scales make each group unbiased: <w_hat, w> = <w, w>
    d, x = _groups(mse.dequantize(torch.float32), mse).double(), _groups(w.float(), mse).double()
    ww = (x * x).sum(1)
    live = ww > 1e-12
    assert torch.allclose((d * x).sum(1)[live], ww[live], rtol=1e-4)


def test_mse_zero_and_constant_weights():
    for layout in LAYOUTS:
        for w in (torch.zeros(64, 128), torch.full((64, 128), 0.25)):
            group = 64
            qw = R.quantize_weight(w, layout, group, "mse")
            assert torch.allclose(qw.dequantize(torch.float32), w, atol=1e-7), layout


def test_mse_nan_raises():
    w = torch.randn(8, 128)
    w[2, 3] = float("inf")
    for layout in LAYOUTS:
        with pytest.raises(ValueError, match="NaN or Inf"):
            R.quantize_weight(w, layout, 64, "mse")


def test_nearest_is_the_kernels_rounding():
    w = torch.randn(192, 384).bfloat16()
    for fmt, layout in (("nf4", "nf4"), ("int8_lodewise", "int8_lode")):
        out = Converter(fmt).convert("l", w)
        ref = QuantizedWeight.from_float(w, layout)
        assert torch.equal(out["l.weight"], ref.data)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mse_lowers_output_error_on_realistic_weights(layout):
    """The claim docs/QUALITY.md measures at Flux sizes, here on one small layer."""
    g = torch.Generator().manual_seed(7)
    w = realistic_weight((384, 512), g, torch.bfloat16)
    x = torch.randn(64, 512, generator=g)
    x[:, torch.randperm(512, generator=g)[:8]] *= 10  # activation outlier channels
    y = x @ w.float().t()
    group = L.GROUP_DEFAULT[layout]
    errs = {}
    for r in ("nearest", "mse"):
        qw = R.quantize_weight(w, layout, group, r)
        errs[r] = float((x @ qw.dequantize(torch.float32).t() - y).norm() / y.norm())
    assert errs["mse"] < errs["nearest"], errs


def test_mse_not_offered_where_it_does_not_win():
    for layout in ("int8_block", "int8_lode", "int8_row"):
        with pytest.raises(ValueError, match="not offered"):
            R.quantize_weight(torch.randn(8, 128), layout, None if layout == "int8_row" else 64, "mse")
    with pytest.raises(ValueError, match="does not lower"):
        Converter("int8_blockwise", rounding="mse")
