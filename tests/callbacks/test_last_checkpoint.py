"""LastCheckpoint (bnstudy/callbacks/last_checkpoint.py): a run killed (SIGKILL, no handler runs)
right after a last.ckpt and resumed from it ends with the metrics.csv of a run never stopped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch

from bnstudy.callbacks import AtomicCheckpointIO
from bnstudy.cli import cli_main
from conftest import REPO
from tiny_fits import ENV, TINY, assert_same_metrics


class KillAtStep(L.Callback):
    """SIGKILLs its own process when the training step after step BNSTUDY_TEST_KILL_AT starts
    (right after that step's last.ckpt and validation, before its row, held as the newest, is
    written again), or, with BNSTUDY_TEST_KILL_IN=validation, in that step's validation."""

    def _kill(self, trainer, where: str) -> None:
        if trainer.global_step == int(os.environ.get("BNSTUDY_TEST_KILL_AT", -1)) \
                and os.environ.get("BNSTUDY_TEST_KILL_IN", "training") == where \
                and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, *args) -> None:
        self._kill(trainer, "training")

    def on_validation_batch_end(self, trainer, *args) -> None:
        self._kill(trainer, "validation")


class KillAfterCheckpointFile(AtomicCheckpointIO):
    """With BNSTUDY_TEST_KILL_IN=checkpoint_file, SIGKILLs its own process right after the file
    last.ckpt of step BNSTUDY_TEST_KILL_AT is in place, before Lightning calls the loggers'
    after_save_checkpoint (the narrowest point: a random kill once landed there)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        if os.environ.get("BNSTUDY_TEST_KILL_IN") == "checkpoint_file" \
                and os.path.basename(path) == "last.ckpt" \
                and checkpoint["global_step"] == int(os.environ["BNSTUDY_TEST_KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("every, kill_at, where, resumes_from",
                         [(5, 5, "training", 5), (4, 8, "training", 8), (4, 8, "validation", 4),
                          (5, 5, "checkpoint_file", 5)],
                         ids=["between_validations", "after_a_validation", "in_a_validation",
                              "right_after_the_checkpoint_file"])
def test_a_run_killed_after_last_ckpt_resumes_to_the_rows_of_one_never_stopped(
        quiet, every, kill_at, where, resumes_from):
    """last.ckpt every `every` steps, validation every 4 (only the first writes a best
    checkpoint, which would write the row: the monitored `epoch` gets no smaller): the killed
    step's training metrics and, where it validates, its validation are in metrics.csv with its
    last.ckpt; a kill in that validation resumes from the checkpoint before it."""
    steps = 20
    args = [*TINY, "--model.norm=batch", "--trainer.enable_progress_bar=false",
            f"--trainer.max_steps={steps}", f"--last_checkpoint.every_n_train_steps={every}",
            "--trainer.val_check_interval=4", "--checkpoint.monitor=epoch",
            "--checkpoint.mode=min", "--trainer.callbacks+=test_last_checkpoint.KillAtStep",
            "--trainer.plugins=test_last_checkpoint.KillAfterCheckpointFile"]
    whole = quiet / "whole"
    cli_main(["fit", *args, f"--run_dir={whole}"])
    killed = quiet / "killed"
    env = {**ENV, "PYTHONPATH": os.pathsep.join(map(str, [REPO, REPO / "tests",
                                                           REPO / "tests" / "callbacks"]))}
    cmd = [sys.executable, "-m", "bnstudy", "fit", *args, f"--run_dir={killed}"]
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "BNSTUDY_TEST_KILL_AT": str(kill_at),
                                               "BNSTUDY_TEST_KILL_IN": where},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == resumes_from
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == steps
    assert assert_same_metrics(whole, killed) > 0
    assert sorted(p.name for p in last.parent.glob("best-*.ckpt")) == \
        sorted(p.name for p in (whole / "checkpoints").glob("best-*.ckpt"))
