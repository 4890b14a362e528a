"""Lightning's ThroughputMonitor, timed at the logging steps only."""
from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only


class ThroughputAtLogSteps(ThroughputMonitor):
    """Lightning's ThroughputMonitor (train/samples_per_sec, ...), timed at the steps that log
    (`log_every_n_steps`) only: the original synchronizes the GPU every step to read the clock.
    The rate is over the last `window_size` - 1 logging intervals."""

    def __init__(self, batch_size_fn, window_size: int = 5, **kwargs):
        super().__init__(batch_size_fn=batch_size_fn, window_size=window_size, **kwargs)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        if trainer._logger_connector.should_update_logs:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)
        else:  # count the batch; the clock is read (and the GPU synchronized) at the next log
            stage = trainer.state.stage
            self._samples[stage] += self.batch_size_fn(batch)
            self._batches[stage] += 1
