"""The report of bench/e2e_comfyui.py: the issue's targets, the markdown tables and the
compact summary. Plain functions over the result rows (dicts); no torch, no ComfyUI."""

from __future__ import annotations

OURS = ("nf4", "fp4", "int8_block", "int8_lode", "int8_row")
STOCK_FP8 = ("fp8", "fp8_fast", "fp8_scaled")
BASELINE = "eager_nf4"
ALL_FORMATS = ("bf16",) + OURS + STOCK_FP8 + (BASELINE,)
DEFAULT_FORMATS = "bf16,nf4,fp4,int8_block,int8_lode,int8_row,fp8,fp8_fast,eager_nf4"
# Issue 6 targets: step time ratio to bf16 (at most), weight bytes ratio (at most).
TIME_TARGET = {"nf4": 1.10, "fp4": 1.10, "int8_lode": 0.80, "int8_row": 0.80, "int8_block": 0.90}
BYTES_TARGET = {"nf4": 0.30, "fp4": 0.30}
VS_EAGER_TARGET = 2.5  # each of ours at least this much faster than eager_nf4
GiB = 2 ** 30


def fmt_ms(v):
    return "-" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def err_text(error: str) -> str:
    return error if error.startswith("skipped") else "ERROR: " + error


def fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def ratio(row, ref, key):
    """row[key] / ref[key], or None where either is missing or zero."""
    return row[key] / ref[key] if row.get(key) and ref.get(key) else None


def verdicts(row, rows_by_name, column) -> list[str]:
    """The issue's targets for ``row`` in ``column`` ('eager_ms' or 'compiled_ms')."""
    name = row["format"]
    bf16, base = rows_by_name.get("bf16"), rows_by_name.get(BASELINE)
    t = row.get(column)
    out = []
    if name in TIME_TARGET and t is not None and bf16 and bf16.get(column):
        r = t / bf16[column]
        out.append(f"time {r:.2f}<={TIME_TARGET[name]:.2f} {'ok' if r <= TIME_TARGET[name] else 'MISS'}")
    if column == "eager_ms" and name in BYTES_TARGET and row.get("full_depth_bytes") and bf16 \
            and bf16.get("full_depth_bytes"):
        r = row["full_depth_bytes"] / bf16["full_depth_bytes"]  # = weight bytes ratio at full depth
        out.append(f"bytes {r:.3f}<={BYTES_TARGET[name]:.2f} {'ok' if r <= BYTES_TARGET[name] else 'MISS'}")
    if name in OURS and t is not None and base and base.get(column):
        s = base[column] / t
        out.append(f"vs eager {s:.1f}x>={VS_EAGER_TARGET} {'ok' if s >= VS_EAGER_TARGET else 'MISS'}")
    return out


def missed(row, rows_by_name) -> bool:
    return any("MISS" in v for col in ("eager_ms", "compiled_ms") for v in verdicts(row, rows_by_name, col))


def report(args, env, rows, lowvram_rows) -> str:
    by = {r["format"]: r for r in rows}
    bf16 = by.get("bf16", {})
    out = ["# comfy-quant-native end-to-end: Flux step in ComfyUI", ""] + [f"- {line}" for line in env] + [""]
    out += ["| format | step ms | x bf16 | compiled ms | x bf16 (c) | peak VRAM GiB | weights GiB on GPU | "
            "weight bytes x bf16 | same at 19+38 blocks | rel err vs bf16 | targets (eager) | targets (compiled) | "
            "setup s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            out.append(f"| {r['format']} | {err_text(r['error'])} |  |  |  |  |  |  |  |  |  |  |  |")
            continue
        eratio, cratio = ratio(r, bf16, "eager_ms"), ratio(r, bf16, "compiled_ms")
        wratio, fratio = ratio(r, bf16, "weight_bytes"), ratio(r, bf16, "full_depth_bytes")
        compiled = fmt_ms(r["compiled_ms"]) if not r["compile_error"] else f"error: {r['compile_error'][:80]}"
        err = fmt(r["rel_err"], "{:.4f}") + ("" if r["finite"] in (None, True) else " (non-finite!)")
        out.append(f"| {r['format']} | {fmt_ms(r['eager_ms'])} | {fmt(eratio)} | {compiled} | {fmt(cratio)} | "
                   f"{fmt(r['peak_gib'])} | {fmt(r['gpu_gib'])} | {fmt(wratio, '{:.3f}')} | {fmt(fratio, '{:.3f}')} | {err} | "
                   f"{'; '.join(verdicts(r, by, 'eager_ms')) or '-'} | {'; '.join(verdicts(r, by, 'compiled_ms')) or '-'} | "
                   f"{fmt(r.get('setup_s'), '{:.0f}')} |")
    out += ["", "Paths: " + "; ".join(f"{r['format']}: {r['note']}" for r in rows if r["note"]), ""]
    if lowvram_rows:
        budget = next((r["budget"] for r in lowvram_rows if r.get("budget")), f"{args.lowvram_gb} GiB")
        out += [f"## Low VRAM: ComfyUI limited to {budget}", "",
                "| format | step ms | loaded GiB / model GiB | offloaded | peak VRAM GiB |", "|---|---|---|---|---|"]
        for r in lowvram_rows:
            if r["error"]:
                out.append(f"| {r['format']} | {err_text(r['error'])} |  |  |  |")
            else:
                out.append(f"| {r['format']} | {fmt_ms(r['ms'])} | {fmt(r['loaded_gib'])} / {fmt(r['model_gib'])} | "
                           f"{'yes' if r['offloaded'] else 'no'} | {fmt(r['peak_gib'])} |")
        out.append("")
    for r in rows:
        if r.get("profile"):
            out += [f"## Profile: {r['format']}", "", "```", r["profile"], "```", ""]
    return "\n".join(out)


def compact(rows, lowvram_rows) -> str:
    by = {r["format"]: r for r in rows}
    bf16 = by.get("bf16", {})
    lines = ["format       eager ms  x bf16  compiled ms  x bf16  peak GiB  weights x bf16  targets"]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['format']:<12} {err_text(r['error'])[:100]}")
            continue
        eratio, cratio = ratio(r, bf16, "eager_ms"), ratio(r, bf16, "compiled_ms")
        wratio = ratio(r, bf16, "weight_bytes")
        v = verdicts(r, by, "eager_ms") + [f"(c) {x}" for x in verdicts(r, by, "compiled_ms")]
        lines.append(f"{r['format']:<12} {fmt_ms(r['eager_ms']):>8}  {fmt(eratio):>6}  {fmt_ms(r['compiled_ms']):>11}  "
                     f"{fmt(cratio):>6}  {fmt(r['peak_gib']):>8}  {fmt(wratio, '{:.3f}'):>14}  {'; '.join(v)}")
    for r in lowvram_rows:
        lines.append(f"lowvram {fmt(r['budget_gib'])} GiB {r['format']}: "
                     + (err_text(r["error"])[:100] if r["error"] else
                        f"{fmt_ms(r['ms'])} ms, offloaded {'yes' if r['offloaded'] else 'no'}, "
                        f"loaded {fmt(r['loaded_gib'])}/{fmt(r['model_gib'])} GiB"))
    return "\n".join(lines)
