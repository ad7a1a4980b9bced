"""The public tensor API: quantize / dequantize / linear for every layout.

Each op is a ``torch.library`` custom op ``torch.ops.comfy_quant.<name>`` with a fake
(meta) implementation, so ``torch.compile`` traces through it without graph breaks.
In eager mode the functions here call the implementation directly: the custom-op
dispatcher costs ~20 us a call (DESIGN.md), a Flux step makes ~500 linears.

Backends, chosen per call from the tensors' device (``list_backends()`` says why one is
off, ``use_backend()`` forces one):
  cuda       native CUDA kernels (_cuda_kernels.so) on torch's current stream
  cpu        native C kernels (_C), threaded, AVX2/AVX-512 (VNNI, BF16) by CPU features
  reference  plain PyTorch (reference.py): the oracle, and the fallback with one warning
Every entry validates its tensors and raises ValueError/TypeError naming the tensor,
the expected and the actual shape/dtype/device, before any kernel runs; all tensors of
one call must be on one device, and CUDA kernels launch with that device current.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import layouts as L
from . import reference

log = logging.getLogger("comfy_quant_native")

# ----------------------------------------------------------------------------- native loading
_C = None
_C_REASON = "not loaded"
_CUDA_REASON = "not loaded"
try:
    from . import _C as _C_module  # type: ignore[attr-defined]

    _C = _C_module
    _C_REASON = None
except ImportError as e:  # pragma: no cover - exercised by the fallback test in a subprocess
    _C_REASON = f"native extension not built ({e})"
    log.warning(
        "comfy_quant_native: %s; running on the plain-PyTorch reference, which is slow. "
        "Build it with: pip install --no-build-isolation -e %s",
        _C_REASON,
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )

_CUDA_SO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cuda_kernels.so")


def _load_cuda() -> None:
    global _CUDA_REASON
    if _C is None:
        _CUDA_REASON = _C_REASON
    elif not torch.cuda.is_available():
        _CUDA_REASON = "torch sees no CUDA device"
    elif not os.path.exists(_CUDA_SO):
        _CUDA_REASON = f"CUDA kernels not built ({_CUDA_SO} missing: build with nvcc on PATH)"
    else:
        try:
            _C.load_cuda(_CUDA_SO)
            _CUDA_REASON = None
        except OSError as e:
            _CUDA_REASON = str(e)
    if _CUDA_REASON and torch.cuda.is_available():
        log.warning("comfy_quant_native: CUDA kernels unavailable: %s; GPU tensors use the reference", _CUDA_REASON)


_load_cuda()

# Kernel variants of the CUDA backend, forced by tests and bench/gpu_ops.py (0 = automatic).
CUDA_KNOBS = {"gemm_int8": 0, "linear_4bit": 1, "split_k": 2, "skinny_tile": 3, "linear_int8": 4,
              "skinny_probe": 5, "stream_stages": 6, "stream_xreg": 7, "gemm_probe": 8,
              "gemm_tail": 9, "gemm_stages": 10,
              "pdl": 11, "stream_ab": 12, "stream_half": 13}  # skinny_probe, gemm_probe: benchmarks only (results are wrong)


def cuda_kernel_variant(knob: str, value: int) -> int:
    """Force a variant of the CUDA kernels (csrc/cuda/common.cuh, enum Knob); returns the
    previous value. For tests and benchmarks: the automatic choice (0) is the product path."""
    if _CUDA_REASON is not None:
        raise RuntimeError(f"CUDA kernels unavailable: {_CUDA_REASON}")
    import ctypes

    lib = ctypes.CDLL(_CUDA_SO)  # the same loaded object as _C's, so the same state
    return int(lib.cq_cuda_set_variant(CUDA_KNOBS[knob], int(value)))


# COMFY_QUANT_CUDA_VARIANTS="gemm_int8=3,split_k=2": the same, from the environment (debugging).
if _CUDA_REASON is None and os.environ.get("COMFY_QUANT_CUDA_VARIANTS"):
    for _item in os.environ["COMFY_QUANT_CUDA_VARIANTS"].split(","):
        _k, _, _v = _item.partition("=")
        cuda_kernel_variant(_k.strip(), int(_v))

BACKENDS = ("cuda", "cpu", "reference")
_forced = threading.local()


def list_backends() -> dict[str, str | None]:
    """Each backend and why it is off (None: available)."""
    return {"cuda": _CUDA_REASON, "cpu": _C_REASON, "reference": None}


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend in this thread (tests, benchmarks): ``with use_backend("reference"): ...``"""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    reason = list_backends()[name]
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
    prev = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = prev


def backend_for(device: torch.device) -> str:
    forced = getattr(_forced, "name", None)
    if device.type == "cuda":
        if forced == "reference" or _CUDA_REASON is not None:
            return "reference"
        return "cuda"
    if device.type == "cpu":
        if forced == "reference" or _C_REASON is not None:
            return "reference"
        return "cpu"
    return "reference"  # mps, xpu, meta...: plain PyTorch


def _native(fn, t: torch.Tensor, *args, optional: tuple = ()):
    """Calls _C's ``fn(*args, device, stream, nthreads, *optional)`` for tensors on t's
    device. CUDA: torch's current stream of that device, with the device made current for
    the call (the CUDA launchers run on the runtime's current device, so a tensor on cuda:1
    while cuda:0 is current would be launched on cuda:0; torch.cuda.device restores the old
    one)."""
    if t.device.type != "cuda":
        return fn(*args, 0, 0, _nthreads(), *optional)
    with torch.cuda.device(t.device):
        return fn(*args, 1, torch.cuda.current_stream().cuda_stream, _nthreads(), *optional)


def _nthreads() -> int:
    return max(1, torch.get_num_threads())


# Fused small-M kernels up to this many tokens; above, dequantize + torch GEMM. Per
# backend and activation dtype, measured (docs/BENCHMARKS.md):
# 4-bit, CPU: the fused kernel computes in float32 FMA, the other path dequantizes to x's
#   dtype for torch's GEMM. float32 and float16 pay for a fresh 4-/2-byte weight (page
#   faults of a >32 MB torch.empty each call) and torch's slow float32/float16 GEMMs, so
#   fused wins to ~128 / 64 tokens; bfloat16 has torch's fast AVX512-BF16 GEMM: fused wins
#   only to ~8 (3072x3072) - 16 (3072x12288) (bench/cpu_kernels.py crossover table).
# int8 weight-only, CPU: float32 pays for a 4-byte weight and torch's slower float32
#   GEMM, so the fused kernel stays ahead to ~512 tokens, bf16/fp16 to ~32.
# 4-bit, CPU level avx512bf16 (cpu_bf16_linear()): bfloat16 x runs the vdpbf16ps kernel,
#   which decodes each weight once per call and keeps pace with torch's bf16 GEMM on the
#   dense weight: fused 1.04-3.3x faster than dequantize + GEMM from 8 to 1024 tokens
#   (Zen 4, bench/cpu_linear_bf16.py); 256 keeps a margin. A CPU with AMX (Sapphire Rapids
#   and later) runs torch's bf16 GEMM on tiles this kernel does not use: there only the
#   weight-bandwidth-bound few-token range stays fused (16, reasoned, not measured).
#   Key "cpu_avx512bf16".
# CUDA: the skinny tensor-core kernels win to 16 tokens (bench/gpu_ops.py).
def _cpu_has_amx() -> bool:
    """AMX-BF16 per /proc/cpuinfo (Linux; elsewhere assumed absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


FUSED_MAX_M_4BIT = {
    "cpu": {torch.float32: 128, torch.bfloat16: 8, torch.float16: 64},
    "cpu_avx512bf16": {torch.bfloat16: 16 if _cpu_has_amx() else 256},
    "cuda": dict.fromkeys(L.FLOAT_DTYPES, 16),
}
FUSED_MAX_M_INT8 = {
    "cpu": {torch.float32: 512, torch.bfloat16: 32, torch.float16: 32},
    "cuda": dict.fromkeys(L.FLOAT_DTYPES, 16),
}


def fused_max_m(layout: str, backend: str, dtype: torch.dtype) -> int:
    """Tokens up to which the linear of ``layout`` runs the fused small-M kernel (W8A8 has
    no threshold: it always runs its own GEMM)."""
    if layout in L.FOUR_BIT:
        if backend == "cpu" and dtype == torch.bfloat16 and cpu_bf16_linear():
            backend = "cpu_avx512bf16"
        return FUSED_MAX_M_4BIT[backend][dtype]
    return FUSED_MAX_M_INT8[backend][dtype]


_BF16_LINEAR_AT_LEVEL: dict[str, bool] = {}


@torch.compiler.assume_constant_result  # traced as its value: dynamo cannot call into _C
def cpu_bf16_linear() -> bool:
    """Whether the native CPU backend's current level has the bfloat16 4-bit linear
    (AVX512-BF16; level avx512bf16). Without it, bf16 x runs the float32 kernel. (A
    compiled graph keeps the token threshold this implied when it was traced; the op
    itself checks again when it runs.)"""
    if _C is None:
        return False
    level = _C.cpu_level()  # set_cpu_level / COMFY_QUANT_CPU can change it
    has = _BF16_LINEAR_AT_LEVEL.get(level)
    if has is None:
        has = _BF16_LINEAR_AT_LEVEL[level] = _C.cpu_kernels()["linear_4bit_bf16"] is not None
    return has


# ----------------------------------------------------------------------------- validation
def _fail(name: str, what: str, expected, got) -> None:
    raise ValueError(f"{name}: expected {what} {expected}, got {got}")


def check_tensor(
    t,
    name: str,
    *,
    dtype=None,
    shape: Sequence[int] | None = None,
    device: torch.device | None = None,
    ndim: int | None = None,
    contiguous: bool = True,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            raise TypeError(
                f"{name}: expected dtype {' or '.join(str(d) for d in allowed)}, got {t.dtype}"
            )
    if ndim is not None and t.dim() != ndim:
        _fail(name, "a tensor of rank", ndim, f"shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(name, "shape", tuple(shape), tuple(t.shape))
    if device is not None and t.device != device:
        _fail(name, "device", device, t.device)
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}")


def _check_same_device(op: str, **tensors) -> None:
    """All tensor arguments of ``op`` on one device (None and non-tensors are skipped:
    check_tensor names those); the message lists each tensor's device."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{op}: expected all tensors on one device, got {listing}")


def _check_codebook(codebook: str) -> None:
    if codebook not in L.FOUR_BIT:
        raise ValueError(f"codebook: expected 'nf4' or 'fp4', got {codebook!r}")


def _check_nonempty(t: torch.Tensor, name: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{name}: cannot quantize an empty tensor (shape {tuple(t.shape)})")


def _check_4bit_weight(packed, absmax, group_size, n):
    check_tensor(packed, "packed", dtype=torch.uint8, shape=((n + 1) // 2,))
    check_tensor(absmax, "absmax", dtype=torch.float32, shape=(math.ceil(n / group_size),))


def _check_int8_weight(q, scale, layout, group_size):
    check_tensor(q, "qweight", dtype=torch.int8, ndim=2)
    N, K = q.shape
    if N == 0 or K == 0:
        _fail("qweight", "a non-empty [N, K]", "tensor", f"shape {tuple(q.shape)}")
    check_tensor(scale, "weight_scale", dtype=torch.float32, shape=L.scale_shape(layout, group_size, N, K))


def _check_x(x, K, name="x"):
    check_tensor(x, name, dtype=L.FLOAT_DTYPES, contiguous=False)
    if x.dim() < 1 or x.shape[-1] != K:
        _fail(name, "last dimension (in_features)", K, f"shape {tuple(x.shape)}")


def _check_bias(bias, N):
    if bias is not None:
        check_tensor(bias, "bias", dtype=L.FLOAT_DTYPES, shape=(N,), contiguous=False)


def _nonfinite_error(name: str, t: torch.Tensor, e: Exception):
    return ValueError(f"cannot quantize {name} of shape {tuple(t.shape)}: {e}")


def _check_finite_scales(scales: torch.Tensor, name: str, t: torch.Tensor) -> None:
    # The CUDA quantize kernels do not report NaN/Inf; a non-finite group leaves a
    # non-finite scale, checked here (one device sync: quantizing is not a hot path).
    bad = ~torch.isfinite(scales.reshape(-1))
    if bool(bad.any()):
        g = int(bad.nonzero()[0, 0])
        raise _nonfinite_error(name, t, f"input contains NaN or Inf (first in group {g})")


# ----------------------------------------------------------------------------- 4-bit
def _quantize_4bit(x: torch.Tensor, codebook: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor(x, "weight", dtype=L.FLOAT_DTYPES)
    _check_codebook(codebook)
    L.check_group_size(codebook, group_size)
    _check_nonempty(x, "weight")
    backend = backend_for(x.device)
    if backend == "reference":
        return reference.quantize_4bit(x, codebook, group_size)
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(math.ceil(n / group_size), dtype=torch.float32, device=x.device)
    try:
        _native(_C.quantize_4bit, x, x.data_ptr(), L.DTYPE_CODES[x.dtype], packed.data_ptr(), absmax.data_ptr(),
                n, group_size, L.CODEBOOK_CODES[codebook])
    except ValueError as e:
        raise _nonfinite_error("weight", x, e) from None
    if x.device.type == "cuda":
        _check_finite_scales(absmax, "weight", x)
    return packed, absmax


def _dequantize_4bit(packed, absmax, codebook, group_size, shape, dtype) -> torch.Tensor:
    _check_codebook(codebook)
    L.check_group_size(codebook, group_size)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if n == 0 or any(s < 0 for s in shape):
        _fail("shape", "a non-empty shape", "", shape)
    _check_same_device("dequantize_4bit", packed=packed, absmax=absmax)
    _check_4bit_weight(packed, absmax, group_size, n)
    if dtype not in L.FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {L.FLOAT_DTYPES}, got {dtype}")
    if backend_for(packed.device) == "reference":
        return reference.dequantize_4bit(packed, absmax, codebook, group_size, shape, dtype)
    y = torch.empty(shape, dtype=dtype, device=packed.device)
    _native(_C.dequantize_4bit, packed, packed.data_ptr(), absmax.data_ptr(), y.data_ptr(), L.DTYPE_CODES[dtype],
            n, group_size, L.CODEBOOK_CODES[codebook])
    return y


def _linear_4bit(x, packed, absmax, codebook, group_size, shape, bias) -> torch.Tensor:
    N, K = (int(s) for s in shape)
    _check_codebook(codebook)
    L.check_group_size(codebook, group_size)
    if N <= 0 or K <= 0:
        _fail("shape", "positive (N, K)", "", (N, K))
    _check_same_device("linear_4bit", x=x, packed=packed, absmax=absmax, bias=bias)
    _check_4bit_weight(packed, absmax, group_size, N * K)
    _check_x(x, K)
    _check_bias(bias, N)
    backend = backend_for(x.device)
    if backend == "reference":
        return reference.linear_4bit(x, packed, absmax, codebook, group_size, N, K, bias)
    lead = x.shape[:-1]
    M = math.prod(lead)
    if M == 0:
        return x.new_empty(*lead, N)
    if M > fused_max_m(codebook, backend, x.dtype):
        w = _dequantize_4bit(packed, absmax, codebook, group_size, (N, K), x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    # CUDA keeps x's dtype; the CPU kernels take float32 x, or bfloat16 x at level
    # avx512bf16 (weights rounded to bf16 as dequantize writes them), and a float32 bias.
    if backend == "cuda" or (x.dtype == torch.bfloat16 and cpu_bf16_linear()):
        dtype = x.dtype
    else:
        dtype = torch.float32
    x2 = x.reshape(M, K).to(dtype).contiguous()
    b = None if bias is None else bias.to(dtype if backend == "cuda" else torch.float32).contiguous()
    y = torch.empty(M, N, dtype=dtype, device=x.device)
    _native(_C.linear_4bit, x, x2.data_ptr(), L.DTYPE_CODES[dtype], packed.data_ptr(), absmax.data_ptr(),
            0 if b is None else b.data_ptr(), y.data_ptr(), M, N, K, group_size, L.CODEBOOK_CODES[codebook])
    return y.to(x.dtype).reshape(*lead, N)


# ----------------------------------------------------------------------------- int8
def _quantize_int8_tiles(x2d: torch.Tensor, gn: int, gk: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = x2d.shape
    if backend_for(x2d.device) == "reference":
        try:
            return reference.quantize_int8_tiles(x2d, gn, gk)
        except ValueError as e:
            raise _nonfinite_error(name, x2d, e) from None
    q = torch.empty(N, K, dtype=torch.int8, device=x2d.device)
    scale = torch.empty(math.ceil(N / gn), math.ceil(K / gk), dtype=torch.float32, device=x2d.device)
    try:
        _native(_C.quantize_int8, x2d, x2d.data_ptr(), L.DTYPE_CODES[x2d.dtype], q.data_ptr(), scale.data_ptr(),
                N, K, gn, gk)
    except ValueError as e:
        raise _nonfinite_error(name, x2d, e) from None
    if x2d.device.type == "cuda" and name == "weight":
        _check_finite_scales(scale, name, x2d)
    return q, scale


def _quantize_int8(w, layout, group_size) -> tuple[torch.Tensor, torch.Tensor]:
    if layout not in L.INT8:
        raise ValueError(f"layout: expected one of {L.INT8}, got {layout!r}")
    check_tensor(w, "weight", dtype=L.FLOAT_DTYPES, ndim=2)
    _check_nonempty(w, "weight")
    N, K = w.shape
    group_size = L.check_group_size(layout, group_size, K)
    gn, gk = L.int8_tile(layout, group_size, K)
    q, scale = _quantize_int8_tiles(w, gn, gk, "weight")
    return q, scale.reshape(L.scale_shape(layout, group_size, N, K))


def _dequantize_int8(q, scale, layout, group_size, dtype) -> torch.Tensor:
    if layout not in L.INT8:
        raise ValueError(f"layout: expected one of {L.INT8}, got {layout!r}")
    check_tensor(q, "qweight", dtype=torch.int8, ndim=2)
    _check_same_device("dequantize_int8", qweight=q, weight_scale=scale)
    group_size = L.check_group_size(layout, group_size, q.shape[1])
    _check_int8_weight(q, scale, layout, group_size)
    if dtype not in L.FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {L.FLOAT_DTYPES}, got {dtype}")
    if backend_for(q.device) == "reference":
        return reference.dequantize_int8(q, scale, layout, group_size, dtype)
    N, K = q.shape
    gn, gk = L.int8_tile(layout, group_size, K)
    y = torch.empty(N, K, dtype=dtype, device=q.device)
    _native(_C.dequantize_int8, q, q.data_ptr(), scale.data_ptr(), y.data_ptr(), L.DTYPE_CODES[dtype], N, K,
            gn, gk)
    return y


def _quantize_int8_act(x2d, group_k) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor(x2d, "x", dtype=L.FLOAT_DTYPES, ndim=2)
    if not isinstance(group_k, int) or group_k < 1:
        raise ValueError(f"group_k: expected a positive int, got {group_k!r}")
    if x2d.numel() == 0:
        M, K = x2d.shape
        return (torch.empty(M, K, dtype=torch.int8, device=x2d.device),
                torch.empty(M, math.ceil(K / group_k) if K else 0, dtype=torch.float32, device=x2d.device))
    return _quantize_int8_tiles(x2d, 1, group_k, "x")


# CQ_GEMM_WORKSPACE_BYTES(sms) of csrc/cuda/launch.h: a 128 x 256 int32 partial tile and a
# flag a multiprocessor (tests/test_cuda.py forces the split that uses it)
GEMM_WORKSPACE_BYTES_PER_SM = 128 * 256 * 4 + 4


def gemm_int8_workspace(device: torch.device, M: int) -> torch.Tensor | None:
    """Scratch for _C.gemm_int8's trailing (workspace, workspace_bytes): on CUDA, for more
    rows than the small-M kernels take, it lets the sm_90 kernel split the K of a partly
    filled round of tiles (torch's allocator: stream-ordered, capturable); else None.
    Keep the tensor alive until the launch has been issued."""
    if device.type != "cuda" or M <= FUSED_MAX_M_INT8["cuda"][torch.bfloat16]:
        return None
    nbytes = torch.cuda.get_device_properties(device).multi_processor_count * GEMM_WORKSPACE_BYTES_PER_SM
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def gemm_int8_workspace_args(work: torch.Tensor | None) -> tuple:
    return () if work is None else (work.data_ptr(), work.numel())


def _linear_int8(x, q, scale, layout, group_size, bias, act_quant) -> torch.Tensor:
    if layout not in L.INT8:
        raise ValueError(f"layout: expected one of {L.INT8}, got {layout!r}")
    check_tensor(q, "qweight", dtype=torch.int8, ndim=2)
    _check_same_device("linear_int8", x=x, qweight=q, weight_scale=scale, bias=bias)
    N, K = q.shape
    group_size = L.check_group_size(layout, group_size, K)
    _check_int8_weight(q, scale, layout, group_size)
    _check_x(x, K)
    _check_bias(bias, N)
    backend = backend_for(x.device)
    if backend == "reference":
        return reference.linear_int8(x, q, scale, layout, group_size, bias, act_quant)
    lead = x.shape[:-1]
    M = math.prod(lead)
    if M == 0:
        return x.new_empty(*lead, N)
    gn, gk = L.int8_tile(layout, group_size, K)
    out_dtype = x.dtype if backend == "cuda" else torch.float32
    b = None if bias is None else bias.to(out_dtype).contiguous()
    if act_quant:
        x2 = x.reshape(M, K).contiguous()
        xq, xs = _quantize_int8_tiles(x2, 1, L.act_group_k(layout, group_size, K), "x")
        y = torch.empty(M, N, dtype=out_dtype, device=x.device)
        work = gemm_int8_workspace(x.device, M)
        _native(_C.gemm_int8, x, xq.data_ptr(), xs.data_ptr(), q.data_ptr(), scale.data_ptr(),
                0 if b is None else b.data_ptr(), y.data_ptr(), L.DTYPE_CODES[out_dtype], M, N, K, xs.shape[1],
                gn, gk, optional=gemm_int8_workspace_args(work))
        return y.to(x.dtype).reshape(*lead, N)
    if M > fused_max_m(layout, backend, x.dtype):
        w = _dequantize_int8(q, scale, layout, group_size, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2 = x.reshape(M, K).to(out_dtype).contiguous()
    y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    _native(_C.linear_int8, x, x2.data_ptr(), L.DTYPE_CODES[out_dtype], q.data_ptr(), scale.data_ptr(),
            0 if b is None else b.data_ptr(), y.data_ptr(), M, N, K, gn, gk)
    return y.to(x.dtype).reshape(*lead, N)


# ----------------------------------------------------------------------------- double quantization
def _dequantize_absmax_nested(codes, nested_absmax, code, offset) -> torch.Tensor:
    _check_same_device("dequantize_absmax_nested", codes=codes, nested_absmax=nested_absmax, nested_quant_map=code)
    check_tensor(codes, "nested absmax codes", dtype=torch.uint8, ndim=1)
    G = codes.numel()
    check_tensor(nested_absmax, "nested_absmax", dtype=torch.float32, shape=(math.ceil(G / L.DQ_BLOCK),))
    check_tensor(code, "nested_quant_map", dtype=torch.float32, shape=(256,))
    offset_t = torch.as_tensor(offset, dtype=torch.float32)
    if offset_t.numel() != 1:
        _fail("nested_offset", "one value, got shape", "", tuple(offset_t.shape))
    if G == 0:
        raise ValueError("nested absmax codes: empty")
    if backend_for(codes.device) == "reference":
        return reference.dequantize_absmax_nested(codes, nested_absmax, code, offset_t.to(codes.device))
    out = torch.empty(G, dtype=torch.float32, device=codes.device)
    _native(_C.dequantize_absmax, codes, codes.data_ptr(), nested_absmax.data_ptr(), code.data_ptr(),
            float(offset_t), out.data_ptr(), G)
    return out


def quantize_absmax_nested(absmax: torch.Tensor):
    """Double-quantize 4-bit absmax (bitsandbytes compress_statistics): returns
    (codes uint8 [G], nested_absmax float32 [ceil(G/256)], quant_map float32 [256],
    offset float32 scalar). Runs once per layer at quantization time, in PyTorch."""
    check_tensor(absmax, "absmax", dtype=torch.float32, ndim=1)
    if absmax.numel() == 0:
        raise ValueError("absmax: empty")
    return reference.quantize_absmax_nested(absmax)


# ----------------------------------------------------------------------------- custom ops
# torch.compile sees these; eager calls skip the dispatcher (see module docstring).
@torch.library.custom_op("comfy_quant::quantize_4bit", mutates_args=())
def _op_quantize_4bit(x: torch.Tensor, codebook: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_4bit(x, codebook, group_size)


@_op_quantize_4bit.register_fake
def _(x, codebook, group_size):
    n = x.numel()
    return (x.new_empty((n + 1) // 2, dtype=torch.uint8),
            x.new_empty(math.ceil(n / group_size), dtype=torch.float32))


@torch.library.custom_op("comfy_quant::dequantize_4bit", mutates_args=())
def _op_dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, codebook: str, group_size: int,
                        shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return _dequantize_4bit(packed, absmax, codebook, group_size, shape, dtype)


@_op_dequantize_4bit.register_fake
def _(packed, absmax, codebook, group_size, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("comfy_quant::linear_4bit", mutates_args=())
def _op_linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, codebook: str,
                    group_size: int, shape: list[int], bias: torch.Tensor | None) -> torch.Tensor:
    return _linear_4bit(x, packed, absmax, codebook, group_size, shape, bias)


@_op_linear_4bit.register_fake
def _(x, packed, absmax, codebook, group_size, shape, bias):
    return x.new_empty(*x.shape[:-1], shape[0])


@torch.library.custom_op("comfy_quant::quantize_int8", mutates_args=())
def _op_quantize_int8(w: torch.Tensor, layout: str, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_int8(w, layout, group_size)


@_op_quantize_int8.register_fake
def _(w, layout, group_size):
    N, K = w.shape
    g = L.check_group_size(layout, group_size, K)
    return (w.new_empty(N, K, dtype=torch.int8),
            w.new_empty(L.scale_shape(layout, g, N, K), dtype=torch.float32))


@torch.library.custom_op("comfy_quant::dequantize_int8", mutates_args=())
def _op_dequantize_int8(q: torch.Tensor, scale: torch.Tensor, layout: str, group_size: int | None,
                        dtype: torch.dtype) -> torch.Tensor:
    return _dequantize_int8(q, scale, layout, group_size, dtype)


@_op_dequantize_int8.register_fake
def _(q, scale, layout, group_size, dtype):
    return q.new_empty(q.shape, dtype=dtype)


@torch.library.custom_op("comfy_quant::linear_int8", mutates_args=())
def _op_linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, layout: str,
                    group_size: int | None, bias: torch.Tensor | None, act_quant: bool) -> torch.Tensor:
    return _linear_int8(x, q, scale, layout, group_size, bias, act_quant)


@_op_linear_int8.register_fake
def _(x, q, scale, layout, group_size, bias, act_quant):
    return x.new_empty(*x.shape[:-1], q.shape[0])


@torch.library.custom_op("comfy_quant::quantize_int8_act", mutates_args=())
def _op_quantize_int8_act(x: torch.Tensor, group_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_int8_act(x, group_k)


@_op_quantize_int8_act.register_fake
def _(x, group_k):
    M, K = x.shape
    return x.new_empty(M, K, dtype=torch.int8), x.new_empty(M, math.ceil(K / group_k), dtype=torch.float32)


@torch.library.custom_op("comfy_quant::dequantize_absmax_nested", mutates_args=())
def _op_dequantize_absmax_nested(codes: torch.Tensor, nested_absmax: torch.Tensor, code: torch.Tensor,
                                 offset: float) -> torch.Tensor:
    return _dequantize_absmax_nested(codes, nested_absmax, code, offset)


@_op_dequantize_absmax_nested.register_fake
def _(codes, nested_absmax, code, offset):
    return codes.new_empty(codes.shape, dtype=torch.float32)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------- public API
def quantize_4bit(x: torch.Tensor, codebook: str = "nf4", group_size: int = 64):
    """x (any shape, float) -> (packed uint8 [ceil(n/2)], absmax float32 [ceil(n/group_size)])."""
    if _compiling():
        return torch.ops.comfy_quant.quantize_4bit(x, codebook, group_size)
    return _quantize_4bit(x, codebook, group_size)


def dequantize_4bit(packed, absmax, codebook: str, group_size: int, shape, dtype=torch.bfloat16):
    """Inverse of quantize_4bit, to a tensor of ``shape`` and ``dtype``."""
    if _compiling():
        return torch.ops.comfy_quant.dequantize_4bit(packed, absmax, codebook, group_size, list(shape), dtype)
    return _dequantize_4bit(packed, absmax, codebook, group_size, shape, dtype)


def _traced_as_dequantize_gemm(x, layout: str) -> bool:
    """Under torch.compile, a linear above the fused kernel's token range is traced as our
    dequantize op + F.linear (what it runs anyway), so that the GEMM is the compiler's: it
    can fuse bias, activation and residual into its epilogue, which an opaque op hides."""
    backend = backend_for(x.device)
    if backend not in FUSED_MAX_M_4BIT or x.dim() < 1:
        return False
    return math.prod(x.shape[:-1]) > fused_max_m(layout, backend, x.dtype)


def linear_4bit(x, packed, absmax, codebook: str, group_size: int, shape, bias=None):
    """y = x W^T + bias for a 4-bit weight W of ``shape`` (N, K); x [..., K] -> y [..., N] in x.dtype."""
    if _compiling():
        if _traced_as_dequantize_gemm(x, codebook):
            w = torch.ops.comfy_quant.dequantize_4bit(packed, absmax, codebook, group_size, list(shape), x.dtype)
            return F.linear(x, w, None if bias is None else bias.to(x.dtype))
        return torch.ops.comfy_quant.linear_4bit(x, packed, absmax, codebook, group_size, list(shape), bias)
    return _linear_4bit(x, packed, absmax, codebook, group_size, shape, bias)


def quantize_int8(w, layout: str, group_size: int | None = None):
    """w [N, K] -> (qweight int8 [N, K], weight_scale float32 in layouts.scale_shape)."""
    if _compiling():
        return torch.ops.comfy_quant.quantize_int8(w, layout, group_size)
    return _quantize_int8(w, layout, group_size)


def dequantize_int8(q, scale, layout: str, group_size: int | None, dtype=torch.bfloat16):
    if _compiling():
        return torch.ops.comfy_quant.dequantize_int8(q, scale, layout, group_size, dtype)
    return _dequantize_int8(q, scale, layout, group_size, dtype)


def linear_int8(x, q, scale, layout: str, group_size: int | None, bias=None, act_quant: bool = True):
    """y = x W^T + bias for an int8 weight: W8A8 with dynamic activation quantization
    (per token; per token per K-group for int8_block) or weight-only."""
    if _compiling():
        if not act_quant and _traced_as_dequantize_gemm(x, layout):
            w = torch.ops.comfy_quant.dequantize_int8(q, scale, layout, group_size, x.dtype)
            return F.linear(x, w, None if bias is None else bias.to(x.dtype))
        return torch.ops.comfy_quant.linear_int8(x, q, scale, layout, group_size, bias, act_quant)
    return _linear_int8(x, q, scale, layout, group_size, bias, act_quant)


def quantize_int8_act(x2d, group_k: int):
    """Dynamic activation quantization: x [M, K] -> (int8 [M, K], scale [M, ceil(K/group_k)])."""
    if _compiling():
        return torch.ops.comfy_quant.quantize_int8_act(x2d, group_k)
    return _quantize_int8_act(x2d, group_k)


def dequantize_absmax_nested(codes, nested_absmax, code, offset):
    """bitsandbytes double-quantized absmax -> float32 absmax [G]."""
    if _compiling():
        return torch.ops.comfy_quant.dequantize_absmax_nested(codes, nested_absmax, code, float(offset))
    return _dequantize_absmax_nested(codes, nested_absmax, code, offset)


def dynamic_map(device="cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 float32), the nested_quant_map."""
    return reference.dynamic_map(device)
