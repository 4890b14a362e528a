"""Training callbacks that are not instruments: divergence guard and W&B/config bookkeeping."""
from __future__ import annotations

import math
from typing import Literal

import lightning as L
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
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        import yaml

        resolved = yaml.safe_load(config)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(resolved, allow_val_change=True)
            else:
                logger.log_hyperparams(resolved)
