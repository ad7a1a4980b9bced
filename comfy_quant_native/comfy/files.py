"""A safetensors header check, without ComfyUI: names the file and the tensor that is
wrong (not safetensors, truncated, a size that does not match dtype and shape) before
anything reads the data. (Writing goes through formats.save_file.)"""

from __future__ import annotations

import json
import math
import os

from ..formats import FormatError

# Bytes per element of each safetensors dtype (sub-byte types are not size-checked).
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def read_safetensors_header(path: str) -> tuple[dict, dict]:
    """(tensors: name -> {"dtype", "shape", "data_offsets"}, metadata) of a safetensors
    file, after checking that every tensor lies inside the file with the size its dtype
    and shape need. Raises FormatError naming the file (and the tensor) otherwise."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(path, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise FormatError(path, f"not a safetensors file: the first 8 bytes give a header of {n} bytes "
                                        f"but the file has {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(path, f"cannot read the file ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(path, f"not a safetensors file: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(path, "not a safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(path, f"tensor {name!r}: malformed header entry {info!r}") from None
        if end > data_size or begin > end:
            raise FormatError(path, f"tensor {name!r}: bytes [{begin}, {end}) lie outside the {data_size} "
                                    f"bytes of data in the file (truncated?)")
        item = _DTYPE_BYTES.get(dtype)
        if item is not None and math.prod(shape) * item != end - begin:
            raise FormatError(path, f"tensor {name!r}: {dtype} {list(shape)} needs {math.prod(shape) * item} "
                                    f"bytes, the header gives {end - begin}")
    return header, metadata
