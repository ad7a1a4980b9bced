"""Which Linear layers the Quantize Model node quantizes: the shared per-architecture
presets (comfy_quant_native/presets.py, also the converter's), seen from a loaded model.

Differences from the converter, both because a node must not fail a workflow over one
layer: a layer whose shape cannot take the group size stays in high precision (the
converter stops with an error), and names are module paths of ``diffusion_model``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import layouts as L
from .. import presets as P
from ..presets import MIN_PARAMS, Decision

PRESETS = ("auto",) + tuple(p for p in P.PRESETS if p != "auto")

__all__ = ["MIN_PARAMS", "PRESETS", "Decision", "LayerSelector", "detect_architecture"]


def detect_architecture(names: Iterable[str]) -> str | None:
    """The architecture from module paths (or tensor keys) of a diffusion model."""
    return P.detect_architecture(names)[0]


class LayerSelector(P.LayerSelector):
    """Decides per Linear layer whether Quantize Model quantizes it."""

    def __init__(self, names: Iterable[str], layout: str, group_size: int | None = None,
                 preset: str = "auto", include: str = "", exclude: str = "",
                 min_params: int = MIN_PARAMS, keep_modulation: bool = False):
        self.layout = L.check_layout(layout)
        self.group_size = L.check_group_size(layout, group_size or None)
        super().__init__(preset, names, include=include.strip() or None, exclude=exclude.strip() or None,
                         min_params=int(min_params), keep_modulation=keep_modulation)

    def decide(self, name: str, shape: tuple[int, int]) -> Decision:
        d = super().decide(name, tuple(shape), True)
        if d.quantize and not d.forced:
            problem = P.shape_problem(self.layout, self.group_size, tuple(shape))
            if problem:
                return Decision(False, problem)
        return d
