"""StepEndSignals (bnstudy/callbacks/step_end_signals.py): real signals at random steps, each stop
with a resumable checkpoint, and a resumed run that ends bit for bit as an uninterrupted one."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnstudy.cli import cli_main
from conftest import REPO
from tiny_fits import ENV, TINY, assert_identical, rows

pytestmark = pytest.mark.slow


def _wait_for_new_checkpoint(proc, last: Path, since: float, timeout: float = 240) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if last.exists() and last.stat().st_mtime > since:
            return True
        time.sleep(0.02)
    raise AssertionError("no checkpoint written")


def test_killed_run_reports_it_and_every_resume_ends_bit_identical(quiet):
    """A fit is stopped by SIGTERM/SIGINT at random steps three times; each stop exits 128 +
    signal with a resumable checkpoint; the resumed run ends exactly like an uninterrupted one,
    with one metrics.csv row per step and the best-checkpoint policy kept."""
    steps = 150
    args = [*TINY, "--model.norm=noisy_batch", "--trainer.enable_progress_bar=false",
            f"--trainer.max_steps={steps}", "--last_checkpoint.every_n_train_steps=5",
            "--trainer.val_check_interval=25"]
    whole = quiet / "whole"
    cli_main(["fit", *args, f"--run_dir={whole}"])
    run_dir = quiet / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    rng = random.Random(os.getpid())
    kills = []
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        since = last.stat().st_mtime if last.exists() else 0.0
        proc = subprocess.Popen([sys.executable, "-m", "bnstudy", "fit", *args,
                                 f"--run_dir={run_dir}"], cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if _wait_for_new_checkpoint(proc, last, since):
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
        if proc.returncode == 0:
            break  # it finished before the signal: nothing left to interrupt
        if sig == signal.SIGKILL:  # a hard crash: no handler runs, nothing is saved on the way out
            assert proc.returncode == -signal.SIGKILL, err[-3000:]
            step = torch.load(last, weights_only=True)["global_step"]
            logged = {int(r["step"]) for r in rows(run_dir)}
            assert set(range(step)) <= logged, "metrics.csv lost rows before the checkpoint"
            continue
        assert proc.returncode == 128 + sig, err[-3000:]
        m = re.search(rf"stopped by {sig.name} at the end of step (\d+); resumable checkpoint "
                      rf"(\S+); rerun", err)
        assert m, err[-3000:]
        step = int(m.group(1))
        assert torch.load(m.group(2), weights_only=True)["global_step"] == step
        kills.append(step)
    assert kills, "no run was interrupted"
    proc = subprocess.run([sys.executable, "-m", "bnstudy", "fit", *args, f"--run_dir={run_dir}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == steps
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert_identical(value, b["state_dict"][key], key)  # noisy BN's generators too
    whole_rows, killed_rows = rows(whole), rows(run_dir)
    assert [r["step"] for r in killed_rows] == [r["step"] for r in whole_rows]  # one row a step
    assert len({r["step"] for r in killed_rows}) == len(killed_rows)
    for column in ("train/loss", "val/acc", "val/loss"):
        assert [r[column] for r in killed_rows] == [r[column] for r in whole_rows], column
    best = sorted(p.name for p in last.parent.glob("best-*.ckpt"))
    assert best == sorted(p.name for p in (whole / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
