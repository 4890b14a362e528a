"""DivergenceGuard (bnstudy/callbacks/divergence_guard.py) in real fits: a diverging run stops
cleanly with exit code 0 (or fails when asked), a healthy one is marked not diverged, and the
lazy device-side check still logs the exact step."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnstudy.cli import cli_main
from conftest import REPO
from tiny_fits import last, read_metrics, tiny_args

pytestmark = pytest.mark.slow


def test_divergence_stops_cleanly_with_exit_code_0(in_tmp):
    run_dir = in_tmp / "div"
    cmd = [sys.executable, "-m", "bnstudy", "fit", *tiny_args("quickstart.yaml"),
           "--model.norm=none", "--model.lr=1e4", "--model.init=kaiming", "--model.init_scale=3",
           "--trainer.max_steps=50", f"--run_dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "diverged" in proc.stderr
    rows = read_metrics(run_dir)
    assert last(rows, "diverged") == 1.0
    assert last(rows, "diverged_step") < 49  # stopped early, not at max_steps

    fail = subprocess.run(cmd[:-1] + [f"--run_dir={run_dir}2", "--divergence.on_divergence=fail"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert fail.returncode != 0 and "DivergedError" in fail.stderr


def test_healthy_run_is_marked_not_diverged(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = cli_main(["fit", *tiny_args("dln_bn.yaml"), "--run_dir=ok"])
    assert last(read_metrics(Path("ok")), "diverged") == 0.0
    assert cli.trainer.global_step == 3


DIVERGE = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--model.norm=none",
           "--model.lr=1e4", "--model.init=kaiming", "--model.init_scale=3", "--model.width=0.125",
           "--data.batch_size=16", "--trainer.max_steps=40", "--trainer.callbacks=[]",
           "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0"]


def test_lazy_divergence_check_logs_the_exact_step(in_tmp, monkeypatch):
    """The GPU's lazy check (exercised here on the CPU): the same diverged_step as the check that
    reads every loss, and a stop exactly `lag` steps later."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sync = cli_main(["fit", *DIVERGE, "--divergence.check=sync", "--run_dir=sync"])
    lazy = cli_main(["fit", *DIVERGE, "--divergence.check=lazy", "--divergence.lag=3",
                     "--run_dir=lazy"])
    step = last(read_metrics(in_tmp / "sync"), "diverged_step")
    assert step < 39 and sync.trainer.global_step == step
    assert last(read_metrics(in_tmp / "lazy"), "diverged_step") == step
    assert lazy.trainer.global_step == step + 3
