"""Training callbacks that are not instruments: divergence guard, checkpoints, SLURM requeue, and
W&B/config bookkeeping."""
from __future__ import annotations

import math
import signal
from typing import Literal

import lightning as L
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn


class DivergedError(RuntimeError):
    pass


class DivergenceGuard(L.Callback):
    """End a run whose training loss is not finite (VGG without BN at lr 0.5 does this).

    on_divergence="stop" (default) stops training cleanly, logs `diverged=1` (and the W&B summary
    field `diverged`), and the process exits 0 so a sweep goes on; "fail" raises instead.
    """

    def __init__(self, on_divergence: Literal["stop", "fail"] = "stop"):
        self.on_divergence = on_divergence
        self.diverged_at: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or math.isfinite(float(loss)):
            return
        step = trainer.global_step
        self.diverged_at = step
        msg = f"bnstudy: training loss is {float(loss)} at step {step}: run diverged"
        if self.on_divergence == "fail":
            raise DivergedError(msg)
        rank_zero_warn(msg + "; stopping (on_divergence=stop)")
        for logger in trainer.loggers:
            logger.log_metrics({"diverged": 1.0, "diverged_step": float(step)}, step=step)
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.summary["diverged"] = True
        trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.diverged_at is None:
            for logger in trainer.loggers:
                logger.log_metrics({"diverged": 0.0}, step=trainer.global_step)

    def state_dict(self) -> dict:
        return {"diverged_at": self.diverged_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.diverged_at = state_dict.get("diverged_at")


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Writes config.yaml into the run directory (LightningCLI default) and stores the full
    resolved config with every logger (W&B run config, CSV hparams.yaml)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False, format="yaml"))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(resolved, allow_val_change=True)
            else:
                logger.log_hyperparams(resolved)


class RequeueAtStepEnd(L.Callback):
    """Lightning's SLURM auto-requeue (hpc checkpoint + `scontrol requeue`), run at the end of a
    training step instead of inside the signal handler, where a checkpoint could mix the weights
    of one step with the counters or loader position of another. All DDP ranks act at the same
    step; the W&B run is marked preempting so a sweep hands it back under the same run id."""

    def __init__(self):
        self._lightning_handler, self._signum = None, None

    def on_train_start(self, trainer, pl_module) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue):
            return
        handler = signal.getsignal(env.requeue_signal)  # Lightning's, registered just before
        if callable(handler):
            self._lightning_handler = handler
            signal.signal(env.requeue_signal, self._defer)

    def _defer(self, signum, frame) -> None:
        self._signum = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._lightning_handler is None:
            return
        pending = self._signum is not None
        if trainer.world_size > 1:
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if not pending:
            return
        signum, self._signum = self._signum or signal.SIGUSR1, None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.mark_preempting()
        self._lightning_handler(signum, None)


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt every `every_n_train_steps` steps and after the final step, whatever the monitored
    metric does (ModelCheckpoint's save_last only follows its own save triggers). Saved at the end
    of a training step, the only point where a resumed run continues exactly."""

    def __init__(self, dirpath=None, every_n_train_steps: int = 100):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0,
                         every_n_train_steps=every_n_train_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        epoch_loop = trainer.fit_loop.epoch_loop
        final = trainer.global_step == trainer.max_steps or (
            trainer.max_epochs not in (None, -1)
            and trainer.current_epoch == trainer.max_epochs - 1
            and epoch_loop.batch_progress.is_last_batch)
        if final and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
