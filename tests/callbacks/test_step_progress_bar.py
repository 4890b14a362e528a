"""StepProgressBar (bnstudy/callbacks/step_progress_bar.py): a step-limited fit counts steps; its
refresh thread wakes as often as it draws."""
from __future__ import annotations

import re

import pytest
from lightning.pytorch.callbacks import RichProgressBar

from bnstudy.callbacks import StepProgressBar

from tiny_fits import ENV, TINY, bnstudy

pytestmark = pytest.mark.slow


def test_step_limited_progress_bar_counts_steps(tmp_path):
    proc = bnstudy("fit", *TINY, "--trainer.max_steps=12", f"--run_dir={tmp_path / 'run'}",
                   env={**ENV, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"Step\s.*12/12", proc.stdout), proc.stdout[-2000:]
    assert "/-2" not in proc.stdout and "Epoch" not in proc.stdout
    assert "Tip" not in proc.stdout + proc.stderr  # no third-party promotion


def test_the_refresh_thread_wakes_as_often_as_the_bar_draws():
    assert RichProgressBar().refresh_rate == 100  # Lightning's: 100 wake-ups a second
    assert StepProgressBar().refresh_rate == 2  # draws at most every 0.5 s
    assert StepProgressBar(interval=0.1).refresh_rate == 10
    assert StepProgressBar(refresh_rate=5).refresh_rate == 5  # an explicit rate wins
    assert StepProgressBar(interval=0).refresh_rate == 100  # a draw every step: as Lightning
