"""The findings driver end to end with a tiny budget (a real subprocess through the CLI), and the
matched-accuracy rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bnstudy.analysis.runs import Run
from bnstudy.study.findings import at_matched_loss, matched, over_seeds, steps_to, tables
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
def test_seeded_vgg_parts_run_reproduce_minis_net_and_report_over_seeds(tmp_path):
    """The generalization and smoother parts with --seeds 2 on the faithful setup (reproduce
    mini's VGG-11 w1/8 on 3x32x32 digits, batch 128): one run per arm and seed, whole-set
    evaluations, rows per arm over both seeds, tables and figures."""
    out = tmp_path / "findings"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "bnstudy", "findings", "--budget", "tiny",
                           "--only", "generalization", "smoother", "--seeds", "2",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[14/14] smoother: norm=linf seed=1" in proc.stdout
    found = json.loads((out / "findings.json").read_text())
    assert found["settings"]["vgg"]["image_size"] == 32 and found["settings"]["seeds"] == 2
    g = found["generalization"]
    assert set(g["runs"]) == {f"norm={n} seed={s}" for n in ("none", "batch") for s in (0, 1)}
    series = g["series"]["norm=batch seed=0"]
    assert [s for s, _ in series["eval/test_acc"]] == [0, 1, 2]  # start, every step, the end
    arm = g["arms"]["norm=batch"]
    assert arm["final_test_acc"]["n"] == 2
    accs = [g["runs"][f"norm=batch seed={s}"]["final_test_acc"] for s in (0, 1)]
    assert arm["final_test_acc"]["mean"] == pytest.approx(sum(accs) / 2)
    sm = found["smoother"]
    assert set(sm["arms"]) == {f"norm={n}" for n in
                               ("none", "batch", "layer", "group", "l1", "l2", "linf")}
    assert all(row["final_loss"]["n_all"] == 2 for row in sm["arms"].values())
    md = tables(found)
    assert "| norm=batch | loss<=0.1 |" in md and "| norm=l2 |" in md
    for name in ("generalization.png", "smoother.png"):
        assert (out / name).stat().st_size > 1000


def test_over_seeds_counts_the_seeds_that_never_reached_and_the_diverged():
    rows = {"a seed=0": {"steps": 10, "loss": 0.5}, "a seed=1": {"steps": None, "loss": 0.7},
            "a seed=2": {"steps": 30, "loss": float("nan")}, "b seed=0": {"steps": 5, "loss": 1}}
    arms = over_seeds(rows)
    assert arms["a"]["steps"] == {"mean": 20.0, "sd": pytest.approx(14.142, rel=1e-4), "n": 2,
                                  "n_all": 3}
    assert arms["a"]["loss"]["mean"] == pytest.approx(0.6) and arms["a"]["loss"]["n"] == 2
    assert arms["b"]["steps"] == {"mean": 5.0, "sd": 0.0, "n": 1, "n_all": 1}


def test_steps_to_and_matched_loss_read_the_first_step_at_the_level():
    acc = [(s, 0.0 if s < 40 else 1.0) for s in range(100)]
    run = Run(id="vgg", config={}, metrics={
        "train/acc": acc, "eval/train_loss": [(0, 2.3), (25, 0.5), (50, 0.08), (75, 0.01)],
        "eval/train_acc": [(0, 0.1), (25, 0.8), (50, 0.98), (75, 1.0)],
        "eval/test_acc": [(0, 0.1), (25, 0.7), (50, 0.9), (75, 0.92)]})
    assert steps_to(run, 0.9) == 57  # 18 of the last 20 steps at 1.0
    assert steps_to(run, 0.5) == 49
    assert at_matched_loss(run, 0.1) == {"step": 50, "train_acc": 0.98, "test_acc": 0.9,
                                         "gap": pytest.approx(0.08)}
    assert at_matched_loss(run, 0.4)["step"] == 50  # 0.5 at step 25 is above the level
    assert at_matched_loss(run, 0.001)["step"] is None


@pytest.mark.slow
def test_vgg_parts_run_on_the_cifar_shaped_digits_when_asked():
    """image_size=32 (the faithful setup's): the VGG trains on 3x32x32 digits (all five pools
    run), and the probes measure there."""
    from bnstudy.study import findings

    run = findings.fit(model="vgg", steps=2, every=1, norm="none", lr=0.1, image_size=32)
    assert run.summary["input_shape"] == [64, 3, 32, 32]
    assert [s for s, _ in run.series("curv/lambda_max")] == [0, 1]
    assert findings.fit(model="vgg", steps=1, every=0, norm="batch", lr=0.1).summary[
        "input_shape"] == [64, 1, 8, 8]  # the default stays the fast 8x8
