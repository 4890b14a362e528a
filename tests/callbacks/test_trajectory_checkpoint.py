"""TrajectoryCheckpoint (bnstudy/callbacks/trajectory_checkpoint.py): checkpoints/step-<N>.ckpt at
step 0 and on the schedule, off unless asked for, full checkpoints a run resumes from, and a
resume that changes the cadence."""
from __future__ import annotations

import pytest
import torch

from bnstudy.callbacks import TrajectoryCheckpoint
from bnstudy.cli import main
from tiny_fits import tiny_args


def test_the_schedule_is_step_zero_every_n_and_powers_of_two():
    due = lambda cb: [s for s in range(13) if cb.due(s)]  # noqa: E731
    assert due(TrajectoryCheckpoint()) == []  # off by default
    assert due(TrajectoryCheckpoint(every_n_train_steps=5)) == [0, 5, 10]
    assert due(TrajectoryCheckpoint(log_spaced=True)) == [0, 1, 2, 4, 8]
    assert due(TrajectoryCheckpoint(every_n_train_steps=3, log_spaced=True)) == [
        0, 1, 2, 3, 4, 6, 8, 9, 12]
    with pytest.raises(ValueError, match="trajectory.every_n_train_steps must be >= 1"):
        TrajectoryCheckpoint(every_n_train_steps=0)


def steps_saved(run_dir) -> dict[int, int]:
    """{N: the global step stored in step-<N>.ckpt}."""
    return {int(p.stem.removeprefix("step-")): torch.load(p, weights_only=True)["global_step"]
            for p in (run_dir / "checkpoints").glob("step-*.ckpt")}


@pytest.mark.slow  # two CLI fits
def test_a_fit_keeps_its_trajectory_and_a_resume_may_change_the_cadence(quiet):
    args = [*tiny_args("dln_bn.yaml"), "--run_dir=run", "--trainer.check_val_every_n_epoch=100"]
    assert main(["fit", *args, "--trainer.max_steps=4",
                 "--trajectory.every_n_train_steps=2"]) == 0
    assert steps_saved(quiet / "run") == {0: 0, 2: 2, 4: 4}
    # resumed from last.ckpt at step 4, now every 3 steps: 6 is new, 0 is not written again
    before = (quiet / "run" / "checkpoints" / "step-0.ckpt").stat().st_mtime_ns
    assert main(["fit", *args, "--trainer.max_steps=7",
                 "--trajectory.every_n_train_steps=3"]) == 0
    assert steps_saved(quiet / "run") == {0: 0, 2: 2, 4: 4, 6: 6}
    assert (quiet / "run" / "checkpoints" / "step-0.ckpt").stat().st_mtime_ns == before
