"""Three lines at the end of every fit: the run directory, what is in it, and what to run next."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger


class FitSummary(L.Callback):
    """Once a fit has ended (not when it was interrupted: that message says how to resume), on
    rank 0: where the run directory is, that it holds metrics.csv, the checkpoints and the W&B run
    (and how to sync an offline one), and the plot and report commands for it. `python -m bnstudy
    fit` prints them to stderr last, after W&B's own closing lines (`print_lines`)."""

    def __init__(self):
        self.lines: list[str] = []

    def print_lines(self) -> None:
        for line in self.lines:
            print(line, file=sys.stderr)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        run_dir = Path(trainer.default_root_dir)
        checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
        held = ["metrics.csv", f"checkpoints/ ({', '.join(checkpoints) or 'none'})"]
        mode = os.environ.get("WANDB_MODE", "").lower()
        wandb = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb and mode == "offline":
            held.append(f"the W&B run, offline (sync it: wandb sync {run_dir}/wandb/offline-run-*)")
        elif wandb and mode not in ("disabled", "false", "dryrun"):
            url = getattr(wandb[0].experiment, "url", None)
            held.append(f"the W&B run{f' {url}' if url else ''}")
        self.lines = [f"bnstudy: run directory {run_dir}", f"bnstudy: in it: {', '.join(held)}",
                      f"bnstudy: next: python -m bnstudy plot {run_dir} --metrics train/loss "
                      f"val/acc --out {run_dir}/plot.png, or python -m bnstudy report {run_dir} "
                      f"--out {run_dir}/report"]
