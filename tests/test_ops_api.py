"""The op API around the kernels: bad inputs raise clear exceptions at every entry
(comfy_quant_native.ops, torch.ops.comfy_quant.*, _C directly), backend selection, the
custom ops' fake implementations and torch.compile, the fallback without the native
extension, and QuantizedWeight."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from comfy_quant_native import NestedAbsmax, QuantizedWeight, QuantParams, ops, reference
from comfy_quant_native import layouts as L

ROOT = Path(__file__).resolve().parents[1]
C = ops._C
needs_c = pytest.mark.skipif(C is None, reason="native extension not built")


# ----------------------------------------------------------------------------- ops: bad inputs
def _int8_weight(N=24, K=96, layout="int8_lode", g=32):
    return ops.quantize_int8(torch.randn(N, K), layout, g)


BAD_OPS = [
    # (call, exception, regex the message must match: the tensor's name, expected, actual)
    (lambda: ops.quantize_int8(torch.randn(4, 64).to(torch.int32), "int8_lode", 32), TypeError,
     r"weight: expected dtype .*float32.*got torch.int32"),
    (lambda: ops.quantize_int8(torch.randn(2, 4, 64), "int8_lode", 32), ValueError,
     r"weight: expected a tensor of rank 2, got shape \(2, 4, 64\)"),
    (lambda: ops.quantize_int8(torch.randn(0, 64), "int8_lode", 32), ValueError, r"weight: cannot quantize an empty"),
    (lambda: ops.quantize_int8(torch.randn(4, 64), "int8_blocky", 32), ValueError, r"layout: expected one of"),
    (lambda: ops.quantize_int8(torch.randn(4, 64), "int8_block", 48), ValueError, r"power of two in \[32, 512\]; got 48"),
    (lambda: ops.quantize_int8(torch.randn(4, 64), "int8_block", 1024), ValueError, r"got 1024"),
    (lambda: ops.quantize_int8(torch.randn(4, 64), "int8_row", 32), ValueError, r"int8_row scales whole rows"),
    (lambda: ops.quantize_int8(torch.randn(64, 4).t(), "int8_lode", 32), ValueError, r"weight: expected a contiguous"),
    (lambda: ops.dequantize_int8(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 2), "int8_lode", 32),
     TypeError, r"qweight: expected dtype torch.int8, got torch.uint8"),
    (lambda: ops.dequantize_int8(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3), "int8_lode", 32),
     ValueError, r"weight_scale: expected shape \(4, 2\), got \(4, 3\)"),
    (lambda: ops.dequantize_int8(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2, dtype=torch.float16),
                                 "int8_lode", 32), TypeError, r"weight_scale: expected dtype torch.float32"),
    (lambda: ops.dequantize_int8(*_int8_weight(), "int8_lode", 32, torch.int8), TypeError, r"dtype: expected one of"),
    (lambda: ops.linear_int8(torch.randn(3, 95), *_int8_weight(), "int8_lode", 32), ValueError,
     r"x: expected last dimension \(in_features\) 96, got shape \(3, 95\)"),
    (lambda: ops.linear_int8(torch.randn(3, 96), *_int8_weight(), "int8_lode", 32, torch.randn(23)), ValueError,
     r"bias: expected shape \(24,\), got \(23,\)"),
    (lambda: ops.linear_int8(torch.randn(3, 96).to(torch.float64), *_int8_weight(), "int8_lode", 32), TypeError,
     r"x: expected dtype"),
    (lambda: ops.linear_int8(torch.randn(3, 96, device="meta"), *_int8_weight(), "int8_lode", 32), ValueError,
     r"linear_int8: expected all tensors on one device, got x on meta, qweight on cpu, weight_scale on cpu"),
    (lambda: ops.quantize_int8_act(torch.randn(3, 8), -1), ValueError, r"group_k: expected a positive int, got -1"),
    (lambda: ops.quantize_4bit(torch.randn(64), "nf5", 64), ValueError, r"codebook: expected 'nf4' or 'fp4'"),
    (lambda: ops.quantize_4bit(torch.randn(64), "nf4", 100), ValueError, r"group_size for nf4 must be a power of two"),
    (lambda: ops.dequantize_4bit(torch.zeros(32, dtype=torch.uint8), torch.ones(2), "nf4", 64, (8, 8)), ValueError,
     r"absmax: expected shape \(1,\), got \(2,\)"),
    (lambda: ops.linear_4bit(torch.randn(2, 8), torch.zeros(31, dtype=torch.uint8), torch.ones(1), "nf4", 64, (8, 8)),
     ValueError, r"packed: expected shape \(32,\), got \(31,\)"),
]


@pytest.mark.parametrize("case", range(len(BAD_OPS)))
def test_ops_bad_inputs_raise_clearly(case):
    call, exc, pattern = BAD_OPS[case]
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("layout", L.INT8)
def test_ops_nonfinite_weight_names_the_tensor(layout):
    w = torch.randn(8, 64)
    w[5, 7] = float("nan")
    g = None if layout == "int8_row" else 32
    for backend in ("cpu", "reference") if C is not None else ("reference",):
        with ops.use_backend(backend), pytest.raises(ValueError, match=r"cannot quantize weight of shape \(8, 64\).*NaN or Inf"):
            ops.quantize_int8(w, layout, g)


def _mixed_device_calls(other: str):
    """(op, call with one tensor moved to ``other``, that tensor's name, another tensor's
    name) for every op that takes several tensors."""
    packed, absmax = ops.quantize_4bit(torch.randn(8, 64), "nf4", 64)
    q, s = _int8_weight()
    codes, nested, qmap, offset = ops.quantize_absmax_nested(torch.rand(300))
    x4, x8, b = torch.randn(3, 64), torch.randn(3, 96), torch.randn(24)
    o = lambda t: t.to(other)  # noqa: E731
    return [
        ("dequantize_4bit", lambda: ops.dequantize_4bit(packed, o(absmax), "nf4", 64, (8, 64)), "absmax", "packed"),
        ("linear_4bit", lambda: ops.linear_4bit(o(x4), packed, absmax, "nf4", 64, (8, 64)), "x", "packed"),
        ("linear_4bit", lambda: ops.linear_4bit(x4, packed, absmax, "nf4", 64, (8, 64), o(torch.randn(8))),
         "bias", "absmax"),
        ("dequantize_int8", lambda: ops.dequantize_int8(q, o(s), "int8_lode", 32), "weight_scale", "qweight"),
        ("linear_int8", lambda: ops.linear_int8(x8, o(q), s, "int8_lode", 32, b), "qweight", "x"),
        ("linear_int8", lambda: ops.linear_int8(x8, q, s, "int8_lode", 32, o(b), act_quant=False),
         "bias", "weight_scale"),
        ("dequantize_absmax_nested", lambda: ops.dequantize_absmax_nested(codes, nested, o(qmap), offset),
         "nested_quant_map", "nested_absmax"),
    ]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_ops_refuse_tensors_on_different_devices(backend):
    """Every op with several tensors names each tensor and its device when they differ
    (a kernel given pointers of two devices would read the wrong memory)."""
    if backend == "cpu" and C is None:
        pytest.skip("native extension not built")
    with ops.use_backend(backend):
        for op, call, moved, kept in _mixed_device_calls("meta"):
            with pytest.raises(ValueError, match=rf"^{op}: expected all tensors on one device, got .*") as err:
                call()
            msg = str(err.value)
            assert f"{moved} on meta" in msg and f"{kept} on cpu" in msg, msg


def test_custom_ops_raise_the_same_errors():
    """torch.ops.comfy_quant.* run the same validation as the eager API."""
    q, s = _int8_weight()
    with pytest.raises(ValueError, match=r"x: expected last dimension \(in_features\) 96"):
        torch.ops.comfy_quant.linear_int8(torch.randn(3, 95), q, s, "int8_lode", 32, None, True)
    with pytest.raises(ValueError, match=r"weight_scale: expected shape"):
        torch.ops.comfy_quant.dequantize_int8(q, s[:, :1].contiguous(), "int8_lode", 32, torch.float32)
    with pytest.raises(ValueError, match=r"layout: expected one of"):
        torch.ops.comfy_quant.quantize_int8(torch.randn(4, 64), "int4", 32)
    with pytest.raises(ValueError, match=r"codebook"):
        torch.ops.comfy_quant.quantize_4bit(torch.randn(64), "e2m1", 64)
    with pytest.raises(ValueError, match=r"group_k"):
        torch.ops.comfy_quant.quantize_int8_act(torch.randn(2, 8), 0)


# ----------------------------------------------------------------------------- _C directly
class Bufs:
    """Valid small buffers, so that a missing check shows as a wrong answer, not a crash."""

    def __init__(self):
        self.f32 = torch.zeros(4096)
        self.bf16 = torch.zeros(4096, dtype=torch.bfloat16)
        self.i8 = torch.zeros(4096, dtype=torch.int8)
        self.u8 = torch.zeros(4096, dtype=torch.uint8)
        self.out = torch.zeros(4096)

    def p(self, name):
        return getattr(self, name).data_ptr()


def _c_calls(b: Bufs):
    """Valid argument tuples of every _C entry point (shape 8 x 64, group 32)."""
    F32, BF16 = L.DTYPE_CODES[torch.float32], L.DTYPE_CODES[torch.bfloat16]
    return {
        "quantize_4bit": [b.p("f32"), F32, b.p("u8"), b.p("out"), 512, 64, 0, 0, 0, 1],
        "dequantize_4bit": [b.p("u8"), b.p("f32"), b.p("out"), F32, 512, 64, 0, 0, 0, 1],
        "linear_4bit": [b.p("f32"), F32, b.p("u8"), b.p("f32"), 0, b.p("out"), 2, 8, 64, 64, 0, 0, 0, 1],
        "quantize_int8": [b.p("f32"), F32, b.p("i8"), b.p("out"), 8, 64, 1, 32, 0, 0, 1],
        "dequantize_int8": [b.p("i8"), b.p("f32"), b.p("out"), BF16, 8, 64, 1, 32, 0, 0, 1],
        "gemm_int8": [b.p("i8"), b.p("f32"), b.p("i8"), b.p("f32"), 0, b.p("out"), F32, 2, 8, 64, 1, 1, 32, 0, 0, 1],
        "linear_int8": [b.p("f32"), F32, b.p("i8"), b.p("f32"), 0, b.p("out"), 2, 8, 64, 1, 32, 0, 0, 1],
        "dequantize_absmax": [b.p("u8"), b.p("f32"), b.p("f32"), 0.5, b.p("out"), 300, 0, 0, 1],
    }


# Positions of arguments in _c_calls, per entry point.
ARGPOS = {
    "quantize_4bit": dict(ptr=0, out_ptr=3, dtype=1, size=4, codebook=6, device=7, group=5),
    "dequantize_4bit": dict(ptr=0, out_ptr=2, dtype=3, size=4, codebook=6, device=7, group=5),
    "linear_4bit": dict(ptr=0, out_ptr=5, dtype=1, size=7, codebook=10, device=11, group=9),
    "quantize_int8": dict(ptr=0, out_ptr=3, dtype=1, size=5, device=8),
    "dequantize_int8": dict(ptr=0, out_ptr=2, dtype=3, size=4, device=8),
    "gemm_int8": dict(ptr=0, out_ptr=5, dtype=6, size=8, device=13),
    "linear_int8": dict(ptr=0, out_ptr=5, dtype=1, size=7, device=11),
    "dequantize_absmax": dict(ptr=0, out_ptr=4, size=5, device=6),
}


@needs_c
def test_c_valid_calls_run():
    b = Bufs()
    for name, args in _c_calls(b).items():
        assert getattr(C, name)(*args) is None, name
        args[-1] = 0  # nthreads 0 runs inline
        assert getattr(C, name)(*args) is None, name


@needs_c
def test_c_gemm_int8_workspace_arguments():
    """The optional trailing (workspace, workspace_bytes) of gemm_int8: the CPU kernel
    ignores a workspace; a negative size, or a size without a pointer, is refused."""
    b = Bufs()
    args = _c_calls(b)["gemm_int8"]
    assert C.gemm_int8(*args, b.p("u8"), 64) is None
    assert C.gemm_int8(*args, 0, 0) is None
    with pytest.raises(ValueError, match=r"workspace: -1 bytes"):
        C.gemm_int8(*args, b.p("u8"), -1)
    with pytest.raises(ValueError, match=r"workspace: 64 bytes at"):
        C.gemm_int8(*args, 0, 64)


def test_gemm_int8_workspace_only_where_the_cuda_kernel_can_split():
    cpu = torch.device("cpu")
    assert ops.gemm_int8_workspace(cpu, 4608) is None
    assert ops.gemm_int8_workspace_args(None) == ()
    t = torch.empty(10, dtype=torch.uint8)
    assert ops.gemm_int8_workspace_args(t) == (t.data_ptr(), 10)


def _c_bad_cases():
    cases = []
    for name, pos in ARGPOS.items():
        cases.append((name, "null input", {pos["ptr"]: 0}, ValueError, r"null data pointer"))
        cases.append((name, "null output", {pos["out_ptr"]: 0}, ValueError, r"null data pointer"))
        cases.append((name, "negative size", {pos["size"]: -8}, ValueError, r"must be positive, got -8"))
        cases.append((name, "zero size", {pos["size"]: 0}, ValueError, r"must be positive, got 0"))
        cases.append((name, "CUDA without CUDA", {pos["device"]: 1}, RuntimeError, r"CUDA kernels are not loaded"))
        cases.append((name, "bad device", {pos["device"]: 7}, ValueError, r"device must be 0 \(cpu\) or 1 \(cuda\), got 7"))
        if "dtype" in pos:
            cases.append((name, "bad dtype code", {pos["dtype"]: 9}, ValueError, r"dtype code 9 is not"))
        if "codebook" in pos:
            cases.append((name, "bad codebook", {pos["codebook"]: 2}, ValueError, r"codebook code must be"))
            cases.append((name, "bad group", {pos["group"]: 48}, ValueError, r"group size must be a power of two"))
    cases += [
        ("quantize_int8", "misaligned float32", {0: "f32+1"}, ValueError, r"x: pointer 0x[0-9a-f]+ not aligned to its 4-byte"),
        ("dequantize_int8", "misaligned bf16 output", {2: "bf16+1", 3: 2}, ValueError, r"y: pointer .* 2-byte"),
        ("gemm_int8", "misaligned scales", {3: "f32+2"}, ValueError, r"ws: pointer .* not aligned"),
        ("quantize_int8", "overflowing sizes", {4: 2**40, 5: 2**40}, OverflowError, r"overflow"),
        ("gemm_int8", "overflowing M x N", {7: 2**62, 8: 8}, OverflowError, r"overflow"),
        ("linear_4bit", "overflowing weight", {8: 2**62, 7: 2**3}, OverflowError, r"overflow"),
        ("dequantize_absmax", "overflowing count", {5: 2**62}, OverflowError, r"overflow"),
        ("quantize_int8", "zero group_n", {6: 0}, ValueError, r"group_n must be positive"),
        ("dequantize_int8", "negative group_k", {7: -32}, ValueError, r"group_k must be positive"),
        ("gemm_int8", "bad xs_groups", {10: 3}, ValueError, r"xs_groups must be 1 or ceil\(K/gk\) = 2, got 3"),
        ("gemm_int8", "CPU output not float32", {6: 2}, ValueError, r"CPU kernel takes float32"),
        ("linear_int8", "CPU input not float32", {1: 1}, ValueError, r"CPU kernel takes float32"),
        ("linear_4bit", "CPU input float16", {1: 1}, ValueError, r"CPU kernel takes float32 \(code 0\), or bfloat16"),
        ("linear_int8", "misaligned bias", {4: "f32+1"}, ValueError, r"bias: pointer"),
    ]
    return cases


BAD_C = _c_bad_cases()


@needs_c
@pytest.mark.parametrize("case", BAD_C, ids=[f"{c[0]}-{c[1]}" for c in BAD_C])
def test_c_bad_arguments_raise(case):
    name, _, changes, exc, pattern = case
    b = Bufs()
    args = _c_calls(b)[name]
    for i, v in changes.items():
        if isinstance(v, str):  # "buffer+offset"
            buf, off = v.split("+")
            v = b.p(buf) + int(off)
        args[i] = v
    with pytest.raises(exc, match=pattern):
        getattr(C, name)(*args)


# Pointer and stream arguments of every entry point: position -> name in the messages.
POINTERS = {
    "quantize_4bit": {0: "x", 2: "packed", 3: "absmax", 8: "stream"},
    "dequantize_4bit": {0: "packed", 1: "absmax", 2: "y", 8: "stream"},
    "linear_4bit": {0: "x", 2: "packed", 3: "absmax", 4: "bias", 5: "y", 12: "stream"},
    "quantize_int8": {0: "x", 2: "q", 3: "scale", 9: "stream"},
    "dequantize_int8": {0: "q", 1: "scale", 2: "y", 9: "stream"},
    "gemm_int8": {0: "xq", 1: "xs", 2: "wq", 3: "ws", 4: "bias", 5: "y", 14: "stream"},
    "linear_int8": {0: "x", 2: "wq", 3: "ws", 4: "bias", 5: "y", 12: "stream"},
    "dequantize_absmax": {0: "codes", 1: "nested_absmax", 2: "quant_map", 4: "absmax", 7: "stream"},
}
OPTIONAL = {"bias", "stream"}  # 0 means none / the default stream
POINTER_ARGS = [(name, i, arg) for name, args in POINTERS.items() for i, arg in args.items()]


@needs_c
@pytest.mark.parametrize("name,i,arg", POINTER_ARGS, ids=[f"{n}-{a}" for n, _, a in POINTER_ARGS])
def test_c_pointer_arguments_reject_negative_wide_and_null(name, i, arg):
    """"K" parsing took -8 as 2**64 - 8 (a wild pointer for the kernel) and masked ints
    wider than 64 bits; every pointer and stream argument now says which one is bad."""
    b = Bufs()
    valid = _c_calls(b)[name]
    assert isinstance(valid[i], int) and not isinstance(valid[i], bool), f"{name}[{i}] is not a pointer slot"

    def call(v):
        args = list(valid)
        args[i] = v
        return getattr(C, name)(*args)

    for v in (-1, -8, -(2**63), -(2**64) + 8):
        with pytest.raises(ValueError, match=rf"^{arg}: a pointer cannot be negative, got {v}$"):
            call(v)
    for v in (2**64, 2**64 + valid[i], 2**200):
        with pytest.raises(OverflowError, match=rf"^{arg}: pointer {v} does not fit"):
            call(v)
    for v in (True, 1.0, None, "0"):
        with pytest.raises(TypeError, match=rf"^{arg}: a pointer must be an int"):
            call(v)
    if arg in OPTIONAL:
        assert call(0) is None
    else:
        with pytest.raises(ValueError, match=rf"^{arg}: null data pointer$"):
            call(0)
    assert call(valid[i]) is None
    # The table names every required pointer of the entry point (the valid call's addresses).
    required = {j for j, a in POINTERS[name].items() if a not in OPTIONAL}
    assert required == {j for j, v in enumerate(valid) if isinstance(v, int) and v > 2**20}


@needs_c
def test_c_argument_count_and_types():
    with pytest.raises(TypeError):
        C.quantize_int8(1, 2, 3)
    with pytest.raises(TypeError):
        C.dequantize_int8("x", 0, 0, 0, 8, 64, 1, 32, 0, 0, 1)
    with pytest.raises(ValueError, match="unknown CPU level 'sse9'"):
        C.set_cpu_level("sse9")


@needs_c
def test_c_nonfinite_reports_group():
    x = torch.zeros(8, 64)
    x[5, 40] = float("inf")
    q = torch.empty(8, 64, dtype=torch.int8)
    s = torch.empty(8, 2)
    with pytest.raises(ValueError, match=r"NaN or Inf \(first in group 11\)"):
        C.quantize_int8(x.data_ptr(), 0, q.data_ptr(), s.data_ptr(), 8, 64, 1, 32, 0, 0, 1)


# ----------------------------------------------------------------------------- backends
def test_list_backends_and_use_backend():
    reasons = ops.list_backends()
    assert set(reasons) == {"cuda", "cpu", "reference"} and reasons["reference"] is None
    if not torch.cuda.is_available():
        assert reasons["cuda"]
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
            with ops.use_backend("cuda"):
                pass
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("tpu"):
            pass
    cpu = torch.device("cpu")
    native = "cpu" if C is not None else "reference"
    assert ops.backend_for(cpu) == native
    with ops.use_backend("reference"):
        assert ops.backend_for(cpu) == "reference"
        seen = []
        t = threading.Thread(target=lambda: seen.append(ops.backend_for(cpu)))
        t.start()
        t.join()
        assert seen == [native]  # the choice is per thread
        if C is not None:
            with ops.use_backend("cpu"):
                assert ops.backend_for(cpu) == "cpu"
            assert ops.backend_for(cpu) == "reference"  # restored after nesting
    assert ops.backend_for(cpu) == native
    assert ops.backend_for(torch.device("meta")) == "reference"


# ----------------------------------------------------------------------------- custom ops under tracing
def _op_cases():
    w = torch.randn(64, 96)
    q, s = ops.quantize_int8(w, "int8_lode", 32)
    p, a = ops.quantize_4bit(w, "nf4", 64)
    x, b = torch.randn(3, 96), torch.randn(64)
    codes, nested, qmap, off = ops.quantize_absmax_nested(torch.rand(300))
    return {
        "quantize_4bit": (w, "nf4", 64),
        "dequantize_4bit": (p, a, "nf4", 64, [64, 96], torch.bfloat16),
        "linear_4bit": (x, p, a, "nf4", 64, [64, 96], b),
        "quantize_int8": (w, "int8_block", 32),
        "dequantize_int8": (q, s, "int8_lode", 32, torch.float32),
        "linear_int8": (x, q, s, "int8_lode", 32, b, True),
        "quantize_int8_act": (x, 32),
        "dequantize_absmax_nested": (codes, nested, qmap, float(off)),
    }


OP_NAMES = list(_op_cases())


@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(name):
    """Schema, fake tensor, autograd registration and AOT dispatch checks of torch.library."""
    op = getattr(torch.ops.comfy_quant, name).default
    result = torch.library.opcheck(op, _op_cases()[name])
    assert set(result.values()) == {"SUCCESS"}, result


def test_fake_implementations_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _op_cases()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = {k: tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in v) for k, v in real.items()}
        lin = torch.ops.comfy_quant.linear_int8(torch.empty(2, 5, 96), *fake["linear_int8"][1:])
        assert lin.shape == (2, 5, 64) and lin.dtype == torch.float32
        q, s = torch.ops.comfy_quant.quantize_int8(torch.empty(130, 300, dtype=torch.bfloat16), "int8_block", 128)
        assert q.shape == (130, 300) and q.dtype == torch.int8 and s.shape == (2, 3)
        q, s = torch.ops.comfy_quant.quantize_int8(torch.empty(7, 300), "int8_row", None)
        assert s.shape == (7,)
        xq, xs = torch.ops.comfy_quant.quantize_int8_act(torch.empty(5, 257), 128)
        assert xq.shape == (5, 257) and xs.shape == (5, 3)
        y = torch.ops.comfy_quant.dequantize_int8(*fake["dequantize_int8"][:4], torch.float16)
        assert y.shape == (64, 96) and y.dtype == torch.float16
        p, a = torch.ops.comfy_quant.quantize_4bit(torch.empty(3, 7), "fp4", 32)
        assert p.shape == (11,) and a.shape == (1,)


def test_torch_compile_fullgraph_linear_ops():
    """A module calling ops.linear_4bit and ops.linear_int8 compiles with fullgraph=True
    (no graph breaks) and gives the eager result (~5 s on 2 cores)."""
    torch._dynamo.reset()
    w = torch.randn(64, 96)
    q, s = ops.quantize_int8(w, "int8_lode", 32)
    p, a = ops.quantize_4bit(w, "nf4", 64)
    b = torch.randn(64)

    class Block(torch.nn.Module):
        def forward(self, x):
            h = ops.linear_4bit(x, p, a, "nf4", 64, (64, 96), b)
            return h + ops.linear_int8(x, q, s, "int8_lode", 32, b, True) + ops.linear_int8(x, q, s, "int8_lode", 32, None, False)

    m, x = Block(), torch.randn(3, 96)
    compiled = torch.compile(m, fullgraph=True)
    assert torch.equal(compiled(x), m(x))


# ----------------------------------------------------------------------------- fallback
FALLBACK_SCRIPT = textwrap.dedent("""
    import importlib.abc, logging, sys, warnings
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "comfy_quant_native._C":
                raise ImportError("blocked for the fallback test")
    sys.meta_path.insert(0, Block())
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    logging.getLogger().addHandler(Keep(level=logging.WARNING))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import comfy_quant_native as cq
        from comfy_quant_native import ops
    ours = [r for r in records if r.name.startswith("comfy_quant_native")]
    ours_py = [w for w in caught if "comfy_quant_native" in str(w.filename)]
    assert ops._C is None, "the blocker did not hide _C"
    torch.manual_seed(0)
    w = torch.randn(40, 70)
    x = torch.randn(5, 70)
    out = {}
    for layout, g in (("int8_block", 32), ("int8_lode", 32), ("int8_row", None)):
        q, s = ops.quantize_int8(w, layout, g)
        out[layout] = (q, s, ops.dequantize_int8(q, s, layout, g, torch.bfloat16),
                       ops.linear_int8(x, q, s, layout, g, None, True), ops.linear_int8(x, q, s, layout, g, None, False))
    out["nf4"] = ops.quantize_4bit(w, "nf4", 64)
    torch.save({"out": out, "messages": [r.getMessage() for r in ours] + [str(w.message) for w in ours_py],
                "cpu_reason": ops.list_backends()["cpu"]}, sys.argv[1])
""")


def test_fallback_without_native_extension(tmp_path):
    path = tmp_path / "fallback.pt"
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(path)
    assert len(got["messages"]) == 1, got["messages"]
    msg = got["messages"][0]
    assert "native extension not built" in msg and "reference" in msg and "blocked for the fallback test" in msg
    assert "not built" in got["cpu_reason"]
    torch.manual_seed(0)
    w = torch.randn(40, 70)
    x = torch.randn(5, 70)
    for layout, g in (("int8_block", 32), ("int8_lode", 32), ("int8_row", None)):
        q, s = reference.quantize_int8(w, layout, g)
        want = (q, s, reference.dequantize_int8(q, s, layout, g, torch.bfloat16),
                reference.linear_int8(x, q, s, layout, g, None, True), reference.linear_int8(x, q, s, layout, g, None, False))
        for a, b in zip(got["out"][layout], want):
            assert torch.equal(a, b), layout
        if C is not None:  # and the native path agrees with what the fallback computed
            qn, sn = ops.quantize_int8(w, layout, g)
            assert torch.equal(qn, q) and torch.equal(sn, s)
    for a, b in zip(got["out"]["nf4"], reference.quantize_4bit(w, "nf4", 64)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- QuantizedWeight
@pytest.mark.parametrize("layout,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True),
                                                 ("int8_block", False), ("int8_lode", False), ("int8_row", False)])
def test_quantized_weight_round_trip(layout, double_quant):
    N, K = 48, 96
    w = torch.randn(N, K, dtype=torch.bfloat16)
    g = 32 if layout.startswith("int8") and layout != "int8_row" else (None if layout == "int8_row" else 64)
    qw = QuantizedWeight.from_float(w, layout, g, double_quant=double_quant)
    assert qw.layout == layout and qw.shape == (N, K) and qw.params.orig_dtype == torch.bfloat16
    assert (qw.nested is not None) == double_quant and ("double_quant" in repr(qw)) == double_quant
    deq = qw.dequantize()
    assert deq.dtype == torch.bfloat16 and deq.shape == (N, K)
    if layout in L.INT8:
        assert torch.equal(deq, ops.dequantize_int8(qw.data, qw.scale, layout, g, torch.bfloat16))
        err = (deq.float() - w.float()).abs()
        assert bool((err <= 0.51 * qw.scale.max() + 2**-8 * w.float().abs()).all())
    else:
        assert torch.equal(deq, ops.dequantize_4bit(qw.data, qw.scale, layout, g, (N, K), torch.bfloat16))
        if double_quant:
            assert torch.equal(qw.scale, qw.nested.dequantize())
    x, bias = torch.randn(2, 3, K), torch.randn(N)
    y = qw.linear(x, bias)
    assert y.shape == (2, 3, N)
    want = torch.nn.functional.linear(x, qw.dequantize(torch.float32), bias)
    assert torch.allclose(y, want, rtol=0.05, atol=0.05 * float(want.abs().max()))  # W8A8 adds activation rounding
    if layout in L.INT8:
        assert torch.allclose(qw.linear(x, bias, act_quant=False), want, rtol=1e-4, atol=1e-3)
    assert qw.to("cpu") is qw and qw.to(None) is qw
    meta = qw.to("meta")
    assert meta.device.type == "meta" and meta.params == qw.params and meta.data.shape == qw.data.shape
    if double_quant:
        assert meta.nested.codes.device.type == "meta"
    assert qw.nbytes == qw.data.numel() * qw.data.element_size() + qw.scale.numel() * 4
    assert 4 < qw.bits_per_weight() < 9.5


def test_quantized_weight_validate_errors():
    q, s = ops.quantize_int8(torch.randn(8, 64), "int8_lode", 32)
    params = QuantParams("int8_lode", 32, (8, 64))
    QuantizedWeight(params, q, s)  # valid
    with pytest.raises(ValueError, match=r"qweight: expected shape \(8, 64\), got \(8, 32\)"):
        QuantizedWeight(params, q[:, :32].contiguous(), s)
    with pytest.raises(TypeError, match=r"qweight: expected dtype torch.int8"):
        QuantizedWeight(params, q.to(torch.uint8), s)
    with pytest.raises(ValueError, match=r"weight_scale: expected shape \(8, 2\), got \(8,\)"):
        QuantizedWeight(params, q, s[:, 0].contiguous())
    with pytest.raises(ValueError, match=r"weight_scale: expected device cpu, got meta"):
        QuantizedWeight(params, q, s.to("meta"))
    p4 = QuantParams("nf4", 64, (8, 64))
    packed, absmax = ops.quantize_4bit(torch.randn(8, 64), "nf4", 64)
    QuantizedWeight(p4, packed, absmax)
    with pytest.raises(ValueError, match=r"packed weight: expected shape \(256,\)"):
        QuantizedWeight(p4, packed[:-1], absmax)
    with pytest.raises(ValueError, match=r"absmax: expected shape \(8,\)"):
        QuantizedWeight(p4, packed, absmax[:-1])
    with pytest.raises(ValueError, match=r"layout must be one of"):
        QuantParams("q4_0", 32, (8, 64))
    with pytest.raises(ValueError, match=r"int8_block needs a 2-D \[N, K\] weight"):
        QuantParams("int8_block", 32, (8, 8, 8))
    with pytest.raises(ValueError, match=r"power of two"):
        QuantParams("nf4", 65, (8, 64))
    with pytest.raises(ValueError, match=r"quantizes 2-D \[N, K\] weights"):
        QuantizedWeight.from_float(torch.randn(4, 4, 4), "int8_lode", 32)
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        QuantizedWeight.from_float(torch.full((4, 64), float("inf")), "int8_row")
    assert isinstance(NestedAbsmax, type)
