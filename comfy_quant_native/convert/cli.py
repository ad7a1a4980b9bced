"""The ``comfy-quant`` command line (also ``python -m comfy_quant_native``).

    comfy-quant convert -i IN.safetensors [-o OUT.safetensors] --format nf4 [--preset auto] ...
    comfy-quant inspect FILE [--json] [--deep]

``convert`` also takes convert_to_quant's words with their meaning (--nf4, --fp4, --int8,
--kernel_backend, --block_size, --simple, --comfy_quant); see ``comfy-quant convert -h``.
Errors are one line on stderr (``comfy-quant: error: ...``) with exit status 1 (2 for
a malformed command line, 130 for Ctrl-C); nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys

from .converter import FORMATS
from ..presets import MIN_PARAMS, PRESETS
from .rounding import ROUNDINGS
from .safetensors_stream import ConvertError

PROG = "comfy-quant"

# convert_to_quant's format flags, highest priority first (its own order: nf4 > fp4 > int8 > fp8).
CTQ_PRIORITY = ("nf4", "fp4", "int8")

COMPAT_TABLE = """\
convert_to_quant words (Dec 2025)     comfy-quant words
  -i/--input IN                         -i/--input IN
  -o/--output OUT  (optional)           -o/--output OUT  (optional; default IN_<format>.safetensors)
  --nf4                                 --format nf4
  --fp4                                 --format fp4
  --int8                                --format int8_blockwise
  --int8 --kernel_backend blockwise     --format int8_blockwise
  --int8 --kernel_backend lodewise      --format int8_lodewise
  (no format flag: fp8, tensor scale)   --format float8_e4m3fn
  --block_size N                        --group-size N
  --simple                              --rounding nearest  (the default)
  --comfy_quant                         (always: per-layer comfy_quant metadata)
Several format flags: nf4 > fp4 > int8 > fp8, and the run says which it used."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of the tool
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Convert and inspect quantized diffusion-model checkpoints "
                                       "(comfy-quant-native).")
    sub = p.add_subparsers(dest="command", metavar="{convert,inspect}", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser(
        "convert", help="quantize a float .safetensors checkpoint, streaming",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize a float (bf16/fp16/fp32) .safetensors checkpoint tensor by tensor. "
                    "Peak memory stays about 1 GB whatever the model size; the output appears only once "
                    "complete and verified.",
        epilog=COMPAT_TABLE + "\n\nPresets keep per architecture the input embedders, final layer and "
               "what the architecture needs in high precision; see comfy_quant_native/presets.py.",
    )
    io = c.add_argument_group("files")
    io.add_argument("-i", "--input", required=True, metavar="IN", help="float .safetensors checkpoint (read only)")
    io.add_argument("-o", "--output", metavar="OUT",
                    help="output file (default: IN_<format>.safetensors beside the input; never the input)")

    fmt = c.add_argument_group("format (comfy-quant word | convert_to_quant words)")
    fmt.add_argument("--format", choices=FORMATS,
                     help="target format | --nf4, --fp4, --int8 [--kernel_backend lodewise]; "
                          "default float8_e4m3fn, as convert_to_quant")
    fmt.add_argument("--nf4", action="store_true", help="convert_to_quant word for --format nf4")
    fmt.add_argument("--fp4", action="store_true", help="convert_to_quant word for --format fp4")
    fmt.add_argument("--int8", action="store_true",
                     help="convert_to_quant word for --format int8_blockwise (int8_lodewise with "
                          "--kernel_backend lodewise)")
    fmt.add_argument("--kernel_backend", "--kernel-backend", choices=("blockwise", "lodewise"),
                     help="with --int8 only: blockwise (default) or lodewise")
    fmt.add_argument("--group-size", "--group_size", "--block_size", "--block-size", dest="group_size", type=int,
                     metavar="N", help="values per scale (4-bit: default 64; int8 block/lode: default 128) | "
                                       "--block_size N")
    fmt.add_argument("--comfy_quant", "--comfy-quant", action="store_true",
                     help="write per-layer comfy_quant metadata: always done (accepted for convert_to_quant)")

    sel = c.add_argument_group("which layers")
    sel.add_argument("--preset", choices=PRESETS, default="auto",
                     help="architecture whose sensitive layers stay in high precision (default auto: "
                          "detected from the keys)")
    sel.add_argument("--include", metavar="REGEX",
                     help="also quantize layers whose name matches (re.search), overriding the preset")
    sel.add_argument("--exclude", metavar="REGEX", help="keep layers whose name matches in high precision")
    sel.add_argument("--min-params", type=int, default=MIN_PARAMS, metavar="N",
                     help=f"keep weights with fewer values in high precision (default {MIN_PARAMS:,})")

    rnd = c.add_argument_group("rounding")
    rnd.add_argument("--rounding", choices=ROUNDINGS,
                     help="nearest (default, exact) or mse (per-group scale search: 2-4%% lower output error, "
                          "slower; nf4 and fp4 only) | --simple for nearest")
    rnd.add_argument("--simple", action="store_true", help="convert_to_quant word for --rounding nearest")

    run = c.add_argument_group("run")
    run.add_argument("--device", default="cpu", help="where to quantize: cpu (default), cuda, cuda:N")
    run.add_argument("--dry-run", action="store_true", help="print what would be quantized and kept; write nothing")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes, only errors")

    ins = sub.add_parser("inspect", help="tell what a .safetensors file holds")
    ins.add_argument("file", metavar="FILE")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--deep", action="store_true", help="also read every scale tensor (NaN/Inf/negative)")
    return p


def resolve_format(args) -> tuple[str, list[str]]:
    """The format the words ask for, and notes to print. Raises ValueError on words that
    contradict each other."""
    notes: list[str] = []
    flags = [f for f in CTQ_PRIORITY if getattr(args, f)]
    if args.kernel_backend is not None and not args.int8:
        if args.format in ("int8_blockwise", "int8_lodewise"):
            if args.format != f"int8_{args.kernel_backend}":
                raise ValueError(f"--kernel_backend {args.kernel_backend} contradicts --format {args.format}")
        else:
            raise ValueError(f"--kernel_backend {args.kernel_backend} applies to --int8 only "
                             f"(for int8_lodewise write --int8 --kernel_backend lodewise or --format int8_lodewise)")
    ctq = None
    if flags:
        chosen = flags[0]
        ctq = {"nf4": "nf4", "fp4": "fp4", "int8": f"int8_{args.kernel_backend or 'blockwise'}"}[chosen]
        if len(flags) > 1:
            notes.append(f"several format flags ({', '.join('--' + f for f in flags)}): using {ctq} "
                         f"(priority nf4 > fp4 > int8 > fp8)")
            if args.kernel_backend is not None and chosen != "int8":
                notes.append(f"--kernel_backend {args.kernel_backend} ignored: it applies to int8")
    if args.format and ctq and args.format != ctq:
        raise ValueError(f"--format {args.format} contradicts --{flags[0]} (= {ctq})")
    fmt = args.format or ctq
    if fmt is None:
        fmt = "float8_e4m3fn"
        notes.append("no format given: float8_e4m3fn (per-tensor scaled fp8, as convert_to_quant)")
    return fmt, notes


def resolve_rounding(args) -> str:
    if args.simple and args.rounding not in (None, "nearest"):
        raise ValueError(f"--simple (round to nearest) contradicts --rounding {args.rounding}")
    return args.rounding or "nearest"


def _fail(message: str, status: int = 1) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def cmd_convert(args) -> int:
    from .pipeline import convert_file, derived_output

    try:
        fmt, notes = resolve_format(args)
        rounding = resolve_rounding(args)
    except ValueError as e:
        return _fail(str(e), 2)
    output = args.output
    if output is None:
        output = derived_output(args.input, fmt)
        notes.append(f"output: {output} (derived from the input name)")

    def announce(plan) -> None:  # only once the input is checked: errors stay one line
        if args.quiet:
            return
        for n in notes:
            print(f"{PROG}: {n}", file=sys.stderr)
        print(f"{PROG}: {plan.architecture} ({plan.preset} preset): {plan.quantized} layers to {plan.format}, "
              f"{sum(plan.kept.values())} kept in high precision", file=sys.stderr)

    try:
        summary = convert_file(args.input, output, format=fmt, group_size=args.group_size, preset=args.preset,
                               include=args.include, exclude=args.exclude, rounding=rounding, device=args.device,
                               min_params=args.min_params, progress=not args.quiet, dry_run=args.dry_run,
                               on_start=announce)
    except (ConvertError, ValueError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e.filename or output}: {e.strerror or e}")
    if args.dry_run:
        for key, d in summary.decisions.items():
            print(f"{'quantize' if d.quantize else 'keep    '}  {key}" + ("" if d.quantize else f"  ({d.reason})"))
    if not args.quiet or args.dry_run:
        print(summary)
    return 0


def cmd_inspect(args) -> int:
    from .inspect import inspect_file

    try:
        report = inspect_file(args.file, deep=args.deep)
    except ConvertError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(report.to_json(), indent=1, sort_keys=True))
    else:
        print(report.format_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-i", "--input"):  # convert_to_quant's command line has no verb
        argv.insert(0, "convert")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            return cmd_convert(args)
        return cmd_inspect(args)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
