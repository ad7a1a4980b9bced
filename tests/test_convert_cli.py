"""The comfy-quant command line: convert_to_quant's words (docs/CONVERTER.md's
compatibility table), derived output names, contradictions, errors, inspect."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from comfy_quant_native.convert import cli
from comfy_quant_native.convert.inspect import inspect_file
from convert_helpers import listing, write_tiny

# (seed command line, format every quantized layer must have). The seed lines are those
# of docs/CONVERTER.md; MODEL is replaced by a small Flux-named checkpoint.
SEED_LINES = [
    ("-i MODEL --comfy_quant", "float8_e4m3fn"),
    ("-i MODEL --comfy_quant --int8 --block_size 128", "int8_blockwise"),
    ("-i MODEL --comfy_quant --int8 --kernel_backend blockwise --block_size 128", "int8_blockwise"),
    ("-i MODEL --comfy_quant --int8 --kernel_backend lodewise --block_size 128", "int8_lodewise"),
    ("-i MODEL --comfy_quant --nf4 --block_size 64", "bnb_nf4"),
    ("-i MODEL --comfy_quant --fp4 --block_size 64 --simple", "bnb_fp4"),
    ("-i MODEL -o OUT --comfy_quant --nf4 --int8 --block_size 64", "bnb_nf4"),
    ("-i MODEL -o OUT --fp4 --int8", "bnb_fp4"),
    ("--input MODEL --output OUT --int8", "int8_blockwise"),
]
OURS = [
    ("-i MODEL -o OUT --format nf4 --group-size 64", "bnb_nf4"),
    ("-i MODEL -o OUT --format int8_tensorwise", "int8_tensorwise"),
    ("-i MODEL -o OUT --format fp4 --rounding mse --preset flux --exclude single_blocks", "bnb_fp4"),
]
DERIVED = {"float8_e4m3fn": "float8_e4m3fn", "int8_blockwise": "int8_blockwise", "int8_lodewise": "int8_lodewise",
           "bnb_nf4": "nf4", "bnb_fp4": "fp4", "int8_tensorwise": "int8_tensorwise"}


@pytest.fixture()
def model(tmp_path):
    return write_tiny(tmp_path / "model.safetensors", "flux")


def _run(line: str, model: str, capsys, verb="convert"):
    out = os.path.join(os.path.dirname(model), "out.safetensors")
    argv = shlex.split(line.replace("MODEL", model).replace("OUT", out)) + ["--min-params", "0"]
    rc = cli.main(([verb] if verb else []) + argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err, out


@pytest.mark.parametrize("line,fmt", SEED_LINES + OURS)
def test_seed_command_lines(line, fmt, model, capsys):
    rc, out, err, out_path = _run(line, model, capsys)
    assert rc == 0, err
    target = out_path if " -o " in line or "--output" in line else \
        os.path.join(os.path.dirname(model), f"model_{DERIVED[fmt]}.safetensors")
    assert os.path.exists(target) and os.path.exists(model)
    report = inspect_file(target)
    quantized = {li.format for li in report.layers if li.source != "float"}
    assert quantized == {fmt}, (line, quantized)
    assert report.problems == []
    if "--nf4 --int8" in line or "--fp4 --int8" in line:
        assert "several format flags" in err and "priority nf4 > fp4 > int8 > fp8" in err
    if "--format" not in line and "--nf4" not in line and "--fp4" not in line and "--int8" not in line:
        assert "no format given: float8_e4m3fn" in err


def test_without_verb_like_convert_to_quant(model, capsys):
    rc, _, err, _ = _run("-i MODEL --nf4", model, capsys, verb=None)
    assert rc == 0, err
    assert os.path.exists(os.path.join(os.path.dirname(model), "model_nf4.safetensors"))


def test_derived_output_never_the_input(tmp_path, capsys):
    # an input already named like a derived output gets a new name, not its own
    model = write_tiny(tmp_path / "model_nf4.safetensors", "flux")
    before = open(model, "rb").read()
    rc, _, err, _ = _run("-i MODEL --nf4", model, capsys)
    assert rc == 0, err
    assert "model_nf4_nf4.safetensors" in err
    assert listing(tmp_path) == ["model_nf4.safetensors", "model_nf4_nf4.safetensors"]
    assert open(model, "rb").read() == before
    rc, _, err, _ = _run("-i MODEL -o MODEL --nf4", model, capsys)
    assert rc == 1 and "overwrite the input" in err


@pytest.mark.parametrize("line,message", [
    ("-i MODEL --kernel_backend lodewise", "--kernel_backend lodewise applies to --int8 only"),
    ("-i MODEL --nf4 --kernel_backend lodewise --format nf4", "applies to --int8 only"),
    ("-i MODEL --format int8_blockwise --kernel_backend lodewise", "contradicts --format int8_blockwise"),
    ("-i MODEL --format fp4 --nf4", "--format fp4 contradicts --nf4"),
    ("-i MODEL --int8 --kernel_backend lodewise --format int8_blockwise", "contradicts --int8"),
    ("-i MODEL --nf4 --simple --rounding mse", "--simple (round to nearest) contradicts --rounding mse"),
])
def test_contradictory_words(line, message, model, capsys):
    rc, out, err, _ = _run(line, model, capsys)
    assert rc == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("comfy-quant: error:")
    assert listing(os.path.dirname(model)) == ["model.safetensors"]


@pytest.mark.parametrize("line,message", [
    ("-i MODEL --block_size 64", "does not apply"),  # fp8 has one scale per tensor
    ("-i MODEL --format int8_tensorwise --group-size 64", "does not apply"),
    ("-i MODEL --nf4 --block_size 48", "power of two"),
    ("-i MODEL --nf4 --block_size 512", "cannot take nf4"),
    ("-i MODEL --format float8_e4m3fn --rounding mse", "does not lower"),
    ("-i MODEL --format int8_blockwise --rounding mse", "does not lower"),
    ("-i MODEL --nf4 --include (", "invalid regular expression"),
    ("-i MODEL.missing --nf4", "no such file"),
    ("-i MODEL --nf4 -o /nonexistent/dir/x.safetensors", "does not exist"),
])
def test_errors_are_one_line(line, message, model, capsys):
    rc, out, err, _ = _run(line, model, capsys)
    assert rc == 1 and message in err, err
    assert err.count("\n") == 1
    assert listing(os.path.dirname(model)) == ["model.safetensors"]


def test_interrupt_exit_status(model, capsys, monkeypatch):
    from comfy_quant_native.convert import Converter

    def interrupted(self, name, w):
        raise KeyboardInterrupt

    monkeypatch.setattr(Converter, "convert", interrupted)
    rc, _, err, _ = _run("-i MODEL --nf4", model, capsys)
    assert rc == 130 and "no output written" in err
    assert listing(os.path.dirname(model)) == ["model.safetensors"]


def test_help_documents_both_spellings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    text = capsys.readouterr().out
    for word in ("--format", "--nf4", "--fp4", "--int8", "--kernel_backend", "--group-size", "--block_size",
                 "--simple", "--rounding", "--comfy_quant", "-i IN, --input IN", "-o OUT, --output OUT",
                 "--preset", "--include", "--exclude", "--device", "nf4 > fp4 > int8 > fp8"):
        assert word in text, word


def test_inspect_and_dry_run_commands(model, capsys):
    rc, out, err, _ = _run("-i MODEL --nf4 --dry-run", model, capsys)
    assert rc == 0 and "quantize  double_blocks.0.img_attn.qkv.weight" in out
    assert "keep      img_in.weight  (flux: input embedder / final layer)" in out
    assert listing(os.path.dirname(model)) == ["model.safetensors"]
    assert cli.main(["inspect", model]) == 0
    assert "architecture:  flux" in capsys.readouterr().out
    assert cli.main(["inspect", model, "--json"]) == 0
    assert '"architecture": "flux"' in capsys.readouterr().out
    assert cli.main(["inspect", model + ".nope"]) == 1


def test_python_dash_m_entry_point(model):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "comfy_quant_native", "convert", "-i", model, "--nf4", "-q",
                        "--min-params", "0"], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(os.path.dirname(model), "model_nf4.safetensors"))
