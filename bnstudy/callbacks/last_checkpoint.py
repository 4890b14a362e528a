"""last.ckpt every few minutes (or steps) of training and after the final step."""
from __future__ import annotations

import time

from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt every `every_minutes` of training (default 10), or every `every_n_train_steps`
    steps when that is given, and after the final step, whatever the monitored metric does
    (ModelCheckpoint's save_last only follows its own save triggers). Saved at the end of a
    training step, the only point where a resumed run continues exactly.

    Time, not steps, by default: a VGG-16 checkpoint is 60 MB, and a fast run makes hundreds of
    steps a second. A SLURM requeue saves its own checkpoint at the step the signal arrives, so
    the interval only bounds the work a hard crash loses. The clock is read every `check_every`
    steps (under DDP rank 0's decision is broadcast, a sync, so not every step)."""

    def __init__(self, dirpath=None, every_n_train_steps: int | None = None,
                 every_minutes: float | None = 10.0, check_every: int = 50):
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError("last_checkpoint.every_n_train_steps must be >= 1 or null; "
                             f"got {every_n_train_steps}")
        if every_minutes is not None and every_minutes <= 0:
            raise ValueError(f"last_checkpoint.every_minutes must be > 0 or null; got {every_minutes}")
        # last.ckpt is always replaced: in a moved run directory the restored state does not know
        # the old last.ckpt, and Lightning's version counter would write last-v1.ckpt beside it,
        # which no resume picks (the next one would start again from the old last.ckpt)
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0,
                         every_n_train_steps=every_n_train_steps or 0,
                         enable_version_counter=False)
        self.every_minutes = None if every_n_train_steps else every_minutes
        self.check_every = max(1, check_every)
        self._clock = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._clock = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_skip_saving_checkpoint(trainer):
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        final = trainer.global_step == trainer.max_steps or (
            trainer.max_epochs not in (None, -1)
            and trainer.current_epoch == trainer.max_epochs - 1
            and epoch_loop.batch_progress.is_last_batch)
        due = final
        if self.every_minutes and not final and trainer.global_step % self.check_every == 0:
            due = time.monotonic() - self._clock >= 60 * self.every_minutes
            if trainer.world_size > 1:
                due = trainer.strategy.broadcast(due)
        if due and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._clock = time.monotonic()
