"""Lightning's ThroughputMonitor, timed at the logging steps only."""
from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_only


class ThroughputAtLogSteps(ThroughputMonitor):
    """Lightning's ThroughputMonitor (train/samples_per_sec, ...), timed at the steps that log
    (`log_every_n_steps`) only: the original synchronizes the GPU every step to read the clock.
    The rate is over the last `window_size` - 1 logging intervals. The counts of batches and
    samples so far (train/batches, train/samples) are kept in checkpoints: a resumed run goes on
    counting where it stopped (the original starts again from 0 at every fit)."""

    def __init__(self, batch_size_fn, window_size: int = 5, **kwargs):
        super().__init__(batch_size_fn=batch_size_fn, window_size=window_size, **kwargs)
        self._resumed: dict | None = None

    def state_dict(self) -> dict:
        stage = RunningStage.TRAINING
        return {"batches": self._batches.get(stage, 0), "samples": self._samples.get(stage, 0)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resumed = dict(state_dict)  # applied when training starts (which resets them)

    @rank_zero_only
    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        if self._resumed:
            stage = RunningStage.TRAINING
            self._batches[stage] = self._resumed.get("batches", 0)
            self._samples[stage] = self._resumed.get("samples", 0)
            self._resumed = None

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        if trainer._logger_connector.should_update_logs:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)
        else:  # count the batch; the clock is read (and the GPU synchronized) at the next log
            stage = trainer.state.stage
            self._samples[stage] += self.batch_size_fn(batch)
            self._batches[stage] += 1
