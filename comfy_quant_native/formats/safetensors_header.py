"""The one safetensors header check: every reader (loader node, converter, load_file)
goes through it before touching tensor data, so a foreign, truncated or corrupt file
fails with a FormatError naming the file (and the tensor) rather than deep inside a read.

    8 bytes   little-endian u64 N, the header length
    N bytes   UTF-8 JSON: {"__metadata__": {str: str}, key: {"dtype", "shape",
              "data_offsets": [begin, end]}, ...}
    ...       the tensor bytes; offsets are relative to the end of the header and tile
              the data without holes or overlaps.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from .common import FormatError

HEADER_LIMIT = 100 * 1024 * 1024  # safetensors refuses headers above 100 MB too

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        DTYPE_NAMES[getattr(torch, _attr)] = _name
DTYPE_OF_NAME = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: torch.dtype | None  # None: a dtype this torch has no type for (kept as bytes)
    dtype_name: str
    shape: tuple[int, ...]
    begin: int  # byte offset in the file (absolute)
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_safetensors_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensors by key in file order, __metadata__, file size), after checking that every
    tensor lies inside the file with the size its dtype and shape need."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(path, f"not a safetensors file: {size} bytes, too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > HEADER_LIMIT or n < 2:
                raise FormatError(path, f"not a safetensors file: header length field {n} is implausible")
            if 8 + n > size:
                raise FormatError(path, f"truncated file: the header needs {8 + n} bytes, the file has {size}")
            raw = f.read(n)
    except FileNotFoundError:
        raise FormatError(path, "no such file") from None
    except IsADirectoryError:
        raise FormatError(path, "is a directory, not a safetensors file") from None
    except PermissionError:
        raise FormatError(path, "permission denied") from None
    except OSError as e:
        raise FormatError(path, f"cannot read the file ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(path, f"not a safetensors file: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(path, "not a safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    infos: list[TensorInfo] = []
    for key, entry in header.items():
        try:
            name = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            b, e = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(path, f"tensor {key!r}: malformed header entry {entry!r} ({exc})") from None
        if any(s < 0 for s in shape) or b < 0 or e < b:
            raise FormatError(path, f"tensor {key!r}: invalid shape {list(shape)} or offsets [{b}, {e}]")
        dtype = DTYPE_OF_NAME.get(name)
        if dtype is not None and (e - b) != math.prod(shape) * element_size(dtype):
            raise FormatError(path, f"tensor {key!r}: {name} {list(shape)} needs "
                                    f"{math.prod(shape) * element_size(dtype)} bytes, the header gives {e - b}")
        infos.append(TensorInfo(key, dtype, str(name), shape, data_start + b, data_start + e))
    infos.sort(key=lambda t: (t.begin, t.end))
    pos = data_start
    for t in infos:
        if t.begin != pos:
            raise FormatError(path, f"tensor {t.key!r}: data offsets leave a hole or overlap at byte {t.begin - data_start}")
        if t.end > size:
            raise FormatError(path, f"tensor {t.key!r}: its data ends at byte {t.end}, the file has {size} (truncated file)")
        pos = t.end
    return {t.key: t for t in infos}, dict(metadata), size
