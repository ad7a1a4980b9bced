"""What a safetensors file holds: per-format layer counts, bytes, bits per weight, the
architecture, the form it was written in, and anything inconsistent. Reads the header
and the small JSON tensors only (``deep=True`` also reads every scale tensor to check
it is finite and positive, and runs this package's loader over the file's structure).

Forms (``source`` of each quantized layer):
  comfy-quant-native  our comfy_quant form: 4-bit JSON carries "nibble_order": "hi"
  convert_to_quant    the same keys without nibble_order (4-bit: low nibble first);
                      its int8_blockwise / int8_lodewise layers are ours too ("comfy_quant")
  bitsandbytes        L.weight.absmax + L.weight.quant_state.bitsandbytes__nf4|fp4 (Forge,
                      diffusers, bnb state dicts)
  stock ComfyUI       float8 / nvfp4 / mxfp8 / int8_tensorwise comfy_quant layers, and the
                      older scaled_fp8 form (L.scale_weight)
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from .. import layouts as L
from ..presets import detect_architecture
from .safetensors_stream import SafetensorsReader, TensorInfo

FLOAT_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
STOCK_COMFY_FORMATS = ("float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "int8_tensorwise")
OUR_FORMATS = tuple(L.DISK_NAME.values())
SCALE_SUFFIXES = (".absmax", ".weight_scale", ".weight_scale_2", ".scale_weight", ".input_scale", ".scale_input",
                  ".nested_absmax", ".nested_quant_map", ".nested_offset", ".comfy_quant",
                  ".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map")


@dataclass
class LayerInfo:
    prefix: str
    format: str  # bnb_nf4, int8_blockwise, float8_e4m3fn, ... or the float dtype name
    source: str  # comfy-quant-native, convert_to_quant, comfy_quant, bitsandbytes, stock ComfyUI, float
    params: int
    nbytes: int  # data + scales + metadata tensors of the layer (not the bias)
    keys: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    path: str
    file_bytes: int
    tensors: int
    architecture: str | None
    prefix: str
    form: str  # the file's form as formats.detect_form names it
    sources: Counter  # source -> quantized layers
    layers: list[LayerInfo]
    other_bytes: int  # tensors outside any layer weight (biases, norms, embeddings...)
    problems: list[str]
    metadata: dict[str, str]

    def by_format(self) -> dict[str, dict]:
        rows: dict[str, dict] = defaultdict(lambda: {"layers": 0, "params": 0, "bytes": 0})
        for li in self.layers:
            r = rows[li.format]
            r["layers"] += 1
            r["params"] += li.params
            r["bytes"] += li.nbytes
        for r in rows.values():
            r["bits_per_weight"] = 8 * r["bytes"] / r["params"] if r["params"] else 0.0
        return dict(rows)

    @property
    def quantized_layers(self) -> int:
        return sum(1 for li in self.layers if li.source != "float")

    def source_summary(self) -> str:
        if not self.sources:
            return "plain (no quantized layers)"
        return ", ".join(f"{s} ({n} layers)" for s, n in self.sources.most_common())

    def to_json(self) -> dict:
        return {
            "path": self.path, "file_bytes": self.file_bytes, "tensors": self.tensors,
            "architecture": self.architecture, "prefix": self.prefix, "form": self.form,
            "sources": dict(self.sources), "formats": self.by_format(), "other_bytes": self.other_bytes,
            "problems": self.problems, "metadata_keys": sorted(self.metadata),
        }

    def format_text(self) -> str:
        out = [f"file:          {self.path}",
               f"size:          {_gb(self.file_bytes)} in {self.tensors} tensors",
               f"architecture:  {self.architecture or 'not recognised'}"
               + (f" (keys under {self.prefix!r})" if self.prefix else ""),
               f"source form:   {self.source_summary()}",
               f"loader form:   {self.form}",
               "",
               f"{'format':<18} {'layers':>7} {'params':>10} {'bytes':>10} {'bits/weight':>12}"]
        rows = self.by_format()
        total_p = total_b = 0
        for fmt in sorted(rows, key=lambda f: (f in FLOAT_NAMES.values(), f)):
            r = rows[fmt]
            total_p += r["params"]
            total_b += r["bytes"]
            out.append(f"{fmt:<18} {r['layers']:>7} {_count(r['params']):>10} {_gb(r['bytes']):>10} "
                       f"{r['bits_per_weight']:>12.2f}")
        out.append(f"{'other tensors':<18} {'':>7} {'':>10} {_gb(self.other_bytes):>10}")
        if total_p:
            out.append(f"{'all layer weights':<18} {len(self.layers):>7} {_count(total_p):>10} {_gb(total_b):>10} "
                       f"{8 * total_b / total_p:>12.2f}")
        if self.metadata:
            out.append("")
            out.append("metadata:      " + ", ".join(sorted(self.metadata)))
        out.append("")
        if self.problems:
            out.append(f"inconsistencies ({len(self.problems)}):")
            out += [f"  - {p}" for p in self.problems[:50]]
            if len(self.problems) > 50:
                out.append(f"  ... and {len(self.problems) - 50} more")
        else:
            out.append("inconsistencies: none found")
        return "\n".join(out)


def _gb(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} G"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.1f} k"


def _json_of(reader: SafetensorsReader, key: str):
    try:
        return json.loads(reader.read_bytes(key).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return e


class _Layers:
    """Classifies the layers of a file from its header (and its JSON tensors)."""

    def __init__(self, reader: SafetensorsReader):
        self.r = reader
        self.t: dict[str, TensorInfo] = reader.tensors
        self.problems: list[str] = []
        self.used: set[str] = set()
        self.layers: list[LayerInfo] = []

    def _bytes(self, keys) -> int:
        return sum(self.t[k].nbytes for k in keys if k in self.t)

    def _take(self, prefix: str, fmt: str, source: str, params: int, extra_keys=()) -> None:
        keys = [k for k in self.t if k.startswith(prefix + ".") and k != prefix + ".bias"]
        keys = [k for k in keys if k == prefix + ".weight" or k[len(prefix):] in SCALE_SUFFIXES
                or k.startswith(prefix + ".weight.")] + [k for k in extra_keys if k in self.t]
        keys = sorted(set(keys))
        self.used.update(keys)
        self.layers.append(LayerInfo(prefix, fmt, source, params, self._bytes(keys), keys))

    def _need(self, prefix: str, key: str, what: str, dtype=None, shape=None) -> TensorInfo | None:
        info = self.t.get(key)
        if info is None:
            self.problems.append(f"{prefix}: missing {what} ({key})")
            return None
        if dtype is not None and info.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
            self.problems.append(f"{prefix}: {what} is {info.dtype}, expected {dtype}")
        if shape is not None and tuple(info.shape) not in (shape if isinstance(shape, list) else [shape]):
            self.problems.append(f"{prefix}: {what} has shape {list(info.shape)}, expected {shape}")
        return info

    # ------------------------------------------------------------------ forms
    def comfy_quant(self, prefix: str, meta, where: str) -> None:
        if isinstance(meta, Exception) or not isinstance(meta, dict):
            self.problems.append(f"{prefix}: {where} is not a JSON object ({meta})")
            self._take(prefix, "unreadable", "comfy_quant", 0)
            return
        fmt = meta.get("format")
        w = self._need(prefix, f"{prefix}.weight", "weight")
        if w is None:
            return
        if fmt in ("bnb_nf4", "bnb_fp4"):
            source = "comfy-quant-native" if meta.get("nibble_order") == "hi" else "convert_to_quant"
            shape = meta.get("orig_shape")
            if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape):
                self.problems.append(f"{prefix}: {fmt} without a valid orig_shape ({shape!r})")
                shape = [w.numel * 2]
            n = math.prod(shape)
            B = meta.get("group_size", 64)
            try:
                L.check_group_size(L.LAYOUT_OF_DISK_NAME[fmt], B)
            except (ValueError, TypeError) as e:
                self.problems.append(f"{prefix}: {e}")
                B = 64
            self._need(prefix, f"{prefix}.weight", "packed weight", torch.uint8, ((n + 1) // 2,))
            G = math.ceil(n / B)
            if meta.get("double_quant"):
                self._need(prefix, f"{prefix}.absmax", "absmax codes", torch.uint8, (G,))
                self._need(prefix, f"{prefix}.nested_absmax", "nested absmax", torch.float32,
                           (math.ceil(G / L.DQ_BLOCK),))
                self._need(prefix, f"{prefix}.nested_quant_map", "nested quant map", torch.float32, (256,))
            else:
                self._need(prefix, f"{prefix}.absmax", "absmax", torch.float32, (G,))
            self._take(prefix, fmt, source, n)
        elif fmt in ("int8_blockwise", "int8_lodewise", "int8_tensorwise"):
            self._need(prefix, f"{prefix}.weight", "weight", torch.int8)
            params = w.numel
            if len(w.shape) == 2:
                N, K = w.shape
                layout = L.LAYOUT_OF_DISK_NAME[fmt]
                if layout == "int8_row":
                    shapes = [(), (1,), (N,), (N, 1)]
                    source = "comfy-quant-native" if meta.get("per_row") else "stock ComfyUI"
                else:
                    B = meta.get("group_size", L.GROUP_DEFAULT[layout])
                    shapes = [tuple(L.scale_shape(layout, B, N, K))]
                    source = "comfy_quant"
                self._need(prefix, f"{prefix}.weight_scale", "weight_scale", torch.float32,
                           shapes if len(shapes) > 1 else shapes[0])
            else:
                self.problems.append(f"{prefix}: {fmt} weight is not 2-D ({list(w.shape)})")
                source = "comfy_quant"
            self._take(prefix, fmt, source, params)
        elif fmt in STOCK_COMFY_FORMATS:
            if fmt.startswith("float8"):
                self._need(prefix, f"{prefix}.weight", "weight", FP8)
                self._need(prefix, f"{prefix}.weight_scale", "weight_scale", torch.float32, [(), (1,)])
            self._take(prefix, fmt, "stock ComfyUI", w.numel * (2 if fmt == "nvfp4" else 1))
        else:
            self.problems.append(f"{prefix}: unknown quantization format {fmt!r}")
            self._take(prefix, f"unknown:{fmt}", "comfy_quant", w.numel)

    def bnb(self, prefix: str, state_key: str) -> None:
        qtype = state_key.rsplit("__", 1)[-1]
        fmt = {"nf4": "bnb_nf4", "fp4": "bnb_fp4"}.get(qtype, f"bnb_{qtype}")
        meta = _json_of(self.r, state_key)
        n = None
        if isinstance(meta, dict) and isinstance(meta.get("shape"), list):
            n = math.prod(int(s) for s in meta["shape"])
        else:
            self.problems.append(f"{prefix}: bitsandbytes quant_state without a shape")
        w = self._need(prefix, f"{prefix}.weight", "packed weight", torch.uint8)
        if n is None:
            n = 2 * (w.numel if w else 0)
        elif w is not None and w.numel != (n + 1) // 2:
            self.problems.append(f"{prefix}: packed weight has {w.numel} bytes for {n} values")
        self._need(prefix, f"{prefix}.weight.absmax", "absmax")
        self._take(prefix, fmt, "bitsandbytes", n)

    def legacy_scaled(self, prefix: str, w: TensorInfo) -> None:
        if w.dtype in FP8:
            self._take(prefix, "float8_e4m3fn" if w.dtype == torch.float8_e4m3fn else "float8_e5m2",
                       "stock ComfyUI (scaled_fp8)", w.numel)
        else:
            self._take(prefix, "int8 (legacy scale_weight)", "convert_to_quant (legacy)", w.numel)

    def run(self, metadata: dict[str, str]) -> None:
        header_layers = {}
        if "_quantization_metadata" in metadata:
            try:
                header_layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
            except (json.JSONDecodeError, AttributeError) as e:
                self.problems.append(f"_quantization_metadata is not valid JSON ({e})")
        for key in self.t:
            if key.endswith(".comfy_quant"):
                prefix = key[: -len(".comfy_quant")]
                self.comfy_quant(prefix, _json_of(self.r, key), key)
            elif ".weight.quant_state.bitsandbytes__" in key:
                self.bnb(key.split(".weight.quant_state.")[0], key)
        done = {li.prefix for li in self.layers}
        for prefix, meta in header_layers.items():
            if prefix not in done:
                self.comfy_quant(prefix, meta, "_quantization_metadata entry")
                done.add(prefix)
        for key, info in self.t.items():
            if not key.endswith(".weight") or key in self.used:
                continue
            prefix = key[: -len(".weight")]
            if prefix in done:
                continue
            if f"{prefix}.scale_weight" in self.t:
                self.legacy_scaled(prefix, info)
            elif info.dtype in FLOAT_NAMES and len(info.shape) == 2:
                self._take(prefix, FLOAT_NAMES[info.dtype], "float", info.numel, ())
            elif info.dtype in FP8 or info.dtype in (torch.int8, torch.uint8):
                self.problems.append(f"{prefix}: {info.dtype} weight without scales or metadata")
                self._take(prefix, str(info.dtype).replace("torch.", ""), "unknown", info.numel, ())
        prefixes = {li.prefix for li in self.layers if li.source != "float"}
        for key in self.t:
            if key in self.used:
                continue
            for suf in SCALE_SUFFIXES:
                if key.endswith(suf) and key[: -len(suf)] not in prefixes and suf != ".comfy_quant":
                    self.problems.append(f"{key}: a quantization tensor with no quantized layer")
                    break


def analyse(reader: SafetensorsReader) -> tuple[list[LayerInfo], list[str], set[str]]:
    layers = _Layers(reader)
    layers.run(reader.metadata)
    return layers.layers, layers.problems, layers.used


def quantized_reason(reader: SafetensorsReader) -> str | None:
    """Why the file is already quantized (None: it holds float weights only)."""
    if "_quantization_metadata" in reader.metadata:
        return "its header has _quantization_metadata"
    if any(k == "scaled_fp8" or k.endswith(".scaled_fp8") for k in reader.tensors):
        return "it has a scaled_fp8 marker"
    layers, _, _ = analyse(reader)
    counts = Counter(f"{li.format} [{li.source}]" for li in layers if li.source != "float")
    if counts:
        parts = ", ".join(f"{n} {f}" for f, n in counts.most_common(3))
        return f"{sum(counts.values())} quantized layers ({parts})"
    return None


def inspect_file(path: str, deep: bool = False) -> InspectReport:
    """The InspectReport of a safetensors file (raises ConvertError when unreadable)."""
    from .. import formats

    with SafetensorsReader(path) as reader:
        layers, problems, used = analyse(reader)
        arch, prefix = detect_architecture(reader.tensors)
        try:
            form = formats.detect_form(list(reader.tensors), reader.metadata)
        except Exception as e:  # noqa: BLE001 - the loader's own complaint is a finding
            form = "unreadable"
            problems.append(f"formats.detect_form: {e}")
        if deep:
            problems += _deep_checks(reader, layers)
        layer_keys = {k for li in layers for k in li.keys} | {f"{li.prefix}.weight" for li in layers}
        other = sum(i.nbytes for k, i in reader.tensors.items() if k not in layer_keys)
        sources = Counter(li.source for li in layers if li.source != "float")
        return InspectReport(path, reader.size, len(reader.tensors), arch, prefix, form, sources, layers,
                             other, problems, dict(reader.metadata))


def _deep_checks(reader: SafetensorsReader, layers: list[LayerInfo]) -> list[str]:
    """Reads every scale tensor: NaN, Inf or negative scales are reported."""
    problems = []
    for li in layers:
        if li.source == "float":
            continue
        for key in li.keys:
            if not any(key.endswith(s) for s in (".absmax", ".weight_scale", ".weight.absmax", ".nested_absmax")):
                continue
            t = reader.read(key)
            if not t.is_floating_point():
                continue
            t = t.float()
            if not bool(torch.isfinite(t).all()):
                problems.append(f"{key}: {int((~torch.isfinite(t)).sum())} non-finite scales")
            elif bool((t < 0).any()):
                problems.append(f"{key}: {int((t < 0).sum())} negative scales")
    return problems
