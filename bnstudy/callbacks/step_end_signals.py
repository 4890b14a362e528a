"""SIGTERM, SIGINT and Slurm's requeue signal, acted on at the end of a training step."""
from __future__ import annotations

import signal
import threading

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import WandbLogger

from bnstudy.callbacks.last_checkpoint import LastCheckpoint


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
