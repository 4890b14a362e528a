"""checkpoints/step-<N>.ckpt along training: the trajectory `python -m bnstudy spectrum` and
`surface` read."""
from __future__ import annotations

import os

import lightning as L

class TrajectoryCheckpoint(L.Callback):
    """A run's trajectory as checkpoints, for `python -m bnstudy spectrum` and `surface`:
    checkpoints/step-<step>.ckpt at step 0 (the initialization), every `every_n_train_steps`
    steps and, with `log_spaced`, at steps 1, 2, 4, 8, ... Off unless one of them is set
    (`--trajectory.every_n_train_steps=500`). Each is a full training checkpoint (a run can be
    resumed from it), written at the end of its step like last.ckpt."""

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int | None = None,
                 log_spaced: bool = False):
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError("trajectory.every_n_train_steps must be >= 1 or null; "
                             f"got {every_n_train_steps}")
        self.dirpath, self.every, self.log_spaced = dirpath, every_n_train_steps, log_spaced

    def due(self, step: int) -> bool:
        if step == 0:
            return bool(self.every or self.log_spaced)
        return bool(self.every and step % self.every == 0) or (
            self.log_spaced and step & (step - 1) == 0)

    def _save(self, trainer) -> None:
        step = trainer.global_step
        if self.due(step):
            dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
            trainer.save_checkpoint(os.path.join(dirpath, f"step-{step}.ckpt"), weights_only=False)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            self._save(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._save(trainer)
