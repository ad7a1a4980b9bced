"""safetensors files in and out: load any supported form, write atomically.

    load_file(path, device="cpu") -> LoadedStateDict   (each tensor read once, lazily)
    probe_file(path) -> Probe                           (keys, header and JSON tensors only)
    save_file(path, tensors, metadata=None, overwrite=False, inputs=())
    atomic_output(path, overwrite=False, inputs=())     context manager: a temp path to
                                                        write, named ``path`` on success

Writing goes to a temporary file in the destination folder, is fsynced, then committed
atomically: ``path`` holds either its old content or the whole new file, never a partial
one, even on an error or KeyboardInterrupt. Without ``overwrite`` the commit is a hard
link, which fails if ``path`` appeared meanwhile (a rename would replace it); with it, a
rename. A path that is one of ``inputs`` (the files being converted) is refused even with
``overwrite``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch

from .common import FormatError, LoadedStateDict
from .detect import Probe, load_state_dict, probe
from .safetensors_header import read_safetensors_header


class SafetensorsMapping(Mapping):
    """A Mapping over an open ``safetensors.safe_open`` handle: tensors are read on access."""

    def __init__(self, handle):
        self._handle = handle
        self._keys = list(handle.keys())
        self._keyset = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keyset:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keyset


@contextmanager
def open_safetensors(path, device="cpu"):
    """(SafetensorsMapping, header metadata) of a file; FormatError naming the file if it is
    not a readable safetensors file (not one at all, truncated, corrupt header)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    read_safetensors_header(path)  # names the file and tensor of a truncated or foreign file
    try:
        handle = safe_open(path, framework="pt", device=str(device))
    except SafetensorError as e:
        raise FormatError(path, f"not a readable safetensors file ({e})") from None
    with handle as f:
        yield SafetensorsMapping(f), dict(f.metadata() or {})


def load_file(path, device="cpu") -> LoadedStateDict:
    """Load a quantized (or plain) safetensors file in any supported form."""
    with open_safetensors(path, device) as (sd, metadata):
        return load_state_dict(sd, metadata, source=os.fspath(path))


def probe_file(path) -> Probe:
    """The form and layer formats of a file, reading no weight data."""
    with open_safetensors(path) as (sd, metadata):
        return probe(sd, metadata, source=os.fspath(path))


# ----------------------------------------------------------------------------- writing
def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _fsync_dir(folder: str) -> None:
    if os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _refuse_inputs(path: str, inputs: list) -> None:
    for src in inputs:
        if os.path.lexists(path) and _same_file(src, path):
            raise ValueError(f"refusing to overwrite the input file {src}")


def _exists_error(path: str, detail: str) -> FileExistsError:
    return FileExistsError(f"{path} {detail} (pass overwrite=True to replace it)")


def _commit_new(tmp: str, path: str) -> None:
    """Give ``tmp`` the name ``path`` only if no file has that name, atomically: a hard
    link fails with EEXIST whatever appeared since the caller looked (a check followed by
    a rename would replace it). Where the filesystem has no hard links, fall back to check
    + rename, which leaves a short window for a file created by someone else."""
    link = getattr(os, "link", None)
    try:
        if link is None:
            raise OSError("no os.link on this platform")
        link(tmp, path)
    except FileExistsError:
        raise _exists_error(path, "appeared while the new file was being written; left it alone") from None
    except OSError:  # hard links unsupported here (FAT, some network or FUSE filesystems)
        if os.path.lexists(path):
            raise _exists_error(path, "exists") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextmanager
def atomic_output(path, *, overwrite: bool = False, inputs: Iterable = ()):
    """Yield a temporary path beside ``path``; on a clean exit fsync it and give it the name
    ``path`` (without ``overwrite``: only if that name is still free, see _commit_new), on
    any exception (KeyboardInterrupt included) delete it and re-raise."""
    path = os.path.abspath(os.fspath(path))
    inputs = [os.fspath(src) for src in inputs]
    _refuse_inputs(path, inputs)
    if os.path.lexists(path) and not overwrite:
        raise _exists_error(path, "exists")
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())
        if overwrite:
            _refuse_inputs(path, inputs)  # again: the name may have been pointed at an input meanwhile
            os.replace(tmp, path)
        else:
            _commit_new(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no storage shared between keys (safetensors refuses both)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{k}: expected a torch.Tensor, got {type(t).__name__}")
        t = t.contiguous()
        if t.numel():
            ptr = (t.device, t.untyped_storage().data_ptr())
            if ptr in seen:
                t = t.clone()
            else:
                seen.add(ptr)
        out[k] = t
    return out


def save_file(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
              overwrite: bool = False, inputs: Iterable = ()) -> None:
    """Write a safetensors file atomically (see atomic_output)."""
    from safetensors.torch import save_file as st_save

    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad}")
    tensors = _unshared(tensors)
    with atomic_output(path, overwrite=overwrite, inputs=inputs) as tmp:
        st_save(tensors, tmp, metadata=dict(metadata) if metadata is not None else None)
