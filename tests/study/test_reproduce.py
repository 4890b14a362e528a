"""`python -m bnstudy reproduce`: the mini plan's runs are the paper's settings, and the driver runs
them end to end with a tiny step budget, skips finished runs on a rerun and writes the report."""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import wandb_records
from bnstudy.lightning_cli import parse_only
from bnstudy.study.reproduce import DLN_STEPS, child_env, mini_runs
from conftest import REPO
from tiny_fits import assert_same_metrics, read_metrics


def test_mini_plan_is_the_papers_grid(tmp_path):
    """Every run's fit command parses, and the plan holds the runs claims 1-5 need: the DLN at
    the paper's size, steps and lrs; the VGG-11 miniature on 32x32x3 digits at lr 0.1/0.5/0.01."""
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
    assert all(m.depth == 11 and m.channels_last and m.init == "glorot" and m.optimizer == "sgd"
               and m.momentum == 0 and (d.image_size, d.channels, d.batch_size) == (32, 3, 128)
               for m, _, d in vgg.values())


def test_every_arm_runs_with_each_seed(tmp_path):
    """--seeds N: every arm N times, seed S as seed_everything and data.seed (the VGG's init,
    order and split; the DLN's init, A and x), seed 0 of every arm first; the VGG-11's
    instruments measure the layers mapped from the paper's VGG-16 (5, 10 -> 3, 6)."""
    arms = {r.name for r in mini_runs(1)}
    runs = mini_runs(2)
    assert [r.name for r in runs] == [f"{a.arm}_s{a.seed}" for a in runs]
    assert [r.seed for r in runs] == [0] * len(arms) + [1] * len(arms)
    assert {r.arm for r in runs} == {n.removesuffix("_s0") for n in arms}
    for run in (runs[0], runs[len(arms)], runs[2], runs[len(arms) + 2]):  # VGG and DLN, 2 seeds
        cfg = parse_only(run.fit_args(tmp_path / run.name, 1.0)).config["fit"]
        assert cfg.seed_everything == cfg.data.init_args.seed == run.seed
        if run.config.startswith("vgg"):
            assert cfg.data.class_path == "bnstudy.data.DigitsData"
            ics = cfg.trainer.callbacks[0].init_args.probes[0]
            assert ics.class_path.endswith("ICS") and ics.init_args.layers == [3, 6]
    proc = subprocess.run([sys.executable, "-m", "bnstudy", "reproduce", "mini", "--dry-run",
                           "--only", "vgg_lr0.1", "--seeds", "2"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert [line.split(":")[0] for line in proc.stdout.splitlines()[::2]] == [
        "# vgg_lr0.1_s0", "# vgg_lr0.1_s1"]


def reproduce(out, *args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "bnstudy", "reproduce", "mini", "--out", str(out),
                           "--only", "dln_bn_lr1e-6,vgg_lr0.5", "--steps-scale", "0.0005", "--seeds", "1",
                           *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_driver_runs_skips_finished_runs_and_writes_the_report(tmp_path):
    out = tmp_path / "mini"
    first = reproduce(out, "--docs", str(tmp_path / "docs"))
    assert first.returncode == 0, first.stdout + first.stderr
    names = ["dln_bn_lr1e-6_s0", "vgg_lr0.5_s0"]
    for name in names:
        run_dir = out / "runs" / name
        assert (run_dir / "metrics.csv").stat().st_size > 0 and (run_dir / "done.json").exists()
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["trainer"]["max_steps"] == (5 if name.startswith("dln") else 2)
        assert config["run_dir"] == str(run_dir)
    assert yaml.safe_load((out / "runs" / "vgg_lr0.5_s0" / "config.yaml").read_text())[
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
    metrics = (out / "runs" / "vgg_lr0.5_s0" / "metrics.csv").read_bytes()
    (out / "runs" / "dln_bn_lr1e-6_s0" / "done.json").unlink()
    second = reproduce(out, "--no-report")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "skipped vgg_lr0.5" in second.stdout and "skipped dln_bn" not in second.stdout
    timing = json.loads((out / "timing.json").read_text())
    assert {n: r["skipped"] for n, r in timing["runs"].items()} == {
        "vgg_lr0.5_s0": True, "dln_bn_lr1e-6_s0": False}
    # the first invocation, which ran the whole plan, keeps its time in the record
    assert [(i["ran"], i["of"]) for i in timing["invocations"]] == [(2, 2), (1, 2)]
    first_wall = timing["invocations"][0]["wall_s"]
    assert f"all 2 runs in one invocation: {first_wall / 60:.1f} min wall" in (
        out / "summary.md").read_text()
    assert (out / "runs" / "vgg_lr0.5_s0" / "metrics.csv").read_bytes() == metrics
    assert (out / "runs" / "dln_bn_lr1e-6_s0" / "done.json").exists()

    # a run finished at another step budget is run again; the earlier one is kept beside it
    from bnstudy.study.reproduce import VGG_STEPS

    third = reproduce(out, "--no-report", "--only", "vgg_lr0.5", "--steps-scale", str(3 / VGG_STEPS))
    assert third.returncode == 0, third.stdout + third.stderr
    assert "skipped vgg_lr0.5" not in third.stdout
    assert json.loads((out / "runs" / "vgg_lr0.5_s0" / "done.json").read_text())["steps"] == 3
    assert (out / "runs" / "vgg_lr0.5_s0.2-steps" / "metrics.csv").read_bytes() == metrics


def test_bad_arguments_fail_with_one_line(tmp_path):
    proc = reproduce(tmp_path, "--only", "nothing*", timeout=120)
    assert proc.returncode == 2 and "matches no run" in proc.stderr.splitlines()[-1]


# -- runs in worker processes --------------------------------------------------------------------
def dry_run(out: Path, only: str, scale: str) -> dict[str, str]:
    """{run name: the `fit` command --dry-run prints for it}."""
    proc = subprocess.run([sys.executable, "-m", "bnstudy", "reproduce", "mini", "--out", str(out),
                           "--only", only, "--steps-scale", scale, "--seeds", "1", "--dry-run"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    return {lines[i].split(":")[0][2:]: lines[i + 1] for i in range(0, len(lines), 2)}


@pytest.mark.slow
def test_runs_in_one_worker_equal_runs_in_their_own_processes(tmp_path):
    """Three runs one after another in one worker process (a DLN, then VGG and DLN with noisy BN's
    random streams; W&B offline) write the metrics.csv, bit for bit, of the same `fit` commands
    (as --dry-run prints them) each run in a process of its own, and each its own W&B run."""
    only, scale = "vgg_noisy_bn_lr0.1,dln_noisy_bn_lr1e-6,dln_bn_lr1e-6", "0.04"
    out = tmp_path / "plan"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = reproduce(out, "--only", only, "--steps-scale", scale, "--jobs", "1", "--no-report",
                     env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = {n: json.loads((out / "runs" / f"{n}_s0" / "done.json").read_text())
            for n in only.split(",")}
    assert len({d["worker"] for d in done.values()}) == 1  # one process ran the three
    assert {n: d["worker_run"] for n, d in done.items()} == {  # in the plan's order
        "dln_bn_lr1e-6": 1, "vgg_noisy_bn_lr0.1": 2, "dln_noisy_bn_lr1e-6": 3}
    commands = dry_run(out, only, scale)
    alone = dry_run(tmp_path / "alone", only, scale)
    for name, command in commands.items():
        log = (out / "logs" / f"{name}.log").read_text()
        ran = log.split("\n$ ", 1)[1].splitlines()[0]  # the command the worker ran, as logged
        # the same arguments; --dry-run names the config relative to the repository
        assert ran.replace(f"{REPO}/configs/", "configs/") == command, name
        assert "first training step" in log and "exit code 0" in log
        single = subprocess.run([sys.executable, *alone[name].split()[1:]], cwd=REPO,
                                env=child_env(1) | {"WANDB_MODE": "offline"},
                                capture_output=True, text=True, timeout=300)
        assert single.returncode == 0, single.stderr[-3000:]
        assert assert_same_metrics(out / "runs" / name, tmp_path / "alone" / "runs" / name) > 100
        logged = [r["train/loss"] for r in wandb_records.history(out / "runs" / name)
                  if "train/loss" in r]
        assert len(logged) == sum(r["train/loss"] != "" for r in read_metrics(out / "runs" / name))
        assert len(logged) >= 2, name


def _first_steps(out: Path) -> int:
    return sum(p.read_text().count("bnstudy: first training step")
               for p in (out / "logs").glob("*.log")) if (out / "logs").exists() else 0


@pytest.mark.slow
def test_a_plan_killed_at_random_points_ends_as_an_uninterrupted_one(tmp_path):
    """`reproduce` is killed with SIGTERM to its process group (as `kill -- -PGID` or a batch
    system does) at random points, during the workers' start-up, between runs and in the middle
    of runs; each time it exits 143 after its runs stopped at the end of a step with a
    checkpoint. Rerun to the end, every run's metrics.csv is the uninterrupted plan's, timings
    aside: losses, accuracies, probes, and the throughput monitor's train/batches and
    train/samples, which go on counting across a resume."""
    only, scale = "dln_lr1e-6,dln_bn_lr1e-6,dln_noisy_bn_lr1e-6,vgg_lr0.1", "0.02"
    args = ["--only", only, "--steps-scale", scale, "--seeds", "1", "--no-report"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    whole = tmp_path / "whole"
    proc = subprocess.run([sys.executable, "-m", "bnstudy", "reproduce", "mini", "--out",
                           str(whole), *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "killed"
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    codes = []
    for attempt in range(4):
        seen = _first_steps(out)
        with open(tmp_path / f"driver{attempt}.txt", "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "bnstudy", "reproduce", "mini",
                                     "--out", str(out), *args], cwd=REPO, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        if attempt % 2:  # anywhere: in the workers' start-up, a run's, between runs
            time.sleep(rng.uniform(0.5, 12.0))
        else:  # in a run's training: after a first step, some steps later
            while _first_steps(out) == seen and proc.poll() is None:
                assert time.monotonic() < deadline, "no run started"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        codes.append(proc.wait(timeout=300))
        if codes[-1] == 0:
            break  # it finished before the signal
        assert codes[-1] == 128 + signal.SIGTERM, (seed, codes,
                                                   (tmp_path / f"driver{attempt}.txt").read_text())
    stops = sum(p.read_text().count("stopped by SIGTERM at the end of step")
                for p in (out / "logs").glob("*.log"))
    assert stops >= 1, (seed, codes)  # at least one run was stopped in the middle
    proc = subprocess.run([sys.executable, "-m", "bnstudy", "reproduce", "mini", "--out",
                           str(out), *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in [f"{n}_s0" for n in only.split(",")]:
        assert (out / "runs" / name / "done.json").exists()
        assert assert_same_metrics(whole / "runs" / name, out / "runs" / name) > 100, (seed, name)
