"""The findings driver end to end with a tiny budget (a real subprocess through the CLI), and the
matched-accuracy rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bnstudy.analysis.runs import Run
from bnstudy.study.findings import matched, tables
from conftest import REPO


@pytest.mark.slow
def test_findings_driver_with_a_tiny_budget(tmp_path):
    out = tmp_path / "findings"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "bnstudy", "findings", "--budget", "tiny",
                           "--only", "eos", "lemma45", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[10/10] eos: vgg lr=0.1 norm=batch fixed" in proc.stdout  # progress, one line a run
    found = json.loads((out / "findings.json").read_text())
    assert set(found) == {"budget", "settings", "eos", "lemma45"}
    runs = found["eos"]["series"]
    assert set(runs) == {f"{k} lr={lr} norm={n}" for k, lrs in (("dln", ("1e-06", "1e-07")),
                                                                  ("vgg", ("0.1", "0.5")))
                         for lr in lrs for n in ("none", "batch")} | {
                             "vgg lr=0.1 norm=none fixed", "vgg lr=0.1 norm=batch fixed"}
    dln = runs["dln lr=1e-06 norm=batch"]
    assert dln["two_over_lr"] == pytest.approx(2e6)
    assert [s for s, _ in dln["lambda_max"]] == [0, 1] and dln["lambda_max"][0][1] > 0
    thm = found["eos"]["theorem41"]
    assert set(thm) == {k for k in runs if k.endswith("batch")}  # BN runs only
    assert thm["dln lr=1e-06 norm=batch"]["ratio_rederived"]["max"] == pytest.approx(1, rel=1e-3)
    rows = found["lemma45"]["rows"]
    assert len(rows) == 9
    for layer in rows[0]["layers"]:  # the lemma's bound is the closest rescaled distance
        assert layer["closest"] == pytest.approx(layer["bound"], rel=1e-6, abs=1e-9)
    for name in ("eos.png", "theorem41.png", "lemma45.png"):
        assert (out / name).stat().st_size > 1000
    md = tables(found)  # what `findings --tables` prints for docs/FINDINGS.md
    assert "### eos" in md and "| dln lr=1e-06 norm=batch |" in md and "### lemma45" in md


def test_bad_part_is_a_one_line_error(capsys):
    from bnstudy.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["findings", "--only", "nope"])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_matched_accuracy_picks_the_first_measurement_at_the_level():
    run = Run(id="vgg", config={}, metrics={
        "train/acc": [(s, 0.5 if s < 30 else 0.95) for s in range(100)],
        "curv/lambda_max": [(s, float(s)) for s in (0, 25, 50, 75)],
        "landscape/beta_eff": [(s, 2.0 * s) for s in (0, 25, 50, 75)]})
    assert matched(run, 0.9) == {"step": 50, "lambda_max": 50.0, "beta_eff": 100.0}
    assert matched(run, 0.99)["step"] is None


@pytest.mark.slow
def test_vgg_parts_run_on_the_cifar_shaped_digits_when_asked():
    """--vgg-image-size 32: the VGG parts train on 3x32x32 digits (all five pools run), and the
    probes measure there."""
    from bnstudy.study import findings

    run = findings.fit(model="vgg", steps=2, every=1, norm="none", lr=0.1, image_size=32)
    assert run.summary["input_shape"] == [64, 3, 32, 32]
    assert [s for s, _ in run.series("curv/lambda_max")] == [0, 1]
    assert findings.fit(model="vgg", steps=1, every=0, norm="batch", lr=0.1).summary[
        "input_shape"] == [64, 1, 8, 8]  # the default stays the fast 8x8
