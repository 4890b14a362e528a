"""A progress bar over the steps of a step-limited fit, redrawn at most twice a second."""
from __future__ import annotations

import math
import time

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Rich progress bar that counts steps out of max_steps in a step-limited fit (Lightning's
    shows `Epoch 1/-2` there, and restarts at every pass over the data), redrawn at most every
    `interval` seconds of training: drawing reads the logged metrics back from the device, which
    done every step stalls a GPU (and costs a tiny CPU model more than its step)."""

    def __init__(self, interval: float = 0.5, **kwargs):
        # Rich's refresh thread draws what is due as often as refresh_rate says (Lightning's
        # default: 100 wake-ups a second, each taking the GIL from the training step); draws
        # come at most every `interval` here, so it need not wake more often than that
        if interval > 0:  # 0: a draw every step, as often as Lightning's default thread wakes
            kwargs.setdefault("refresh_rate", max(1, math.ceil(1 / interval)))
        super().__init__(**kwargs)
        self.interval, self._drawn = interval, float("-inf")

    def _due(self, trainer) -> bool:
        now = time.monotonic()
        final = trainer.global_step >= (trainer.max_steps or 0) > 0 or trainer.should_stop
        if now - self._drawn < self.interval and not final:
            return False
        self._drawn = now
        return True

    def _by_steps(self) -> bool:
        trainer = self.trainer
        return (trainer.max_steps is not None and trainer.max_steps > 0
                and trainer.max_epochs in (None, -1))

    @property
    def total_train_batches(self):
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self._by_steps() or self.train_progress_bar_id is None:
            super().on_train_epoch_start(trainer, pl_module)
            if self._by_steps():  # a resumed fit starts where it left off
                self._update(self.train_progress_bar_id, trainer.global_step)
            return
        self.refresh()  # one bar for the whole fit: do not reset it at a new pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the clock first: the count of batches is a chain of properties, read on every step
        if not self._due(trainer) and not (isinstance(self.total_train_batches, int)
                                           and batch_idx + 1 >= self.total_train_batches):
            return
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
