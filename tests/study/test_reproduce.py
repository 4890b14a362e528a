"""`python -m bnstudy reproduce`: the mini plan's runs are the paper's settings, and the driver runs
them end to end with a tiny step budget, skips finished runs on a rerun and writes the report."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from bnstudy.lightning_cli import parse_only
from bnstudy.study.reproduce import DLN_STEPS, mini_runs
from conftest import REPO


def test_mini_plan_is_the_papers_grid(tmp_path):
    """Every run's fit command parses, and the plan holds the runs claims 1-5 need: the DLN at
    the paper's size, steps and lrs; the VGG-16 miniature on 32x32x3 digits at lr 0.1/0.5/0.01."""
    runs = {r.name: r for r in mini_runs()}
    assert len(runs) == len(mini_runs())  # names are unique: each run has its own directory
    parsed = {}
    for name, run in runs.items():
        cfg = parse_only(run.fit_args(tmp_path / name, 1.0)).config["fit"]
        parsed[name] = (cfg.model.init_args, cfg.trainer.max_steps, cfg.data.init_args)
    dln = {n: p for n, p in parsed.items() if n.startswith("dln")}
    assert {(m.norm, m.lr) for m, _, _ in dln.values()} == {
        ("none", 1e-6), ("batch", 1e-6), ("none", 1e-7), ("batch", 1e-7), ("noisy_batch", 1e-6),
        ("l1", 1e-6), ("l2", 1e-6), ("linf", 1e-6)}
    assert all(s == DLN_STEPS == 10_000 and m.depth == 25 and d.num_samples == 1000
               and d.steps_per_epoch == 100 for m, s, d in dln.values())
    vgg = {n: p for n, p in parsed.items() if n.startswith("vgg")}
    assert {(m.norm, m.lr) for m, _, _ in vgg.values()} == {
        ("batch", 0.1), ("none", 0.1), ("batch", 0.5), ("none", 0.5), ("noisy_batch", 0.1),
        ("noise", 0.1), ("l1", 0.1), ("l2", 0.1), ("linf", 0.1), ("batch", 0.01),
        ("none", 0.01)}
    assert all(m.depth == 16 and m.init == "glorot" and m.optimizer == "sgd" and m.momentum == 0
               and (d.image_size, d.channels, d.batch_size) == (32, 3, 128)
               for m, _, d in vgg.values())


def reproduce(out, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bnstudy", "reproduce", "mini", "--out", str(out),
                           "--only", "dln_bn_lr1e-6,vgg_lr0.5", "--steps-scale", "0.0005", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_driver_runs_skips_finished_runs_and_writes_the_report(tmp_path):
    out = tmp_path / "mini"
    first = reproduce(out, "--docs", str(tmp_path / "docs"))
    assert first.returncode == 0, first.stdout + first.stderr
    names = ["dln_bn_lr1e-6", "vgg_lr0.5"]
    for name in names:
        run_dir = out / "runs" / name
        assert (run_dir / "metrics.csv").stat().st_size > 0 and (run_dir / "done.json").exists()
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["trainer"]["max_steps"] == (5 if name.startswith("dln") else 2)
        assert config["run_dir"] == str(run_dir)
    assert yaml.safe_load((out / "runs" / "vgg_lr0.5" / "config.yaml").read_text())[
        "model"]["init_args"]["lr"] == 0.5
    timing = json.loads((out / "timing.json").read_text())
    assert set(timing["runs"]) == set(names) and timing["wall_s"] > 0
    assert not any(r["skipped"] for r in timing["runs"].values())
    assert all(r["rc"] == 0 and r["cpu_s"] > 0 for r in timing["runs"].values())
    summary = (out / "summary.md").read_text()  # what docs/RESULTS.md quotes
    assert all(f"| {name} |" in summary for name in names)
    assert (out / "report" / "index.html").stat().st_size > 0
    assert "| 1. BN trains faster" in summary  # the claims table
    pngs = {p.name for p in (out / "report").glob("*.png")}
    assert pngs and pngs == {p.name for p in (tmp_path / "docs").glob("*.png")}
    assert (tmp_path / "docs" / "summary.md").read_text() == summary

    # a rerun skips both finished runs and leaves their files alone; a run whose done.json is
    # gone (an interrupted run) runs again
    metrics = (out / "runs" / "vgg_lr0.5" / "metrics.csv").read_bytes()
    (out / "runs" / "dln_bn_lr1e-6" / "done.json").unlink()
    second = reproduce(out, "--no-report")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "skipped vgg_lr0.5" in second.stdout and "skipped dln_bn" not in second.stdout
    timing = json.loads((out / "timing.json").read_text())
    assert {n: r["skipped"] for n, r in timing["runs"].items()} == {
        "vgg_lr0.5": True, "dln_bn_lr1e-6": False}
    # the first invocation, which ran the whole plan, keeps its time in the record
    assert [(i["ran"], i["of"]) for i in timing["invocations"]] == [(2, 2), (1, 2)]
    first_wall = timing["invocations"][0]["wall_s"]
    assert f"all 2 runs in one invocation: {first_wall / 60:.1f} min wall" in (
        out / "summary.md").read_text()
    assert (out / "runs" / "vgg_lr0.5" / "metrics.csv").read_bytes() == metrics
    assert (out / "runs" / "dln_bn_lr1e-6" / "done.json").exists()

    # a run finished at another step budget is run again; the earlier one is kept beside it
    from bnstudy.study.reproduce import VGG_STEPS

    third = reproduce(out, "--no-report", "--only", "vgg_lr0.5", "--steps-scale", str(3 / VGG_STEPS))
    assert third.returncode == 0, third.stdout + third.stderr
    assert "skipped vgg_lr0.5" not in third.stdout
    assert json.loads((out / "runs" / "vgg_lr0.5" / "done.json").read_text())["steps"] == 3
    assert (out / "runs" / "vgg_lr0.5.2-steps" / "metrics.csv").read_bytes() == metrics


def test_bad_arguments_fail_with_one_line(tmp_path):
    proc = reproduce(tmp_path, "--only", "nothing*", timeout=120)
    assert proc.returncode == 2 and "matches no run" in proc.stderr.splitlines()[-1]
