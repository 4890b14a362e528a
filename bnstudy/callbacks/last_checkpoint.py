"""last.ckpt every few minutes (or steps) of training and after the final step."""
from __future__ import annotations

import time

from bnstudy.callbacks.quiet_checkpoint import QuietCheckpoint


class LastCheckpoint(QuietCheckpoint):
    """last.ckpt every `every_minutes` of training (default 10), or every `every_n_train_steps`
    steps when that is given, and after the final step, whatever the monitored metric does
    (ModelCheckpoint's save_last only follows its own save triggers). Saved at the end of a
    training step, or of its validation when one follows it (both are points where a resumed
    run continues exactly; Lightning resumes after a validation without repeating it), and only
    once the step's row of metrics.csv is complete: a run killed right after the save resumes
    to the rows of one never stopped.

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
        # ModelCheckpoint's own step trigger is off (0, not None: None would turn on its
        # every-epoch one); the steps are counted here, where a save can wait for a validation
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=0,
                         enable_version_counter=False)
        self.every_n_steps = every_n_train_steps or 0
        self.every_minutes = None if every_n_train_steps else every_minutes
        self.check_every = max(1, check_every)
        self._clock = time.monotonic()
        self._pending: int | None = None  # the step whose save waits for its validation's end

    KEY_SETTINGS = (*QuietCheckpoint.KEY_SETTINGS, "every_n_steps")

    def _make_state_key(self) -> str:
        # the key its state had in checkpoints while ModelCheckpoint counted the steps
        return self._generate_state_key(monitor=self.monitor, mode=self.mode,
                                        every_n_train_steps=self.every_n_steps,
                                        every_n_epochs=self._every_n_epochs,
                                        train_time_interval=self._train_time_interval)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._clock = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._pending is not None:  # due at a validation that did not run: save now
            self._pending = None
            self._save_last(trainer)
        epoch_loop = trainer.fit_loop.epoch_loop
        final = trainer.global_step == trainer.max_steps or (
            trainer.max_epochs not in (None, -1)
            and trainer.current_epoch == trainer.max_epochs - 1
            and epoch_loop.batch_progress.is_last_batch)
        due = final or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0)
        if self.every_minutes and not final and trainer.global_step % self.check_every == 0:
            due = time.monotonic() - self._clock >= 60 * self.every_minutes
            if trainer.world_size > 1:
                due = trainer.strategy.broadcast(due)
        # (the trainer's state last: reading it costs more than the rest, on every step)
        if not due or self._last_global_step_saved == trainer.global_step \
                or self._should_skip_saving_checkpoint(trainer):
            return
        # A validation after this step: save at its end. Saved now, a run killed during that
        # validation (or before its row reached metrics.csv) would resume past it, and its
        # values would be lost; Lightning resumes from the end of a validation without
        # repeating it. (Not for a time-based val_check_interval, which is read off the clock.)
        if trainer._val_check_time_interval is None \
                and epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._pending = trainer.global_step
            return
        self._save_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._pending == trainer.global_step and not trainer.sanity_checking:
            self._pending = None
            self._save_last(trainer)

    def _save_last(self, trainer) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._clock = time.monotonic()
