"""The machine code nvcc made of the sm_90a kernels whose speed hangs on how ptxas compiled
them (no GPU needed: the SASS in the built comfy_quant_native/_cuda_kernels.so, read with
cuobjdump). No correctness test can see either of these:

- linear4_stream's decode reads a lane-private table at shared offset 256, 16 loads a
  chunk. nvcc folds the shared base into each load as a uniform register
  (`LDS R, [R + UR + 0x100]`); one int added to StreamLayout in the wrong place made it
  keep the base in a vector register and add it with an IMAD before every load instead,
  which cost 16 tokens 2-5% (docs/CUDA_NOTES.md, run 103).
- gemm_int8_wgmma keeps its MMAs in flight while it waits for earlier ones. Where ptxas
  cannot prove that an instruction reading accumulator registers runs after their MMAs
  are done, it serializes every wgmma of the kernel (a wait after each one), with only an
  info line (C7514) in the build log (docs/CUDA_NOTES.md, run 127).

Skips where the CUDA build or cuobjdump (+ nvdisasm) is missing; CI installs both tools
(PyPI's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm) and builds for sm_90a."""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=1)
def sm90a_sass() -> dict[str, list[str]]:
    """Every kernel in the build's sm_90a code: name -> its SASS lines (one cuobjdump run,
    ~8 s, for all the tests here)."""
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
    lines = None
    for line in out.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            lines = kernels.setdefault(m.group(1), [])
        elif lines is not None:
            lines.append(line)
    return kernels


def kernels_sass(kernel: str) -> dict[str, list[str]]:
    """The instantiations of `kernel` in the sm_90a code: name -> its SASS lines."""
    kernels = {name: lines for name, lines in sm90a_sass().items() if kernel in name}
    if not kernels:
        pytest.skip(f"no sm_90a {kernel} in the build")
    return kernels


def test_stream_decode_table_loads_fold_the_shared_base():
    """Every instantiation of linear4_stream (2 dtypes x 3 chunk widths x tokens staged /
    in registers x 1-2 token tiles) reads its decode table with the shared base folded
    into the load as a uniform register: no load at offset 0x100 without one."""
    kernels = kernels_sass("linear4_stream")
    assert len(kernels) >= 16, sorted(kernels)
    bad = {}
    for name, lines in kernels.items():
        loads = [m.group(1) for m in map(TABLE_LOAD.search, lines) if m]
        assert len(loads) >= 16, (name, len(loads))  # at least one chunk's lookups
        without = [a for a in loads if "UR" not in a]
        if without:
            bad[name] = f"{len(without)} of {len(loads)} table loads without a uniform base, e.g. [{without[0]}+0x100]"
    assert not bad, bad


def test_w8a8_wgmma_kernels_are_not_serialized():
    """Every instantiation of the sm90 W8A8 GEMM (dtypes x row / lode / block x multicast x
    stages) issues its MMAs back to back: at most one wait for all MMAs
    (`WARPGROUP.DEPBAR.LE gsb0, 0x0`) a K-tile's four, where a serialized kernel has one
    after every MMA. The row kernels keep a K-tile's MMAs in flight (`gsb0, 0x1`)."""
    kernels = kernels_sass("gemm_int8_wgmma")
    assert len(kernels) >= 14, sorted(kernels)
    bad = {}
    for name, lines in kernels.items():
        mmas = sum("IGMMA" in ln for ln in lines)
        drains = sum("WARPGROUP.DEPBAR.LE gsb0, 0x0" in ln for ln in lines)
        assert mmas >= 4, (name, mmas)
        if 2 * drains > mmas:
            bad[name] = f"{drains} waits for all MMAs against {mmas} MMAs"
        promoted = "Li256E" not in name  # 256 wide: one K-group (row); 128 / 192: per-group scales
        if not promoted and not any("WARPGROUP.DEPBAR.LE gsb0, 0x1" in ln for ln in lines):
            bad[name] = "no wait that leaves a K-tile's MMAs in flight"
    assert not bad, bad
