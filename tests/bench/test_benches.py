"""The benchmarks run on this checkout's code (a rename in bnstudy once broke one unnoticed): each
at its smallest, checking the counts it reports, not its timings."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO
from tiny_fits import ENV

pytestmark = pytest.mark.slow


def bench(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_spectrum_counts_the_products_of_each_method():
    out = bench("bench/bench_spectrum.py", "--threads", "1", "--models", "dln", "--n-v", "2",
                "--m", "5", "--grid", "3", "--dln-steps", "2")
    density, surface = out.split("\nSurface (")
    rows = {m.group(1): int(m.group(2)) for m in
            re.finditer(r"^\| DLN-25, batch 1000 \| ([^|]+?) \| (\d+) \|", density, re.M)}
    assert rows["ours"] == 2 * 5                 # n_v x m
    assert rows["PyHessian"] == 2 * 100          # n_v x its 100 iterations
    assert rows["PyHessian default (n_v=1)"] == 100
    assert re.search(r"^\| DLN-25, batch 1000 \| ours \| 9 \|", surface, re.M)  # 3x3 points


def test_bench_overhead_prints_every_ratio_for_a_case():
    out = bench("bench/bench_overhead.py", "--cases", "dln", "--loads", "idle", "--scale", "0.02")
    row = next(line for line in out.splitlines() if line.startswith("| dln | idle | wall |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    plain, off, instr = map(float, cells[3:6])
    assert float(cells[6]) == pytest.approx(plain / off, abs=0.01)
    assert float(cells[7].split()[0]) == pytest.approx(plain / instr, abs=0.01)
    share = float(cells[11].rstrip("%"))  # the Instruments hooks, timed in their own process
    assert 0 < share < 50
