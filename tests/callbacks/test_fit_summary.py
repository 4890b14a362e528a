"""FitSummary (bnstudy/callbacks/fit_summary.py): every fit ends with the run directory, what is in
it (and how to sync its offline W&B run) and the next commands, which work as printed."""
from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys

import pytest

from bnstudy.cli import main
from conftest import REPO
from tiny_fits import tiny_args

pytestmark = pytest.mark.slow


def test_a_fit_ends_with_where_its_run_is_and_what_to_run_next(in_tmp, monkeypatch):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    fit = subprocess.run([sys.executable, "-m", "bnstudy", "fit", *tiny_args("dln_bn.yaml"),
                          "--run_dir=run"], capture_output=True, text=True, env=env, timeout=300)
    assert fit.returncode == 0, fit.stderr[-2000:]
    where, held, then = fit.stderr.strip().splitlines()[-3:]  # the last lines, after W&B's own
    assert where == "bnstudy: run directory run"
    assert held.startswith("bnstudy: in it: metrics.csv, checkpoints/ (") and "last.ckpt" in held
    sync = held.split("(sync it: ", 1)[1].rstrip(")")
    assert sync == "wandb sync run/wandb/offline-run-*" and len(glob.glob(sync.split()[-1])) == 1
    plot, report = then.removeprefix("bnstudy: next: python -m bnstudy ").split(", or python -m "
                                                                                "bnstudy ")
    assert main(shlex.split(plot)) == 0 and (in_tmp / "run" / "plot.png").stat().st_size > 1000
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(shlex.split(report)) == 0 and (in_tmp / "run" / "report" / "index.html").exists()


def test_without_wandb_the_lines_leave_it_out(in_tmp, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["fit", *tiny_args("dln_bn.yaml"), "--run_dir=run"]) == 0
    held = [line for line in capfd.readouterr().err.splitlines()
            if line.startswith("bnstudy: in it: ")]
    assert len(held) == 1 and "W&B" not in held[0]
