"""Training callbacks that are not instruments: divergence guard, checkpoints, SLURM requeue, and
W&B/config bookkeeping."""
from __future__ import annotations

import math
import signal
import time
from typing import Literal

import lightning as L
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, ThroughputMonitor
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn


class DivergedError(RuntimeError):
    pass


class DivergenceGuard(L.Callback):
    """End a run whose training loss is not finite (VGG without BN at lr 0.5 does this).

    on_divergence="stop" (default) stops training cleanly, logs `diverged=1` and `diverged_step`
    (and the W&B summary field `diverged`), and the process exits 0 so a sweep goes on; "fail"
    raises instead.

    check="sync" reads the loss every step and stops at once. On a GPU that read waits for the
    step to finish, every step, and leaves the GPU idle while Python queues the next one; so
    check="auto" (default) is "lazy" there: each step only updates, on the device, the step of the
    first non-finite loss (the minimum over DDP ranks) and starts copying it to the host without
    waiting; the copy started `lag` steps earlier is read then, long arrived. The run stops `lag`
    steps after the divergence (its weights are not finite by then anyway), at the same step on
    every rank and in every rerun, and `diverged_step` is still the exact step.
    """

    NONE = 2**62  # "no divergence yet" in the device tensor (the minimum over ranks is taken)

    def __init__(self, on_divergence: Literal["stop", "fail"] = "stop",
                 check: Literal["auto", "sync", "lazy"] = "auto", lag: int = 3):
        if lag < 1:
            raise ValueError(f"divergence.lag must be >= 1; got {lag}")
        self.on_divergence, self.check, self.lag = on_divergence, check, lag
        self.diverged_at: int | None = None
        self._first: torch.Tensor | None = None  # on the device: step of the first bad loss
        self._copies: list = []                  # [host tensor, CUDA event or None] per slot
        self._seen = 0                           # lazy checks made in this fit

    def _lazy(self, loss: torch.Tensor) -> bool:
        return self.check == "lazy" or (self.check == "auto" and loss.device.type == "cuda")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or self.diverged_at is not None:
            return
        if not self._lazy(loss):
            if not math.isfinite(float(loss)):
                self._diverged(trainer, trainer.global_step, float(loss))
            return
        cuda = loss.device.type == "cuda"
        if self._first is None or self._first.device != loss.device:
            self._first = torch.full((), self.NONE, dtype=torch.long, device=loss.device)
            self._copies = [[torch.empty((), dtype=torch.long, pin_memory=cuda), None]
                            for _ in range(self.lag)]
            self._seen = 0
        bad = ~torch.isfinite(loss.detach())
        first = torch.where(bad, trainer.global_step, self.NONE)
        if trainer.world_size > 1:  # every rank stops at the same step
            import torch.distributed as dist

            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        self._first = torch.minimum(self._first, first)
        slot = self._copies[self._seen % self.lag]
        if self._seen >= self.lag:  # the copy started `lag` steps ago
            if slot[1] is not None:
                slot[1].synchronize()
            self._check_step(trainer, int(slot[0]))
        self._seen += 1
        if self.diverged_at is None:
            slot[0].copy_(self._first, non_blocking=cuda)
            if cuda:
                slot[1] = torch.cuda.Event()
                slot[1].record()

    def _check_step(self, trainer, step: int) -> None:
        if step != self.NONE:
            self._diverged(trainer, step, float("nan"))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.diverged_at is None and self._first is not None:
            self._check_step(trainer, int(self._first))  # a divergence in the last steps

    def _diverged(self, trainer, step: int, loss: float) -> None:
        self.diverged_at = step
        what = "not finite" if self._first is not None else f"{loss}"  # lazy: value not kept
        msg = f"bnstudy: training loss is {what} at step {step}: run diverged"
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
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0,
                         every_n_train_steps=every_n_train_steps or 0)
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


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, redrawn at most every `interval` seconds of training.
    Drawing reads the logged metrics back from the device: done every step, that stalls a GPU
    (and costs a tiny CPU model more than its step)."""

    def __init__(self, interval: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.interval, self._drawn = interval, float("-inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        total = self.total_train_batches
        last = isinstance(total, int) and batch_idx + 1 >= total
        if now - self._drawn >= self.interval or last or trainer.should_stop:
            self._drawn = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


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
