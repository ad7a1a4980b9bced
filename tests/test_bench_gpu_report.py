"""bench/gpu_ops.py's report on the CPU (the timings themselves need a GPU): the nf4 linear
at M <= 16 gets its floor column, bytes at the measured copy bandwidth, as a ratio to the
same run's bf16; the compute-bound rows (M >= 256) get the tensor cores' floors, 2 M N K
operations at the dense peak, where the peak is known."""

from __future__ import annotations

import importlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_gpu_ops():
    """bench/gpu_ops.py as a module (it needs no GPU to import)."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    try:
        return importlib.import_module("gpu_ops")
    finally:
        sys.path.remove(os.path.join(REPO, "bench"))


def test_linear_table_shows_the_nf4_floor(capsys):
    gpu_ops = bench_gpu_ops()
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


def test_linear_table_shows_the_mma_floors(capsys):
    gpu_ops = bench_gpu_ops()
    rows = [dict(op="linear", K=3072, N=12288, M=M, method=m, ms=ms)
            for M, m, ms in [(1, "bf16", 0.0218), (4608, "bf16", 0.45), (4608, "ours int8_lode", 0.45)]]
    # H200: 132 SMs at 1980 MHz, 4096 bf16 / 8192 int8 operations a clock an SM
    peaks = {"bf16": 4096 * 132 * 1.98e9, "int8": 8192 * 132 * 1.98e9}
    gpu_ops.print_tables(rows, 4250.0, "# header", peaks)
    lines = capsys.readouterr().out.splitlines()
    assert "tensor-core dense peak at the highest SM clock: bf16 1071 TFLOPS, int8 2141 TOPS" in lines
    assert "| K, N | M | bf16 | ours int8_lode | bf16 MMA floor | int8 MMA floor |" in lines
    # 2 x 4608 x 12288 x 3072 = 347.9e9 operations: 0.3250 ms at bf16, 0.1625 at int8
    assert "| 3072, 12288 | 4608 | 0.4500 | 0.4500 (1.00x) | 0.3250 (0.72x) | 0.1625 (0.36x) |" in lines
    assert "| 3072, 12288 | 1 | 0.0218 |  |  |  |" in lines
    assert gpu_ops.MMA_OPS_PER_CLOCK[(9, 0)] == (4096, 8192)
