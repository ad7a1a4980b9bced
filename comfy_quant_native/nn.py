"""torch.nn building blocks outside ComfyUI: a quantized Linear and a module quantizer.

ComfyUI has its own glue (comfy/); this is for scripts, the demo and the benchmarks.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .quantized import QuantizedWeight


class QuantLinear(nn.Module):
    """nn.Linear with a QuantizedWeight: forward runs the native linear of its layout."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, act_quant: bool = True):
        super().__init__()
        self.qweight = qweight
        self.act_quant = act_quant
        self.in_features = qweight.params.K
        self.out_features = qweight.params.N
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: str, group_size: int | None = None,
                    double_quant: bool = False, act_quant: bool = True) -> QuantLinear:
        qw = QuantizedWeight.from_float(linear.weight.detach(), layout, group_size, double_quant)
        return cls(qw, linear.bias, act_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight.linear(x, self.bias, self.act_quant)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() move the quantized tensors too (they are not Parameters).
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=self.qweight.device))
        self.qweight = self.qweight.to(probe.device)
        return self

    def extra_repr(self) -> str:
        p = self.qweight.params
        g = "" if p.group_size is None else f", group_size={p.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={p.layout}{g}"


def default_filter(name: str, linear: nn.Linear) -> bool:
    """Quantize every Linear with at least 2^16 weights."""
    return linear.weight.numel() >= 1 << 16


def quantize_module(
    module: nn.Module,
    layout: str,
    group_size: int | None = None,
    *,
    include: str | None = None,
    exclude: str | None = None,
    should_quantize: Callable[[str, nn.Linear], bool] = default_filter,
    double_quant: bool = False,
    act_quant: bool = True,
) -> dict[str, QuantLinear]:
    """Replace, in place, each selected nn.Linear of ``module`` by a QuantLinear.
    ``include``/``exclude`` are regexes on the module path. Returns the new layers."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    done: dict[str, QuantLinear] = {}
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear):
            continue
        if inc and not inc.search(name):
            continue
        if exc and exc.search(name):
            continue
        if not should_quantize(name, child):
            continue
        q = QuantLinear.from_linear(child, layout, group_size, double_quant, act_quant)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, q)
        done[name] = q
    return done
