"""Shared test setup: markers that skip with a reason, CPU levels, a per-test seed."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from comfy_quant_native import ops


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return ops.list_backends()["cuda"]


def pytest_collection_modifyitems(config, items):
    cuda_reason = _cuda_reason()
    comfy_reason = None if os.environ.get("COMFYUI_PATH") else "COMFYUI_PATH not set (a ComfyUI checkout)"
    for item in items:
        if cuda_reason and item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason=f"CUDA: {cuda_reason}"))
        if comfy_reason and item.get_closest_marker("comfyui"):
            item.add_marker(pytest.mark.skip(reason=comfy_reason))


# Fresh random inputs on every run, reproducible: set COMFY_QUANT_TEST_SEED to the
# value printed in the pytest header to replay a failing run.
SESSION_SEED = int(os.environ.get("COMFY_QUANT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"COMFY_QUANT_TEST_SEED={SESSION_SEED}; native CPU levels: {native_levels()}; backends: {ops.list_backends()}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))


def native_levels() -> list[str]:
    """Every SIMD level this CPU runs ('ref', 'avx2', 'avx512'); empty without _C."""
    return list(ops._C.cpu_levels()) if ops._C is not None else []


@pytest.fixture(params=native_levels() or ["none"])
def cpu_level(request):
    """Runs a test once per native CPU level, restoring the default afterwards."""
    if request.param == "none":
        pytest.skip("native extension not built")
    before = ops._C.cpu_level()
    ops._C.set_cpu_level(request.param)
    yield request.param
    ops._C.set_cpu_level(before)
