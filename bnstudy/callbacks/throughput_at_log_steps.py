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
    counting where it stopped (the original starts again from 0 at every fit).

    Validation's (validate/batches, validate/samples, validate/time) are logged once per
    validation, in the row of its val/ metrics. The original logs them at every validation batch
    with the count of validation batches in this process as the step: rows of training steps
    that have nothing to do with them, and other rows after a resume."""

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

    @rank_zero_only
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args, **kwargs) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, 0)  # counted here, logged at the end

    @rank_zero_only
    def on_validation_end(self, trainer, *args) -> None:
        if not trainer.sanity_checking and RunningStage.VALIDATING in self._throughputs:
            metrics = self._throughputs[RunningStage.VALIDATING].compute()
            # no step: Lightning's own for validation metrics, the row of val/loss
            trainer._logger_connector.log_metrics({f"validate/{k}": v for k, v in metrics.items()})
        super().on_validation_end(trainer, *args)
