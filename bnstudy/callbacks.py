"""Training callbacks that are not instruments: divergence guard, checkpoints, SLURM requeue, and
W&B/config bookkeeping."""
from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import yaml
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, ThroughputMonitor
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import RunningStage
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

    - SIGTERM / SIGINT: save last.ckpt, then stop before the next step by raising Interrupted
      (exit 128 + signal). A signal that comes in the fit's last step lets it finish (exit 0).
      A SIGTERM that came before training began stops it before its first step.
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
        self._stopping: tuple | None = None  # (signal, step, checkpoint) once the stop is decided
        self._requeued = False
        self._previous: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python takes signal handlers only in the main thread (Lightning does so too)
        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            handler = signal.getsignal(env.requeue_signal)  # Lightning's, registered just before
            if callable(handler):
                self._lightning_handler = handler
                signal.signal(env.requeue_signal, self._defer_requeue)
        for signum in self.STOP_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._defer_stop)
        # a SIGTERM while the fit started went to Lightning's handler, which would stop the fit
        # after its first step with a SystemExit of code 0 and no checkpoint: stop before it
        early = trainer.received_sigterm
        if trainer.world_size > 1:  # any rank's: all stop
            early = bool(trainer.strategy.reduce(
                torch.tensor(float(early), device=pl_module.device), reduce_op="sum") > 0)
        if early:
            raise Interrupted(signal.SIGTERM, trainer.global_step, trainer.ckpt_path)

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
        if stop and self._stopping is None:
            signum = self._stop_signum or signal.SIGTERM
            path = None
            if not self._requeued:
                last = next((c for c in trainer.checkpoint_callbacks
                             if isinstance(c, LastCheckpoint)), None)
                if last is not None:
                    if last._last_global_step_saved != trainer.global_step:
                        last._save_last_checkpoint(trainer, last._monitor_candidates(trainer))
                    path = last.last_model_path
            # raised when the next step starts: this step's metrics are logged after this hook,
            # and its scheduled validation runs (a resume does not repeat either)
            self._stopping = (signum, trainer.global_step, path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._stopping is not None:
            raise Interrupted(*self._stopping)


RequeueAtStepEnd = StepEndSignals  # the name of its first version (Slurm requeue only)


class StepProgressBar(RichProgressBar):
    """Rich progress bar that counts steps out of max_steps in a step-limited fit (Lightning's
    shows `Epoch 1/-2` there, and restarts at every pass over the data), redrawn at most every
    `interval` seconds of training: drawing reads the logged metrics back from the device, which
    done every step stalls a GPU (and costs a tiny CPU model more than its step)."""

    def __init__(self, interval: float = 0.5, **kwargs):
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
        last_batch = isinstance(self.total_train_batches, int) and \
            batch_idx + 1 >= self.total_train_batches
        if not self._due(trainer) and not last_batch:
            return
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
        buffer = io.BytesIO()  # serialized first: torch.save would hide a write's OSError
        torch.save(checkpoint, buffer)
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            # torch's zip writer, closing after a failed write, raises a RuntimeError of its own
            # ("unexpected pos"): report the write's OSError (a full disk), naming the file
            cause = err.__context__ if isinstance(err, RuntimeError) else err
            if isinstance(cause, OSError) and (cause is not err or cause.filename is None):
                raise OSError(cause.errno, cause.strerror, cause.filename or path) from None
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
