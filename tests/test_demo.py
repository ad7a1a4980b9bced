"""The README's main job (python -m comfy_quant_native demo) at a tiny size."""

from comfy_quant_native import demo
from comfy_quant_native.layouts import LAYOUTS


def test_demo_quantizes_saves_and_reloads_every_layout():
    rows = {r["layout"]: r for r in demo.run(width=256, blocks=1, device="cpu", tokens=32, repeats=1)}
    assert set(rows) == {"bf16", *LAYOUTS}
    base = rows["bf16"]["bytes"]
    for layout in LAYOUTS:
        r = rows[layout]
        assert r["reload"].startswith("identical"), (layout, r["reload"])
        assert 0 < r["err"] < (0.3 if layout in ("nf4", "fp4") else 0.1), (layout, r["err"])
        # img_in and final stay bf16; the rest is 4.5 or ~8 bits a weight
        assert r["bytes"] / base < (0.35 if layout in ("nf4", "fp4") else 0.56), (layout, r["bytes"] / base)
    assert max(rows[l]["err"] for l in ("int8_block", "int8_lode", "int8_row")) < min(rows["nf4"]["err"], rows["fp4"]["err"])


def test_demo_main_reports_and_succeeds(capsys):
    assert demo.main(["--width", "128", "--blocks", "1", "--tokens", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{layout} " in out for layout in LAYOUTS) and "DIFFERENT" not in out
