"""Training callbacks that are not instruments: divergence guard, checkpoints, SLURM requeue, and
W&B/config bookkeeping."""
from __future__ import annotations

import contextlib
import math
import os
import signal
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import yaml
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
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
    resolved config with every logger (W&B run config, CSV hparams.yaml). validate and test
    write config_<stage>.yaml instead: config.yaml stays the record of the run's training."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            self.config_filename = f"config_{stage}.yaml"
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False, format="yaml"))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(resolved, allow_val_change=True)
            else:
                logger.log_hyperparams(resolved)


class Interrupted(Exception):
    """Training stopped at the end of a step on SIGTERM/SIGINT; a resumable checkpoint is saved.
    The CLI exits with 128 + signal number, as a process killed by the signal would."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"; resumable checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by {name} at the end of step {step}{where}")


class StepEndSignals(L.Callback):
    """Signals act at the end of a training step, the only point where a checkpoint is exact
    (inside a signal handler it could mix the weights of one step with the counters or loader
    position of another). All DDP ranks act at the same step.

    - SIGTERM / SIGINT: save last.ckpt, stop, and raise Interrupted (exit 128 + signal).
      A second SIGINT while the step finishes interrupts at once (KeyboardInterrupt).
    - Slurm's requeue signal (SIGUSR1, with Lightning's SLURM auto-requeue on): Lightning's own
      handler (hpc checkpoint + `scontrol requeue`), run here; the W&B run is marked preempting so
      a sweep hands it back under the same run id. Slurm then ends the job with SIGTERM: once the
      requeue took over, that SIGTERM only stops the process (the hpc checkpoint is the resume
      point) and the exit code does not matter, the job is requeued.
    Under DDP the ranks agree every DDP_CHECK_EVERY steps, so a signal acts within that many."""

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
    DDP_CHECK_EVERY = 10  # steps between the ranks' checks for a pending signal under DDP

    def __init__(self):
        self._lightning_handler, self._requeue_signum = None, None
        self._stop_signum: int | None = None
        self._requeued = False
        self._previous: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            handler = signal.getsignal(env.requeue_signal)  # Lightning's, registered just before
            if callable(handler):
                self._lightning_handler = handler
                signal.signal(env.requeue_signal, self._defer_requeue)
        for signum in self.STOP_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._defer_stop)

    def _defer_requeue(self, signum, frame) -> None:
        self._requeue_signum = signum

    def _defer_stop(self, signum, frame) -> None:
        if self._stop_signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: do not wait for the step
        self._stop_signum = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requeue = self._lightning_handler is not None and self._requeue_signum is not None
        stop = self._stop_signum is not None
        if trainer.world_size > 1:
            if trainer.global_step % self.DDP_CHECK_EVERY:
                return  # a collective (and a device sync) every step would slow DDP down
            # one collective for both: any rank's signal stops every rank at this step
            flags = trainer.strategy.reduce(
                torch.tensor([float(requeue), float(stop)], device=pl_module.device),
                reduce_op="sum")
            requeue, stop = bool(flags[0] > 0), bool(flags[1] > 0)
        if requeue:
            signum, self._requeue_signum = self._requeue_signum or signal.SIGUSR1, None
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                    logger.experiment.mark_preempting()
            self._lightning_handler(signum, None)
            self._requeued = True
        if stop:
            signum = self._stop_signum or signal.SIGTERM
            path = None
            if not self._requeued:
                last = next((c for c in trainer.checkpoint_callbacks
                             if isinstance(c, LastCheckpoint)), None)
                if last is not None:
                    if last._last_global_step_saved != trainer.global_step:
                        last._save_last_checkpoint(trainer, last._monitor_candidates(trainer))
                    path = last.last_model_path
            raise Interrupted(signum, trainer.global_step, path)


RequeueAtStepEnd = StepEndSignals  # the name of its first version (Slurm requeue only)


class StepProgressBar(RichProgressBar):
    """Rich progress bar that counts steps out of max_steps in a step-limited fit (Lightning's
    shows `Epoch 1/-2` there, and restarts at every pass over the data)."""

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
        if not self._by_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in its own directory, then renames it over the old
    one: a failed save (a full disk, a killed process) leaves the previous checkpoint intact.
    Lightning's own atomic save stages the file in the system temp dir and moves it, which is a
    copy (not atomic) when that is another file system."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose save_top_k holds across resumes. last.ckpt is written at the end of a
    step, before that step's validation, so the best checkpoint saved by that validation is not in
    the state a resume restores: it would stay forever beside the later best ones. On resume,
    checkpoints of this callback unknown to the restored state are adopted (their score is in
    their own state) when they are from before the resume point, and deleted when they are from
    the abandoned steps after it (the resumed run makes them again)."""

    @property
    def state_key(self) -> str:  # as ModelCheckpoint's, so checkpoints stay interchangeable
        return self._generate_state_key(
            monitor=self.monitor, mode=self.mode, every_n_train_steps=self._every_n_train_steps,
            every_n_epochs=self._every_n_epochs, train_time_interval=self._train_time_interval
        ).replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        prefix = (self.filename or "").split("{")[0]
        if trainer.ckpt_path is None or not self.dirpath or not prefix or self.save_top_k < 1:
            return
        known = {os.path.abspath(p) for p in self.best_k_models}
        for path in sorted(Path(self.dirpath).glob(f"{prefix}*.ckpt")):
            if os.path.abspath(path) in known:
                continue
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                step = ckpt["global_step"]
                score = ckpt["callbacks"][self.state_key]["current_score"]
            except Exception:  # not one of ours: leave it alone
                continue
            if step > trainer.global_step:
                trainer.strategy.remove_checkpoint(path)
            elif score is not None:
                self.best_k_models[str(path)] = torch.as_tensor(score)
        while len(self.best_k_models) > self.save_top_k:
            worst = (max if self.mode == "min" else min)(self.best_k_models,
                                                        key=self.best_k_models.get)
            del self.best_k_models[worst]
            trainer.strategy.remove_checkpoint(worst)
        if self.best_k_models:
            best = (min if self.mode == "min" else max)(self.best_k_models,
                                                       key=self.best_k_models.get)
            self.best_model_path, self.best_model_score = best, self.best_k_models[best]
            self.kth_best_model_path = (max if self.mode == "min" else min)(
                self.best_k_models, key=self.best_k_models.get)
            self.kth_value = self.best_k_models[self.kth_best_model_path]


class ResumeLogs(L.Callback):
    """On resume, metrics.csv forgets the rows of the steps the resumed run logs again, so a step
    never appears twice (also for Slurm's hpc checkpoints, which Lightning restores itself)."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        from bnstudy.loggers import StudyCSVLogger

        step = checkpoint.get("global_step", 0)  # the first step the resumed run logs
        for logger in trainer.loggers:
            if isinstance(logger, StudyCSVLogger) and trainer.is_global_zero:
                logger.drop_from(step)


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
