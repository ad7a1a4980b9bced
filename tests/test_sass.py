"""The machine code nvcc made of the streamed 4-bit kernel (no GPU needed: the sm_90a
SASS in the built comfy_quant_native/_cuda_kernels.so, read with cuobjdump).

Why: linear4_stream's decode reads a lane-private table at shared offset 256, 16 loads a
chunk. nvcc folds the shared base into each load as a uniform register
(`LDS R, [R + UR + 0x100]`); one int added to StreamLayout in the wrong place made it keep
the base in a vector register and add it with an IMAD before every load instead, which
cost 16 tokens 2-5% (docs/CUDA_NOTES.md, run 103) and no correctness test could see.

Skips where the CUDA build or cuobjdump (+ nvdisasm) is missing; CI installs both tools
(PyPI's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm) and builds for sm_90a."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from comfy_quant_native import ops

# a decode-table lookup: a 4-byte load at offset 0x100 (the staged tokens' 16-byte loads
# can sit at that offset too)
TABLE_LOAD = re.compile(r"\bLDS R\d+, \[([^\]]*)\+0x100\]")


def tool(name: str) -> str | None:
    """`name` on PATH, else from a PyPI nvidia-cuda-* wheel (site-packages/nvidia/cu*/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for base in sys.path:
        hits = sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "bin", name)))
        if hits:
            return hits[-1]
    return None


def stream_kernels_sass() -> dict[str, list[str]]:
    """linear4_stream's instantiations in the sm_90a code: name -> its SASS lines."""
    cuobjdump, nvdisasm = tool("cuobjdump"), tool("nvdisasm")
    if not os.path.exists(ops._CUDA_SO):
        pytest.skip("CUDA kernels not built")
    if cuobjdump is None or nvdisasm is None:
        pytest.skip("cuobjdump / nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
    out = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90a", ops._CUDA_SO], env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0 and "does not contain device code" in out.stderr + out.stdout:
        pytest.skip("no sm_90a code in the build")
    assert out.returncode == 0, out.stderr[-2000:]
    kernels: dict[str, list[str]] = {}
    name = None
    for line in out.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1) if "linear4_stream" in m.group(1) else None
            if name:
                kernels[name] = []
        elif name:
            kernels[name].append(line)
    if not kernels:
        pytest.skip("no sm_90a linear4_stream in the build")
    return kernels


def test_stream_decode_table_loads_fold_the_shared_base():
    """Every instantiation of linear4_stream (2 dtypes x 3 chunk widths x tokens staged /
    in registers x 1-2 token tiles) reads its decode table with the shared base folded
    into the load as a uniform register: no load at offset 0x100 without one."""
    kernels = stream_kernels_sass()
    assert len(kernels) >= 16, sorted(kernels)
    bad = {}
    for name, lines in kernels.items():
        loads = [m.group(1) for m in map(TABLE_LOAD.search, lines) if m]
        assert len(loads) >= 16, (name, len(loads))  # at least one chunk's lookups
        without = [a for a in loads if "UR" not in a]
        if without:
            bad[name] = f"{len(without)} of {len(loads)} table loads without a uniform base, e.g. [{without[0]}+0x100]"
    assert not bad, bad
