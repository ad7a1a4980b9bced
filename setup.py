"""Build of comfy_quant_native: the C extension _C (abi3, no libtorch) and, where nvcc is
found, the CUDA kernels as a plain shared object _cuda_kernels.so that _C loads at run time.

Install against the torch you already have, never in an isolated build environment:
    pip install --no-build-isolation -e .
Environment:
    COMFY_QUANT_CUDA=auto|1|0     build the CUDA kernels (auto: when nvcc is found)
    COMFY_QUANT_CUDA_ARCHS="75;80;86;89;90a"   SASS targets (PTX of the newest is added)
    NVCC=/path/to/nvcc            nvcc to use (else $CUDA_HOME/bin/nvcc, else PATH)
    COMFY_QUANT_NVCC_JOBS=N       parallel nvcc processes (default: CPU count)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"

C_FLAGS = [
    "-std=c11",
    "-O3",
    "-D_POSIX_C_SOURCE=200809L",
    # One rounding per operation everywhere, so that every variant and the
    # reference agree bit for bit where the contract says they do.
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fvisibility=hidden",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
]
DEFAULT_ARCHS = "75;80;86;89;90a"


def c_sources() -> list[str]:
    files = [CSRC / "module.c"] + sorted((CSRC / "cpu").glob("*.c"))
    return [str(f.relative_to(ROOT)) for f in files]


def find_nvcc() -> str | None:
    for cand in (
        os.environ.get("NVCC"),
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if cand and os.path.exists(cand):
            return cand
    return None


def gencode_flags(archs: str) -> list[str]:
    flags = []
    names = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    for a in names:
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    newest = max(names, key=lambda a: int("".join(c for c in a if c.isdigit())))
    # PTX of the newest plain target, for cards newer than any SASS above.
    newest_plain = "".join(c for c in newest if c.isdigit())
    flags.append(f"-gencode=arch=compute_{newest_plain},code=compute_{newest_plain}")
    return flags


class BuildExt(build_ext):
    """Builds _C as usual, then the CUDA kernels with nvcc next to it."""

    def run(self):
        super().run()
        self.build_cuda()

    def build_cuda(self):
        mode = os.environ.get("COMFY_QUANT_CUDA", "auto").lower()
        cu_files = sorted((CSRC / "cuda").glob("*.cu"))
        if mode in ("0", "off", "no") or not cu_files:
            return
        nvcc = find_nvcc()
        if nvcc is None:
            if mode in ("1", "on", "yes"):
                raise RuntimeError("COMFY_QUANT_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)")
            print("comfy_quant_native: nvcc not found, building without CUDA kernels")
            return
        archs = os.environ.get("COMFY_QUANT_CUDA_ARCHS", DEFAULT_ARCHS)
        out_dir = Path(self.get_ext_fullpath("comfy_quant_native._C")).parent
        target = out_dir / "_cuda_kernels.so"
        obj_dir = Path(self.build_temp) / "cuda"
        obj_dir.mkdir(parents=True, exist_ok=True)
        common = [
            "-O3",
            "-std=c++17",
            "--use_fast_math" if os.environ.get("COMFY_QUANT_FAST_MATH") else "-ftz=false",
            "-Xcompiler=-fPIC,-fvisibility=hidden",
            "-I" + str(CSRC),
            "-lineinfo",
            *gencode_flags(archs),
        ]
        if "90a" in [a.strip() for a in archs.replace(",", ";").split(";")]:
            common.append("-DCQ_HAVE_SM90A=1")  # gemm_int8_sm90.cu: wgmma + TMA kernels
        cutlass = cutlass_include()
        if cutlass:
            common.append("-I" + cutlass)

        def compile_one(cu: Path) -> Path:
            obj = obj_dir / (cu.stem + ".o")
            if obj.exists() and obj.stat().st_mtime > max(cu.stat().st_mtime, newest_header()):
                return obj
            cmd = [nvcc, "-c", str(cu), "-o", str(obj), *common]
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            return obj

        jobs = int(os.environ.get("COMFY_QUANT_NVCC_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            objs = list(pool.map(compile_one, cu_files))
        cmd = [nvcc, "-shared", "-cudart=static", *gencode_flags(archs), "-o", str(target), *map(str, objs)]
        print(" ".join(cmd))
        subprocess.check_call(cmd)
        if self.inplace:
            dest = ROOT / "comfy_quant_native" / "_cuda_kernels.so"
            if dest.resolve() != target.resolve():
                shutil.copy2(target, dest)


def newest_header() -> float:
    return max(p.stat().st_mtime for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh"))


def cutlass_include() -> str | None:
    """Headers of the nvidia-cutlass package, a build-time dependency of .cu files only."""
    try:
        import cutlass_library  # noqa: F401  (nvidia-cutlass ships its headers beside it)
    except Exception:
        pass
    for base in sys.path + [sysconfig.get_paths()["purelib"]]:
        inc = Path(base) / "cutlass_library" / "source" / "include"
        if (inc / "cutlass" / "cutlass.h").exists():
            return str(inc)
    return None


setup(
    ext_modules=[
        Extension(
            "comfy_quant_native._C",
            sources=c_sources(),
            include_dirs=[str(CSRC)],
            extra_compile_args=C_FLAGS,
            libraries=["pthread", "dl", "m"],
            define_macros=[("Py_LIMITED_API", "0x030a0000")],
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
