"""The Python mirror of the C contract (comfy_quant_native/layouts.py) equals the numbers
in csrc/formats.h, read two ways: from the built extension (_C.constants()) and by
parsing the header text, so the test also runs where the extension is not built."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from comfy_quant_native import layouts as L
from comfy_quant_native import ops

ROOT = Path(__file__).resolve().parents[1]
FORMATS_H = (ROOT / "csrc" / "formats.h").read_text()
KERNELS_H = (ROOT / "csrc" / "kernels.h").read_text()

DTYPE_NAMES = {torch.float32: "CQ_F32", torch.float16: "CQ_F16", torch.bfloat16: "CQ_BF16",
               torch.uint8: "CQ_U8", torch.int8: "CQ_I8", torch.int32: "CQ_I32"}


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def header_enum(name: str, text: str = FORMATS_H) -> dict[str, int]:
    body = re.search(r"enum\s+%s\s*\{(.*?)\};" % name, _strip_comments(text), re.S)
    assert body, f"enum {name} not found"
    out = {}
    for item in body.group(1).split(","):
        if item.strip():
            key, value = (p.strip() for p in item.split("="))
            out[key] = int(value, 0)
    return out


def header_define(name: str) -> str:
    m = re.search(r"^#define\s+%s\s+(.+?)\s*$" % name, FORMATS_H, re.M)
    assert m, f"#define {name} not found"
    return m.group(1)


def header_table(name: str) -> list[str]:
    m = re.search(r"#define\s+%s\s*\{(.*?)\}" % name, FORMATS_H, re.S)
    assert m, f"table {name} not found"
    return [v.strip() for v in m.group(1).replace("\\", " ").split(",") if v.strip()]


def c_float(expr: str) -> float:
    """A float32 literal or quotient of literals from the header ('0x1.6p-1f', '1.0f / 3.0f')
    evaluated as float32 arithmetic, as the C compiler does."""
    parts = [p.strip().rstrip("f") for p in expr.split("/")]
    vals = [float.fromhex(p) if "0x" in p else float(p) for p in parts]
    out = torch.tensor(vals[0], dtype=torch.float32)
    for v in vals[1:]:
        out = out / torch.tensor(v, dtype=torch.float32)
    return float(out)


# ----------------------------------------------------------------------------- header text
def test_dtype_codes_match_header():
    enum = header_enum("cq_dtype")
    assert {DTYPE_NAMES[d]: c for d, c in L.DTYPE_CODES.items()} == enum


def test_codebook_and_status_codes_match_header():
    assert {f"CQ_{k.upper()}": v for k, v in L.CODEBOOK_CODES.items()} == header_enum("cq_codebook")
    assert {f"CQ_{k.upper()}": v for k, v in L.STATUS_CODES.items()} == header_enum("cq_status")


def test_group_sizes_and_blocks_match_header():
    d = lambda n: int(header_define(n))  # noqa: E731
    assert L.GROUP_RANGE_4BIT == (d("CQ_4BIT_GROUP_MIN"), d("CQ_4BIT_GROUP_MAX"))
    assert L.GROUP_RANGE_INT8 == (d("CQ_INT8_GROUP_MIN"), d("CQ_INT8_GROUP_MAX"))
    assert L.GROUP_DEFAULT["nf4"] == L.GROUP_DEFAULT["fp4"] == d("CQ_4BIT_GROUP_DEFAULT")
    assert L.GROUP_DEFAULT["int8_block"] == L.GROUP_DEFAULT["int8_lode"] == d("CQ_INT8_GROUP_DEFAULT")
    assert L.GROUP_DEFAULT["int8_row"] is None
    assert L.DQ_BLOCK == d("CQ_DQ_BLOCK")
    assert L.INT8_QMAX == d("CQ_INT8_QMAX")
    assert L.ZERO_CODE == {"nf4": d("CQ_NF4_ZERO_CODE"), "fp4": d("CQ_FP4_ZERO_CODE")}


def test_codebook_tables_match_header():
    nf4 = [c_float(v) for v in header_table("CQ_NF4_TABLE_INIT")]
    assert nf4 == L.codebook_table("nf4").tolist()
    fp4 = [c_float(v.lstrip("-")) * (-1 if v.startswith("-") else 1) for v in header_table("CQ_FP4_TABLE_INIT")]
    got = L.codebook_table("fp4")
    assert fp4 == got.tolist()
    assert got[8].item() == 0.0 and str(got[8].item()) == "-0.0"  # code 8 is -0.0
    assert [c_float(v) for v in header_table("CQ_FP4_MAG_SORTED_INIT")] == \
        torch.tensor(L.FP4_MAG_SORTED, dtype=torch.float64).float().tolist()
    assert [int(v) for v in header_table("CQ_FP4_MAG_CODE_INIT")] == L.FP4_MAG_CODE


def test_cpu_level_names_match_kernels_h():
    enum = header_enum("cq_cpu_level", KERNELS_H)
    levels = sorted((v, k) for k, v in enum.items() if k != "CQ_CPU_LEVELS")
    assert enum["CQ_CPU_LEVELS"] == len(levels)
    names = [k[len("CQ_CPU_"):].lower().replace("_", "") for _, k in levels]
    assert names == ["ref", "avx2", "avx512", "avx512vnni", "avx512bf16"]
    if ops._C is not None:
        assert set(ops._C.cpu_levels()) <= set(names) and ops._C.cpu_levels()[0] == "ref"
        assert ops._C.cpu_level() in ops._C.cpu_levels()


# ----------------------------------------------------------------------------- built extension
@pytest.fixture
def constants():
    if ops._C is None:
        pytest.skip("native extension not built")
    return ops._C.constants()


def test_mirror_equals_extension(constants):
    assert {DTYPE_NAMES[d]: c for d, c in L.DTYPE_CODES.items()} == {k: constants[k] for k in DTYPE_NAMES.values()}
    for name, code in L.CODEBOOK_CODES.items():
        assert constants[f"CQ_{name.upper()}"] == code
    for name, code in L.STATUS_CODES.items():
        assert constants[f"CQ_{name.upper()}"] == code
    assert L.GROUP_RANGE_4BIT == (constants["CQ_4BIT_GROUP_MIN"], constants["CQ_4BIT_GROUP_MAX"])
    assert L.GROUP_RANGE_INT8 == (constants["CQ_INT8_GROUP_MIN"], constants["CQ_INT8_GROUP_MAX"])
    assert L.GROUP_DEFAULT["nf4"] == constants["CQ_4BIT_GROUP_DEFAULT"]
    assert L.GROUP_DEFAULT["int8_block"] == constants["CQ_INT8_GROUP_DEFAULT"]
    assert L.DQ_BLOCK == constants["CQ_DQ_BLOCK"]


def test_extension_equals_header_text(constants):
    """Every constant the extension reports is the number the header says."""
    enums = {**header_enum("cq_dtype"), **header_enum("cq_codebook"), **header_enum("cq_status")}
    for key, value in constants.items():
        if key in enums:
            assert value == enums[key], key
        elif key != "CQ_CUDA_API_VERSION":
            assert value == int(header_define(key)), key


def test_cuda_knob_names_match_common_cuh():
    """ops.CUDA_KNOBS (the names tests and benchmarks force) are the CUDA backend's enum
    Knob (csrc/cuda/common.cuh), KNOB_GEMM_INT8 -> "gemm_int8", each at its number: a
    knob added or renumbered on one side only would silently force the wrong variant."""
    text = (ROOT / "csrc" / "cuda" / "common.cuh").read_text()
    knobs = header_enum("Knob", text)
    count = knobs.pop("KNOB_COUNT")
    assert {k.removeprefix("KNOB_").lower(): v for k, v in knobs.items()} == ops.CUDA_KNOBS
    assert sorted(ops.CUDA_KNOBS.values()) == list(range(count))
