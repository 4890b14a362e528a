"""End a run whose training loss is not finite, cleanly (exit 0) or with an error."""
from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn


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
