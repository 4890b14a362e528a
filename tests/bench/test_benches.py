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
    out = bench("bench/bench_overhead.py", "--cases", "dln", "--loads", "idle", "--scale", "0.02",
                "--repeats", "1")
    row = next(line for line in out.splitlines() if line.startswith("| dln | idle | wall |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    plain, off, instr, paper = map(float, cells[3:7])
    assert float(cells[7]) == pytest.approx(plain / off, abs=0.01)
    assert float(cells[8]) == pytest.approx(plain / instr, abs=0.01)
    assert float(cells[9].split()[0]) == pytest.approx(plain / paper, abs=0.01)
    for same in cells[10:13]:  # the plain loop's bursts inside each fit's own process
        assert 0.1 < float(same) < 2
    share = float(cells[16].rstrip("%"))  # the Instruments hooks, timed in their own process
    assert 0 < share < 50
    assert 0.1 < float(cells[17]) < 2  # Lightning alone, against the plain bursts in its process


def test_bench_overhead_takes_ratios_within_each_repeat_and_their_median(tmp_path):
    tmp = tmp_path
    sys.path.insert(0, str(REPO / "bench"))
    from bench_overhead import paper_only, rows

    def repeat(plain, off, instr, pap):
        r = {k: {"wall": v, "cpu": v, "quiet_wall": v, "quiet_cpu": v}
             for k, v in (("plain", plain), ("off", off), ("instr", instr), ("paper", pap))}
        r["instr"]["hook_share"] = 0.01
        r["off"].update(plain_wall=plain / 2, plain_cpu=plain / 2)  # bursts in the fit's process
        return r

    # a machine twice as slow in the second repeat: the ratios stay; the third is an outlier
    cells = rows("dln", "idle", [repeat(1, 1.25, 2, 1.6), repeat(2, 2.5, 4, 3.2),
                                 repeat(1, 2, 2, 2)], "wall")
    assert cells[7] == "0.80 [0.50-0.80]"     # fit off / plain: 0.8, 0.8, 0.5
    assert cells[8] == "0.50 [0.50-0.50]"
    assert cells[9] == "0.62 [0.50-0.62] (>= 0.6)"
    assert cells[10] == "0.40 [0.25-0.40]"    # same process: off's bursts / off
    assert cells[11] == cells[12] == ""       # no bursts recorded for those
    assert cells[13] == "+60.0% [+0.0%-+60.0%]"
    # the paper's probes: the config's list without Curvature and BNGradientBound
    import yaml
    listed = paper_only(REPO / "configs/common/instruments_dln.yaml", tmp)
    blocks = yaml.safe_load(listed.read_text())
    assert [p["class_path"] for p in blocks[0]["init_args"]["probes"]] == [
        f"bnstudy.instruments.{name}" for name in ("ICS", "Landscape", "RandomLandscape",
                                                   "ActivationStats")]


def test_bench_startup_times_the_same_plan_in_both_checkouts(tmp_path):
    """--repo names another checkout; here this one again, so both run the same code: each
    invocation must finish its run (one seed), and the speed-up line compares their medians."""
    out = bench("bench/bench_startup.py", "--repo", str(REPO), "--plan", "--plan-alone",
                "--plan-only", "dln_lr1e-6", "--plan-scale", "0.001", "--repeats", "1")
    times = dict(re.findall(r"^  (this|other) +run 1: +([\d.]+) /", out, re.M))
    assert set(times) == {"this", "other"}
    speedup = float(re.search(r"other/this \(speed-up of this checkout\): wall ([\d.]+)",
                              out).group(1))
    other, this = float(times["other"]), float(times["this"])
    # both times are printed to 0.01 s and the ratio to 0.01: allow for the rounding of all three
    rounding = other / this * (0.005 / other + 0.005 / this) + 0.005
    assert speedup == pytest.approx(other / this, abs=rounding + 1e-9)


def test_bench_startup_runs_both_plans_at_once_and_sums_their_runs():
    """--plan-together: both plans at once, one run at a time each; the one that ends first runs
    again beside the other (then is stopped); every run of the plan is in the table, and the sum
    line is the sum of its rows."""
    out = bench("bench/bench_startup.py", "--repo", str(REPO), "--plan", "--plan-alone",
                "--plan-only", "dln_lr1e-6,dln_bn_lr1e-6", "--plan-scale", "0.001",
                "--plan-together")
    assert set(re.findall(r"^  (this|other) +plan: +[\d.]+", out, re.M)) == {"this", "other"}
    rows = {m[0]: (float(m[1]), float(m[2])) for m in
            re.findall(r"^  (dln\S+) +([\d.]+) +([\d.]+) +[\d.]+$", out, re.M)}
    assert set(rows) == {"dln_lr1e-6", "dln_bn_lr1e-6"}
    other, this = map(float, re.search(r"^  sum of the runs +([\d.]+) +([\d.]+)", out,
                                       re.M).groups())
    # each row and the sum printed to 0.1 s: allow for their rounding
    assert other == pytest.approx(sum(o for o, _ in rows.values()), abs=0.15 + 1e-9)
    assert this == pytest.approx(sum(t for _, t in rows.values()), abs=0.15 + 1e-9)


def test_bench_model_costs_times_every_norm_and_curvature_case_in_both_checkouts():
    out = bench("bench/bench_model_costs.py", "--quick", "--repo", str(REPO))
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in out.splitlines() if line.startswith("| "))}
    for norm in ("none", "batch", "noisy_batch", "l1", "l2", "linf"):
        this, old, ratio = rows[f"step {norm}"][1:]
        assert float(this.split()[0]) > 0 and float(old.split()[0]) > 0
        assert 0.1 < float(ratio.split()[0]) < 10
    for case in ("dln", "dln_l1", "dln_batch", "vgg11_bn"):
        this, old = rows[f"curvature {case}"][1:3]
        # the same code on both sides: the same products, the same eigenvalue
        assert re.search(r"\((\d+) products, lambda (\S+)\)", this).groups() == \
            re.search(r"\((\d+) products, lambda (\S+)\)", old).groups()


def test_bench_packing_times_the_same_steps_alone_and_packed():
    out = bench("bench/bench_packing.py", "--quick", "--repeats", "1", "--dln-steps", "3")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| DLN-25 |")]
    assert [int(r[1]) for r in rows] == [1, 2]
    for row in rows:
        alone, packed = float(row[2]), float(row[3])
        assert float(row[4].split()[0]) == pytest.approx(alone / packed, abs=0.01)
        # the packed step gives each member the gradient its own net gives (its own data)
        assert float(row[5]) < 1e-5
