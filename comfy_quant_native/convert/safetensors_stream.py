"""Streaming safetensors I/O: read one tensor at a time, write one tensor at a time.

safetensors' own ``save_file`` needs every tensor in memory; a 12B-parameter checkpoint
does not fit that way on an ordinary machine. The format is simple enough to stream:

    8 bytes   little-endian u64 N, the header length
    N bytes   UTF-8 JSON: {"__metadata__": {str: str}, key: {"dtype", "shape",
              "data_offsets": [begin, end]}, ...}; may end in spaces (padding)
    ...       the raw little-endian tensor bytes; offsets are relative to the end of
              the header and must tile the data without holes or overlaps.

Reading: ``SafetensorsReader`` validates the header against the file size (a truncated
or foreign file fails with a one-line ``ConvertError``) and maps one tensor's bytes at
a time (``mmap`` of that window, unmapped after use), so the resident set never holds
more than the tensors in flight, whatever the file size.

Writing: ``SafetensorsWriter`` takes the full list of output tensors (key, dtype, shape)
up front, lays them out (largest element size first, so every tensor starts aligned to
its element size, as safetensors itself orders them), writes the header, then accepts
the tensors in any order and ``pwrite``s each at its place in a temporary file beside
the output. ``commit()`` fsyncs, re-opens and verifies the file, and renames it over
the output; ``abort()`` removes it. The output never exists half written.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..formats.common import FormatError
from ..formats.safetensors_header import DTYPE_NAMES, TensorInfo, element_size, read_safetensors_header


class ConvertError(Exception):
    """A conversion that cannot proceed: the message is one line naming the file or
    tensor and the reason (the CLI prints it and exits with status 1)."""


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensors by key in file order, __metadata__, file size): the shared header check
    (formats.safetensors_header), as a one-line ConvertError, and every dtype must be one
    the converter can write back."""
    try:
        infos, metadata, size = read_safetensors_header(path)
    except FormatError as e:
        raise ConvertError(str(e)) from None
    for t in infos.values():
        if t.dtype is None:
            raise ConvertError(f"{path}: tensor {t.key!r}: dtype {t.dtype_name!r} is not one this converter "
                               f"reads (malformed header or a newer safetensors type)")
    return infos, metadata, size


class SafetensorsReader:
    """A safetensors file read one tensor at a time."""

    def __init__(self, path: str):
        self.path = path
        self.tensors, self.metadata, self.size = read_header(path)
        self._f = open(path, "rb")
        self._fd = self._f.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def fileno(self) -> int:
        return self._fd

    def read(self, key: str) -> torch.Tensor:
        """The tensor, in a buffer of its own (memory mapped, private copy-on-write, so
        the pages leave the resident set once the tensor is dropped)."""
        info = self.tensors[key]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        page = mmap.ALLOCATIONGRANULARITY
        start = info.begin - info.begin % page
        length = info.end - start
        mm = mmap.mmap(self._fd, length, offset=start, access=mmap.ACCESS_COPY)
        try:
            mm.madvise(mmap.MADV_SEQUENTIAL)
            mm.madvise(mmap.MADV_WILLNEED)
        except (AttributeError, OSError):  # pragma: no cover - madvise is advisory
            pass
        buf = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.begin - start)
        # The tensor keeps the mapping alive; when it is collected the mapping goes too.
        return buf.view(info.dtype).reshape(info.shape)

    def read_bytes(self, key: str) -> bytes:
        info = self.tensors[key]
        return os.pread(self._fd, info.nbytes, info.begin)


@dataclass(frozen=True)
class OutputSpec:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy where it is contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + (1 << 30)], offset + done)


class SafetensorsWriter:
    """Writes a safetensors file whose tensors are all declared up front (``specs``).
    Tensors arrive one at a time through ``write`` in any order; nothing is kept."""

    def __init__(self, path: str, specs: Iterable[OutputSpec], metadata: Mapping[str, str] | None = None,
                 reserve: bool = True):
        self.path = os.path.abspath(path)
        specs = list(specs)
        seen: set[str] = set()
        for s in specs:
            if s.key in seen:
                raise ConvertError(f"output tensor {s.key} declared twice")
            seen.add(s.key)
        # Largest element size first: every tensor then starts at a multiple of its
        # element size (the header is padded to 8), as safetensors orders its files.
        order = sorted(range(len(specs)), key=lambda i: -element_size(specs[i].dtype))
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.offsets: dict[str, tuple[int, int]] = {}
        self.specs = {s.key: s for s in specs}
        pos = 0
        for i in order:
            s = specs[i]
            header[s.key] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
            self.offsets[s.key] = (pos, pos + s.nbytes)
            pos += s.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)
        self.data_start = 8 + len(raw)
        self.total_size = self.data_start + pos
        self.written: set[str] = set()
        directory = os.path.dirname(self.path) or "."
        self._fd = None
        self.tmp_path = None
        try:
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".partial", dir=directory)
        except OSError as e:
            raise ConvertError(f"{self.path}: cannot create a file in {directory} ({e.strerror or e})") from None
        self._fd, self.tmp_path = fd, tmp
        try:
            _pwrite_all(fd, struct.pack("<Q", len(raw)) + raw, 0)
            if reserve and pos > 0 and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(fd, 0, self.total_size)
                except OSError as e:
                    if e.errno in (28,):  # ENOSPC: say so before any work is done
                        raise ConvertError(
                            f"{self.path}: not enough disk space for the output ({self.total_size / 1e9:.2f} GB)"
                        ) from None
                    os.ftruncate(fd, self.total_size)  # filesystems without fallocate
            else:
                os.ftruncate(fd, self.total_size)
        except BaseException:
            self.abort()
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()

    @property
    def fileno(self) -> int:
        return self._fd

    def write(self, key: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(key)
        if spec is None:
            raise ConvertError(f"output tensor {key} was not declared")
        if key in self.written:
            raise ConvertError(f"output tensor {key} written twice")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ConvertError(
                f"output tensor {key}: declared {spec.dtype} {list(spec.shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
        begin, _ = self.offsets[key]
        _pwrite_all(self._fd, tensor_bytes(tensor), self.data_start + begin)
        self.written.add(key)

    def copy_from(self, key: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` raw bytes of another file into tensor ``key`` (kept tensors:
        the kernel copies, nothing passes through Python)."""
        spec = self.specs.get(key)
        if spec is None or spec.nbytes != nbytes:
            raise ConvertError(f"output tensor {key}: copy of {nbytes} bytes does not match its declaration")
        if key in self.written:
            raise ConvertError(f"output tensor {key} written twice")
        begin, _ = self.offsets[key]
        dst = self.data_start + begin
        done = 0
        while done < nbytes:
            chunk = min(nbytes - done, 1 << 30)
            try:
                n = os.copy_file_range(src_fd, self._fd, chunk, src_offset + done, dst + done)
            except (AttributeError, OSError):
                n = 0
            if n <= 0:  # no copy_file_range here (or across filesystems): read + write
                data = os.pread(src_fd, chunk, src_offset + done)
                if len(data) != chunk:
                    raise ConvertError(f"input ended while copying tensor {key}")
                _pwrite_all(self._fd, data, dst + done)
                n = chunk
            done += n
        self.written.add(key)

    def missing(self) -> list[str]:
        return [k for k in self.specs if k not in self.written]

    def commit(self, verify=None) -> None:
        """fsync, verify (``verify(tmp_path)`` may raise), rename over the output."""
        missing = self.missing()
        if missing:
            self.abort()
            raise ConvertError(f"{len(missing)} output tensors were never written (first: {missing[0]})")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            if os.path.getsize(self.tmp_path) != self.total_size:
                raise ConvertError(f"{self.tmp_path}: size {os.path.getsize(self.tmp_path)} != {self.total_size}")
            if verify is not None:
                verify(self.tmp_path)
            os.replace(self.tmp_path, self.path)
            self.tmp_path = None
        except BaseException:
            self.abort()
            raise
        try:  # make the rename durable
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:  # pragma: no cover - some filesystems refuse directory fsync
            pass

    def abort(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self.tmp_path is not None:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass
            self.tmp_path = None
