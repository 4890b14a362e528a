"""On resume, metrics.csv drops the rows of the steps the resumed run logs again."""
from __future__ import annotations

import lightning as L


class ResumeLogs(L.Callback):
    """On resume, metrics.csv forgets the rows of the steps the resumed run logs again, so a step
    never appears twice (also for Slurm's hpc checkpoints, which Lightning restores itself)."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        from bnstudy.loggers import StudyCSVLogger

        step = checkpoint.get("global_step", 0)  # the first step the resumed run logs
        for logger in trainer.loggers:
            if isinstance(logger, StudyCSVLogger) and trainer.is_global_zero:
                logger.drop_from(step)
