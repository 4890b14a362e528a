"""StepProgressBar (bnstudy/callbacks/step_progress_bar.py): a step-limited fit counts steps; its
refresh thread wakes as often as it draws; it shows the training metrics of the step."""
from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar

from bnstudy.callbacks import StepProgressBar
from bnstudy.cli import cli_main

from tiny_fits import ENV, TINY, bnstudy, rows

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


class SeenAtStepEnd(L.Callback):
    """The training metrics a callback (the progress bar, a monitor) finds at each step's end."""

    def __init__(self):
        self.seen: list[tuple[dict, dict]] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        keep = ("train/loss", "train/acc")
        self.seen.append(({k: v for k, v in trainer.callback_metrics.items() if k in keep},
                          {k: v for k, v in trainer.progress_bar_metrics.items() if k in keep}))


def test_callbacks_and_the_bar_see_the_step_s_training_metrics(tmp_path):
    """At a logging step's end the callbacks' metrics (tensors) and the progress bar's (numbers)
    hold that step's train/loss and train/acc, the values its metrics.csv row has; in the steps
    between, the last logged ones."""
    run_dir = tmp_path / "run"
    cli = cli_main(["fit", *TINY, "--trainer.enable_progress_bar=false",
                    "--trainer.max_steps=9", "--trainer.log_every_n_steps=3",
                    f"--run_dir={run_dir}",
                    "--trainer.callbacks+=test_step_progress_bar.SeenAtStepEnd"])
    seen = next(c for c in cli.trainer.callbacks if isinstance(c, SeenAtStepEnd)).seen
    logged = [r for r in rows(run_dir) if r.get("train/loss")]
    assert len(seen) == 9 and len(logged) == 3
    for step, (callback, bar) in enumerate(seen):
        if step < 2:  # logged at steps 2, 5 and 8
            assert callback == bar == {}
            continue
        row = logged[(step - 2) // 3]
        assert set(callback) == set(bar) == {"train/loss", "train/acc"}
        for key in callback:
            assert isinstance(callback[key], torch.Tensor) and type(bar[key]) is float
            assert float(callback[key]) == bar[key] == float(row[key]), (step, key)
