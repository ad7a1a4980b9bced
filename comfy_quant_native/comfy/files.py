"""Files, without ComfyUI: a safetensors header check that names what is wrong, and an
atomic safetensors writer that never overwrites unless told to."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping

import torch

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


def _unshared(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing memory (safetensors refuses shared ones)."""
    out, seen = {}, set()
    for k, t in sd.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.nbytes and storage in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_safetensors_atomic(sd: Mapping[str, torch.Tensor], path: str, metadata: dict | None = None,
                            overwrite: bool = False) -> str:
    """Write ``sd`` to ``path`` through a temporary file in the same folder, then move it
    into place: readers never see a half-written file and a failure leaves nothing behind.
    An existing file is replaced only with ``overwrite``; without it even a file that
    appears during the write is kept (hard link, which fails on an existing name)."""
    from safetensors.torch import save_file

    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; enable 'overwrite' to replace it")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial", dir=folder)
    os.close(fd)
    try:
        save_file(_unshared(sd), tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; enable 'overwrite' to replace it") from None
            except OSError:  # no hard links on this file system
                if os.path.exists(path):
                    raise FileExistsError(f"{path} exists; enable 'overwrite' to replace it") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
