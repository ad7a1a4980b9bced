"""Converter benchmarks (not tests). Two parts:

  python bench/convert.py speed   [--formats nf4,int8_blockwise,...] [--devices cpu,cuda] [--dir DIR]
                                  [--mse-devices cuda] [--small]
      Generates a synthetic checkpoint with Flux.1-dev's tensor names and shapes
      (11.9 G parameters, 23.8 GB of bf16) in DIR, converts it with `comfy-quant convert`
      in a child process per format and device, and reports seconds, GB/s of input and
      the child's peak RSS. Deletes every file it made, also on Ctrl-C.

  python bench/convert.py quality [--seeds 3]
      Relative output error ||x W^T - x Wq^T|| / ||x W^T|| per format, round-to-nearest
      vs the mse rounding, on realistic weights (heavy-tailed, outlier input channels)
      and activations with outlier channels, at Flux layer shapes (docs/QUALITY.md).

Both print markdown tables with the machine, torch version, date and load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from comfy_quant_native.convert import FORMATS  # noqa: E402
from comfy_quant_native.convert import rounding as R  # noqa: E402
from comfy_quant_native.convert import synthetic  # noqa: E402
from comfy_quant_native.convert.converter import LAYOUT_OF_FORMAT  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", {torch.cuda.get_device_name(0)}"
    load = os.getloadavg()
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}; "
            f"{datetime.date.today().isoformat()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


# ----------------------------------------------------------------------------- speed
# The child reports its own peak RSS (VmHWM, which exec resets): a parent's wait4
# ru_maxrss would count the parent's pages shared at fork.
CHILD = ("import sys\n"
         "from comfy_quant_native.convert.cli import main\n"
         "rc = main(sys.argv[1:])\n"
         "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
         "print('VmHWM_kB', hwm)\n"
         "sys.exit(rc)\n")


def _run_measured(args: list[str]) -> tuple[int, float, int, str]:
    """(return code, seconds, peak RSS in bytes, output) of `comfy-quant <args>` in a child."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD] + args, capture_output=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    out = (p.stdout + p.stderr).decode(errors="replace")
    rss = 0
    for line in out.splitlines():
        if line.startswith("VmHWM_kB"):
            rss = int(line.split()[1]) * 1024
    return p.returncode, seconds, rss, out


def speed(args) -> None:
    formats = args.formats.split(",")
    devices = args.devices.split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device: skipping --devices cuda", file=sys.stderr)
        devices = [d for d in devices if d != "cuda"]
    shapes = synthetic.shapes("flux", **({} if not args.small else dict(depth=2, single=4)))
    need = synthetic.params(shapes) * 2
    os.makedirs(args.dir, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    out_max = need * 0.56  # int8 / fp8 outputs; 4-bit ~0.29x
    if free < need + out_max + 1e9:
        sys.exit(f"not enough free disk in {args.dir}: {free / 1e9:.1f} GB free, need {(need + out_max) / 1e9:.1f} GB")
    work = tempfile.mkdtemp(prefix="comfy-quant-bench-", dir=args.dir)
    src = os.path.join(work, "flux1-dev-synthetic.safetensors")
    rows = []
    try:
        t0 = time.perf_counter()
        size = synthetic.write(src, shapes)
        gen_s = time.perf_counter() - t0
        print(f"generated {src}: {size / 1e9:.2f} GB, {synthetic.params(shapes) / 1e9:.2f} G params "
              f"in {gen_s:.0f} s ({size / gen_s / 1e9:.2f} GB/s)", file=sys.stderr)
        for device in devices:
            for fmt in formats:
                roundings = ["nearest"] + (["mse"] if device in args.mse_devices.split(",") else [])
                for rounding in roundings:
                    if rounding == "mse" and LAYOUT_OF_FORMAT[fmt] not in R.MSE_LAYOUTS:
                        continue
                    out = os.path.join(work, f"out_{fmt}.safetensors")
                    cmd = ["convert", "-i", src, "-o", out, "--format", fmt, "--device", device,
                           "--rounding", rounding, "-q"]
                    load = os.getloadavg()[0]
                    rc, secs, rss, log = _run_measured(cmd)
                    if rc != 0:
                        print(log, file=sys.stderr)
                        raise SystemExit(f"{fmt} on {device} failed ({rc})")
                    out_bytes = os.path.getsize(out)
                    os.unlink(out)
                    rows.append((fmt, rounding, device, secs, size / secs / 1e9, rss / 1e9, out_bytes / size, load))
                    print(f"{fmt:16} {rounding:8} {device:5} {secs:7.1f} s {size / secs / 1e9:6.3f} GB/s "
                          f"peak RSS {rss / 1e9:5.2f} GB  out {out_bytes / size:.3f}x  load {load:.2f}",
                          file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nFlux.1-dev synthetic ({synthetic.params(shapes) / 1e9:.2f} G params, {size / 1e9:.2f} GB bf16); "
          f"{machine()}; {torch.get_num_threads()} torch threads\n")
    print("| format | rounding | device | seconds | GB/s of input | peak RSS (GB) | output / input | load at start |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for fmt, rnd, dev, secs, gbs, rss, ratio, load in rows:
        print(f"| {fmt} | {rnd} | {dev} | {secs:.1f} | {gbs:.3f} | {rss:.2f} | {ratio:.3f} | {load:.2f} |")


# ----------------------------------------------------------------------------- quality
LAYERS = {  # Flux layer shapes (rows cut to keep the run short: errors are per row / tile)
    "attn.qkv [9216x3072]": (2048, 3072),
    "mlp.2 [3072x12288]": (1024, 12288),
    "img_mod.lin [18432x3072]": (2048, 3072),
}


def activations(K: int, M: int, g: torch.Generator, modulation: bool) -> torch.Tensor:
    """Token activations: heavy-tailed per value, and 1% of channels 20x larger for every
    token (the outlier channels of transformer activations). The modulation layers of
    Flux see one SiLU(timestep + text-pooled embedding) vector per image: positive-
    skewed, smooth, a few large channels."""
    if modulation:
        x = torch.nn.functional.silu(torch.randn(M, K, generator=g) * 1.5 + 0.5)
    else:
        z = torch.randn(M, K, generator=g)
        chi2 = torch.randn(M, K, 5, generator=g).square_().sum(-1)
        x = z / torch.sqrt(chi2 / 5)
    ch = torch.randperm(K, generator=g)[: max(1, K // 100)]
    x[:, ch] *= 20
    return x


def rel_error(x, w, wq) -> float:
    y = x @ w.t()
    return float((x @ wq.t() - y).norm() / y.norm())


def _quantize(w, layout, rounding):
    """Also runs the search for layouts it is not offered for, to show why."""
    if rounding == "nearest" or layout in R.MSE_LAYOUTS:
        return R.quantize_weight(w, layout, None, rounding)
    from comfy_quant_native import QuantizedWeight, QuantParams
    from comfy_quant_native import layouts as L

    g = L.check_group_size(layout, None, w.shape[1])
    q, s = R.quantize_int8_mse(w, layout, g)
    return QuantizedWeight(QuantParams(layout, g, tuple(w.shape), w.dtype), q, s)


def quality(args) -> None:
    fmts = args.formats.split(",")
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    t_method: dict[tuple[str, str], float] = {}
    for seed in range(args.seeds):
        for name, (N, K) in LAYERS.items():
            g = torch.Generator().manual_seed(1000 * seed + N + K)
            w = synthetic.realistic_weight((N, K), g, torch.bfloat16)
            x = activations(K, args.tokens, g, modulation="mod" in name)
            wf = w.float()
            for fmt in fmts:
                layout = LAYOUT_OF_FORMAT[fmt]
                if layout is None:
                    q, s = R.quantize_fp8(w)
                    errs = (rel_error(x, wf, R.dequantize_fp8(q, s)), float("nan"))
                else:
                    e = []
                    for rounding in ("nearest", "mse"):
                        t0 = time.perf_counter()
                        qw = _quantize(w, layout, rounding)
                        t_method[(fmt, rounding)] = t_method.get((fmt, rounding), 0.0) + time.perf_counter() - t0
                        e.append(rel_error(x, wf, qw.dequantize(torch.float32)))
                    errs = tuple(e)
                results.setdefault((fmt, name), []).append(errs)
                print(f"seed {seed} {fmt:16} {name:26} nearest {errs[0]:.5f} mse {errs[1]:.5f}", file=sys.stderr)
    print(f"\nRelative output error ||xW^T - xWq^T|| / ||xW^T||, mean of {args.seeds} seeds, {args.tokens} tokens; "
          f"weights Student-t(4) with 0.5% input channels x8 and per-row gains; activations Student-t(5) "
          f"with 1% channels x20 (modulation: SiLU of a Gaussian, 1% channels x20). {machine()}\n")
    print("| format | layer | nearest (RTN) | mse | mean change | worst change | mse worse in |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (fmt, name), v in results.items():
        rtn = sum(a for a, _ in v) / len(v)
        mse = sum(b for _, b in v) / len(v)
        if mse != mse:  # NaN: no mse for this format
            print(f"| {fmt} | {name} | {rtn:.5f} | n/a | | | |")
            continue
        worse = sum(1 for a, b in v if b >= a)
        worst = max((b - a) / a for a, b in v)
        offered = LAYOUT_OF_FORMAT[fmt] in R.MSE_LAYOUTS
        print(f"| {fmt} | {name} | {rtn:.5f} | {mse:.5f}{'' if offered else ' (not offered)'} | "
              f"{100 * (mse - rtn) / rtn:+.1f}% | {100 * worst:+.1f}% | {worse}/{len(v)} |")
    if t_method:
        print("\nQuantization time, all layers and seeds (s): "
              + ", ".join(f"{f} {r} {t:.1f}" for (f, r), t in sorted(t_method.items())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--formats", default="nf4,fp4,int8_blockwise,int8_lodewise,int8_tensorwise,float8_e4m3fn")
    s.add_argument("--devices", default="cpu")
    s.add_argument("--mse-devices", default="cuda", help="devices that also run --rounding mse (where offered)")
    s.add_argument("--dir", default=tempfile.gettempdir())
    s.add_argument("--small", action="store_true", help="2 double + 4 single blocks (1.3 G params), for a try run")
    q = sub.add_parser("quality")
    q.add_argument("--formats", default=",".join(FORMATS))
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--tokens", type=int, default=512)
    args = p.parse_args()
    speed(args) if args.cmd == "speed" else quality(args)


if __name__ == "__main__":
    main()
