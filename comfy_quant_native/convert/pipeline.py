"""convert_file: a whole checkpoint, streamed tensor by tensor.

    from comfy_quant_native import convert_file
    summary = convert_file("flux1-dev.safetensors", "flux1-dev_nf4.safetensors", format="nf4")
    print(summary)

Memory: one input tensor is mapped at a time (and the next one is read ahead by the
kernel), its quantized form is written by a writer thread with ``pwrite`` while the next
is quantized; tensors kept in high precision are copied file to file by the kernel
(``copy_file_range``) without entering Python. Peak memory is the interpreter and torch
(~0.4 GB) plus a few tensors: 0.5-1.2 GB for Flux.1-dev (docs/BENCHMARKS.md).

Safety: the output is written to a temporary file beside it, fsynced, re-opened and
checked (every key, dtype and shape against the plan; every quantized layer's keys and
scale shapes through this package's loader), then renamed. Any error or Ctrl-C removes
the temporary file; the input is opened read-only and never the output.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .. import __version__
from .. import formats
from .. import layouts as L
from .converter import FORMATS, Converter, layer_prefix
from .inspect import quantized_reason
from ..presets import MIN_PARAMS, Decision, LayerSelector
from .safetensors_stream import (
    ConvertError, OutputSpec, SafetensorsReader, SafetensorsWriter, read_header,
)

METADATA_KEY = "comfy_quant_native.convert"
READ_AHEAD = 2  # tensors whose reading the kernel starts while one is quantized
WRITE_QUEUE = 4  # output tensors waiting for the writer thread


@dataclass
class ConvertSummary:
    input: str
    output: str
    format: str
    group_size: int | None
    rounding: str
    preset: str
    architecture: str
    device: str
    tensors: int = 0
    quantized: int = 0
    kept: Counter = field(default_factory=Counter)  # reason -> layers kept in high precision
    bytes_in: int = 0
    bytes_out: int = 0
    quantized_params: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    decisions: dict[str, Decision] = field(default_factory=dict, repr=False)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_in / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        g = f", group size {self.group_size}" if self.group_size else ""
        lines = [
            f"{'planned' if self.dry_run else 'wrote'} {self.output}",
            f"  format {self.format}{g}, rounding {self.rounding}, preset {self.preset} "
            f"(architecture: {self.architecture}), device {self.device}",
            f"  {self.quantized} layers quantized ({self.quantized_params / 1e9:.3f} G params), "
            f"{sum(self.kept.values())} weights kept in high precision, {self.tensors} tensors in all",
        ]
        for reason, n in self.kept.most_common():
            lines.append(f"    kept {n:>4}: {reason}")
        if not self.dry_run:
            ratio = self.bytes_out / self.bytes_in if self.bytes_in else 0.0
            lines.append(f"  {self.bytes_in / 1e9:.2f} GB -> {self.bytes_out / 1e9:.2f} GB ({ratio:.3f}x) "
                         f"in {self.seconds:.1f} s ({self.gb_per_s:.2f} GB/s of input)")
        return "\n".join(lines)


def derived_output(input_path: str, format: str) -> str:
    """``dir/model.safetensors`` -> ``dir/model_nf4.safetensors`` (never the input's name)."""
    root, ext = os.path.splitext(input_path)
    return f"{root}_{format}{ext or '.safetensors'}"


def _same_file(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b) or os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_output(input_path: str, output: str) -> None:
    if _same_file(input_path, output):
        raise ConvertError(f"{output}: the output would overwrite the input; choose another name")
    if os.path.isdir(output):
        raise ConvertError(f"{output}: is a directory; give a file name for the output")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise ConvertError(f"{output}: the folder {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConvertError(f"{output}: cannot write in {directory} (permission denied)")
    if os.path.exists(output) and not os.access(output, os.W_OK):
        raise ConvertError(f"{output}: exists and is not writable")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; run without a bar
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                dynamic_ncols=True, file=sys.stderr, smoothing=0.1)


def _metadata(input_meta: Mapping[str, str], conv: Converter, preset: str, arch: str) -> dict[str, str]:
    meta = dict(input_meta)
    meta[METADATA_KEY] = json.dumps({
        "version": __version__, "format": conv.format, "group_size": conv.group_size,
        "rounding": conv.rounding, "preset": preset, "architecture": arch,
    }, sort_keys=True)
    return meta


def plan_conversion(reader: SafetensorsReader, conv: Converter, selector: LayerSelector):
    """(decisions by weight key, output specs in input order, {weight key to quantize:
    its output keys})."""
    decisions: dict[str, Decision] = {}
    specs: list[OutputSpec] = []
    to_quantize: dict[str, list[str]] = {}  # weight key -> its output keys
    for key, info in reader.tensors.items():
        if key.endswith(".weight") and len(info.shape) >= 2:  # 1-D norm weights are just copied
            d = selector.decide(layer_prefix(key), info.shape, info.dtype in L.FLOAT_DTYPES)
            if d.quantize:
                problem = conv.shape_problem(info.shape)
                if problem:
                    hint = "it was forced by --include" if d.forced else "choose another --group-size or --exclude it"
                    raise ConvertError(f"tensor {key} {list(info.shape)} cannot take {conv.format}: {problem} ({hint})")
                try:
                    planned = conv.plan(key, info.shape, info.dtype)
                except ValueError as e:
                    raise ConvertError(f"tensor {key}: {e}") from None
                specs += planned
                to_quantize[key] = [p.key for p in planned]
            decisions[key] = d
            if d.quantize:
                continue
        specs.append(OutputSpec(key, info.dtype, info.shape))
    return decisions, specs, to_quantize


def _verify(path: str, specs: list[OutputSpec], layers: dict[str, list[str]], conv: Converter
            ) -> Callable[[str], None]:
    """Re-open the written file: its header against the plan, safetensors' own reader,
    and each quantized layer through this package's loader, one layer at a time (its
    weight memory-mapped and untouched, its scales read: they must be finite)."""

    def verify(tmp: str) -> None:
        infos, _, _ = read_header(tmp)
        want = {s.key: s for s in specs}
        if set(infos) != set(want):
            missing = sorted(set(want) - set(infos))[:3]
            extra = sorted(set(infos) - set(want))[:3]
            raise ConvertError(f"{path}: verification failed: keys missing {missing}, unexpected {extra}")
        for k, s in want.items():
            i = infos[k]
            if i.dtype != s.dtype or tuple(i.shape) != tuple(s.shape):
                raise ConvertError(f"{path}: verification failed: {k} is {i.dtype} {list(i.shape)}, "
                                   f"planned {s.dtype} {list(s.shape)}")
        try:
            from safetensors import safe_open

            with safe_open(tmp, framework="pt") as f:
                if set(f.keys()) != set(want):
                    raise ConvertError(f"{path}: verification failed: safetensors reads other keys")
        except ConvertError:
            raise
        except Exception as e:  # noqa: BLE001 - any refusal by safetensors fails the run
            raise ConvertError(f"{path}: verification failed: safetensors cannot open it ({e})") from None
        with SafetensorsReader(tmp) as r:
            for prefix, keys in layers.items():
                sd = {k: r.read(k) for k in keys}
                try:
                    loaded = formats.load_state_dict(sd, r.metadata, source=path)
                except Exception as e:  # noqa: BLE001 - the loader's complaint is the finding
                    raise ConvertError(f"{path}: verification failed: {e}") from None
                ok = (set(loaded.layers) == {prefix}) if conv.layout is not None else \
                    (not loaded.layers and f"{prefix}.weight" in loaded.tensors)
                if not ok:
                    raise ConvertError(f"{path}: verification failed: the loader does not read layer {prefix} "
                                       f"as {conv.format}")
                del sd, loaded

    return verify


def convert_file(input: str, output: str | None = None, *, format: str, group_size: int | None = None,
                 preset: str = "auto", include: str | None = None, exclude: str | None = None,
                 rounding: str = "nearest", device: str = "cpu", min_params: int = MIN_PARAMS,
                 progress: bool = False, dry_run: bool = False,
                 on_start: Callable[[ConvertSummary], None] | None = None) -> ConvertSummary:
    """Convert a float safetensors checkpoint into ``format`` (one of FORMATS), streaming.
    ``output`` defaults to ``<input>_<format>.safetensors``. Returns a ConvertSummary.
    Raises ConvertError (one-line reason) for bad input or output and ValueError for bad
    arguments; in both cases nothing is written. ``on_start(summary)`` is called once the
    input is checked and the plan made, before anything is written."""
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    conv = Converter(format, group_size, rounding, device)
    input = os.fspath(input)
    output = os.fspath(output) if output is not None else derived_output(input, format)
    with SafetensorsReader(input) as reader:
        why = quantized_reason(reader)
        if why:
            raise ConvertError(f"{input}: already quantized ({why}); convert reads float checkpoints")
        _check_output(input, output)
        try:
            selector = LayerSelector(preset, reader.tensors, include, exclude, min_params)
        except ValueError as e:
            raise ConvertError(str(e)) from None
        decisions, specs, to_quantize = plan_conversion(reader, conv, selector)
        kept = Counter(d.reason for d in decisions.values() if not d.quantize)
        summary = ConvertSummary(
            input, output, format, conv.group_size, rounding, preset, selector.architecture, str(conv.device),
            tensors=len(reader.tensors), quantized=len(to_quantize), kept=kept,
            bytes_in=sum(i.nbytes for i in reader.tensors.values()),
            quantized_params=sum(reader.tensors[k].numel for k in to_quantize),
            dry_run=dry_run, decisions=decisions,
        )
        if dry_run:
            summary.seconds = time.perf_counter() - t0
            return summary
        if not to_quantize:
            raise ConvertError(f"{input}: no layer selected for quantization (preset {preset}, "
                               f"architecture {selector.architecture}); check --include/--exclude/--min-params")
        if on_start is not None:
            on_start(summary)
        meta = _metadata(reader.metadata, conv, preset, selector.architecture)
        writer = SafetensorsWriter(output, specs, meta)
        bar = _progress(summary.bytes_in, progress)
        background = _BackgroundWriter()
        try:
            keys = list(reader.tensors)
            for i, key in enumerate(keys):
                info = reader.tensors[key]
                for nxt in keys[i + 1 : i + 1 + READ_AHEAD]:
                    _read_ahead(reader, nxt)
                if key in to_quantize:
                    w = reader.read(key)
                    try:
                        out = conv.convert(key, w)
                    except ValueError as e:
                        raise ConvertError(f"tensor {key}: {e}") from None
                    del w
                    for k, t in out.items():
                        background.put(writer.write, k, t)
                else:
                    background.put(writer.copy_from, key, reader.fileno, info.begin, info.nbytes)
                background.put(_drop_cache, reader.fileno, info.begin, info.nbytes)
                if bar is not None:
                    bar.update(info.nbytes)
                    bar.set_postfix_str(f"{i + 1}/{len(keys)} tensors", refresh=False)
            background.close()
            if bar is not None:
                bar.set_postfix_str("verifying", refresh=True)
            writer.commit(_verify(output, specs, {layer_prefix(k): v for k, v in to_quantize.items()}, conv))
        except BaseException:
            background.abort()
            writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        summary.bytes_out = writer.total_size
    summary.seconds = time.perf_counter() - t0
    return summary


class _BackgroundWriter:
    """Writes (pwrite / copy_file_range, which release the GIL) on a thread of their own
    while the next tensor is quantized. A bounded queue keeps at most WRITE_QUEUE
    tensors in flight; the first error stops the run."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="comfy-quant-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            fn, args = item
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def put(self, fn, *args) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((fn, args))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.error = self.error or RuntimeError("aborted")
        while True:  # drop what is queued, then stop the thread
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put(None)
        self.thread.join()


def _read_ahead(reader: SafetensorsReader, key: str) -> None:
    """Ask the kernel to start reading the next tensor while this one is quantized."""
    info = reader.tensors[key]
    if hasattr(os, "posix_fadvise") and info.nbytes:
        try:
            os.posix_fadvise(reader.fileno, info.begin, info.nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:  # pragma: no cover - advisory
            pass


def _drop_cache(fd: int, offset: int, nbytes: int) -> None:
    """The input is read once: let its pages go, so a 24 GB model does not push the
    rest of the machine out of the page cache."""
    if hasattr(os, "posix_fadvise") and nbytes:
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        except OSError:  # pragma: no cover - advisory
            pass

