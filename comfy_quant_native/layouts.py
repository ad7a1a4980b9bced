"""The layout vocabulary shared by every module: names, on-disk names, group sizes,
scale shapes and tables. Mirrors csrc/formats.h (tests/test_abi.py checks it).

Code names: nf4, fp4, int8_block, int8_lode, int8_row.
On-disk names (the ``format`` field of ``comfy_quant`` JSON): bnb_nf4, bnb_fp4,
int8_blockwise, int8_lodewise, int8_tensorwise.
"""

from __future__ import annotations

import math

import torch

LAYOUTS = ("nf4", "fp4", "int8_block", "int8_lode", "int8_row")
FOUR_BIT = ("nf4", "fp4")
INT8 = ("int8_block", "int8_lode", "int8_row")

DISK_NAME = {
    "nf4": "bnb_nf4",
    "fp4": "bnb_fp4",
    "int8_block": "int8_blockwise",
    "int8_lode": "int8_lodewise",
    "int8_row": "int8_tensorwise",
}
LAYOUT_OF_DISK_NAME = {v: k for k, v in DISK_NAME.items()}

# Mirrors of the C enums in csrc/formats.h.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.uint8: 3,
    torch.int8: 4,
    torch.int32: 5,
}
CODEBOOK_CODES = {"nf4": 0, "fp4": 1}
STATUS_CODES = {"ok": 0, "einval": 1, "enomem": 2, "enonfinite": 3, "ecuda": 4, "eunsupported": 5}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

GROUP_DEFAULT = {"nf4": 64, "fp4": 64, "int8_block": 128, "int8_lode": 128, "int8_row": None}
GROUP_RANGE_4BIT = (32, 4096)
GROUP_RANGE_INT8 = (32, 512)
DQ_BLOCK = 256  # bitsandbytes double quantization block
INT8_QMAX = 127

# NF4 (QLoRA) table: exact float32 values of bitsandbytes' get_4bit_type("nf4").
NF4_TABLE = [float.fromhex(h) for h in (
    "-0x1p+0", "-0x1.647362p-1", "-0x1.0cd66p-1", "-0x1.94654p-2",
    "-0x1.23449ap-2", "-0x1.7a6a7ep-3", "-0x1.74f0e2p-4", "0x0p+0",
    "0x1.45f5fep-4", "0x1.4995c6p-3", "0x1.f809bap-3", "0x1.5a0674p-2",
    "0x1.c3497p-2", "0x1.200f56p-1", "0x1.722766p-1", "0x1p+0",
)]
# bitsandbytes FP4: {0, 0.0625, 8, 12, 4, 6, 2, 3}/12 for codes 0-7, bit 3 the sign,
# so code 8 is -0.0 as in bitsandbytes' CUDA kernels (its CPU paths and quant_map: +0.0).
_FP4_POS = [0.0, 0.0625 / 12, 8 / 12, 12 / 12, 4 / 12, 6 / 12, 2 / 12, 3 / 12]
FP4_MAG_SORTED = [0.0, 0.0625 / 12, 2 / 12, 3 / 12, 4 / 12, 6 / 12, 8 / 12, 1.0]
FP4_MAG_CODE = [0, 1, 6, 7, 4, 5, 2, 3]
ZERO_CODE = {"nf4": 7, "fp4": 0}  # pads the last low nibble of an odd element count


def _f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


def codebook_table(codebook: str) -> torch.Tensor:
    """The 16 float32 values a 4-bit code stands for (index = code)."""
    if codebook == "nf4":
        return _f32(NF4_TABLE)
    if codebook == "fp4":
        pos = _f32(_FP4_POS)
        return torch.cat([pos, -pos])
    raise ValueError(f"codebook must be 'nf4' or 'fp4', got {codebook!r}")


def midpoints(sorted_values: torch.Tensor) -> torch.Tensor:
    """float32 midpoints between neighbours: float32 sum, then halved (exact)."""
    v = sorted_values.to(torch.float32)
    return (v[:-1] + v[1:]) * 0.5


def is_four_bit(layout: str) -> bool:
    return layout in FOUR_BIT


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    return layout


def default_group_size(layout: str) -> int | None:
    return GROUP_DEFAULT[check_layout(layout)]


def check_group_size(layout: str, group_size: int | None, K: int | None = None) -> int | None:
    """Validate a group size for ``layout`` and return it (the default where None).
    int8_row has no group size: its one group is the whole row."""
    check_layout(layout)
    if layout == "int8_row":
        if group_size not in (None, 0) and (K is None or group_size != K):
            raise ValueError(f"int8_row scales whole rows; group_size must be None, got {group_size}")
        return None
    if group_size is None:
        return GROUP_DEFAULT[layout]
    lo, hi = GROUP_RANGE_4BIT if layout in FOUR_BIT else GROUP_RANGE_INT8
    if (
        not isinstance(group_size, int)
        or group_size < lo
        or group_size > hi
        or group_size & (group_size - 1)
    ):
        raise ValueError(
            f"group_size for {layout} must be a power of two in [{lo}, {hi}]; got {group_size!r}"
        )
    return group_size


def int8_tile(layout: str, group_size: int | None, K: int) -> tuple[int, int]:
    """(group_n, group_k): the weight tile that one int8 scale covers."""
    if layout == "int8_block":
        return group_size, group_size
    if layout == "int8_lode":
        return 1, group_size
    if layout == "int8_row":
        return 1, max(K, 1)
    raise ValueError(f"not an int8 layout: {layout!r}")


def scale_shape(layout: str, group_size: int | None, N: int, K: int) -> tuple[int, ...]:
    """Shape of the scale tensor of an [N, K] weight in ``layout``."""
    if layout in FOUR_BIT:
        return (math.ceil(N * K / group_size),)
    if layout == "int8_row":
        return (N,)
    gn, gk = int8_tile(layout, group_size, K)
    return (math.ceil(N / gn), math.ceil(K / gk))


def packed_shape(layout: str, N: int, K: int) -> tuple[int, ...]:
    """Shape of the quantized data tensor of an [N, K] weight in ``layout``."""
    if layout in FOUR_BIT:
        return ((N * K + 1) // 2,)
    return (N, K)


def act_group_k(layout: str, group_size: int | None, K: int) -> int:
    """K-group of the dynamic activation scales in W8A8: per token per K-group for
    int8_block (DeepSeek-V3), per token for int8_lode and int8_row."""
    return group_size if layout == "int8_block" else max(K, 1)


def bits_per_weight(layout: str, group_size: int | None, N: int, K: int) -> float:
    n = N * K
    if n == 0:
        return 0.0
    scales = math.prod(scale_shape(layout, group_size, N, K))
    data_bits = 4 * n if layout in FOUR_BIT else 8 * n
    return (data_bits + 32 * scales) / n
