"""bench/gpu_ops.py's report on the CPU (the timings themselves need a GPU): the nf4 linear
at M <= 16 gets its floor column, bytes at the measured copy bandwidth, as a ratio to the
same run's bf16, and the compute-bound rows none."""

from __future__ import annotations

import importlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_linear_table_shows_the_nf4_floor(capsys):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        gpu_ops = importlib.import_module("gpu_ops")
    finally:
        sys.path.remove(os.path.join(REPO, "bench"))
    rows = [dict(op="linear", K=3072, N=12288, M=M, method=m, ms=ms)
            for M, m, ms in [(1, "bf16", 0.0218), (1, "ours nf4", 0.0132), (16, "bf16", 0.0220),
                             (16, "ours nf4", -0.0150), (4608, "bf16", 0.46), (4608, "ours nf4", 0.49)]]
    # 18874368 packed + 2359296 absmax + 6144 x + 24576 y = 21264384 bytes; 16 tokens add
    # 15 x 2 x (3072 + 12288) bytes of x and y
    assert gpu_ops.nf4_linear_bytes(1, 3072, 12288) == 21264384
    assert gpu_ops.nf4_linear_bytes(16, 3072, 12288) == 21264384 + 15 * 2 * (3072 + 12288)
    gpu_ops.print_tables(rows, 4250.0, "# header")
    lines = capsys.readouterr().out.splitlines()
    assert "| K, N | M | bf16 | ours nf4 | nf4 floor |" in lines
    assert "| 3072, 12288 | 1 | 0.0218 | 0.0132 (0.61x) | 0.0050 (0.23x) |" in lines
    assert "| 3072, 12288 | 16 | 0.0220 | -0.0150 (0.68x) | 0.0051 (0.23x) |" in lines
    assert "| 3072, 12288 | 4608 | 0.4600 | 0.4900 (1.07x) |  |" in lines
