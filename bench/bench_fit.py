"""Samples/s of the Lightning fit loop vs a plain PyTorch loop, same model, data and optimizer.

    .venv/bin/python bench/bench_fit.py [--steps 30] [--warmup 5] [--repeats 3] [--width 0.25]

VGG-16 (width 0.25) + BN, batch 128, CIFAR-shaped data held in memory, plain SGD, CPU. The Lightning
side runs as `python -m bnstudy fit` does (VGGModule, TensorLoader, CSV logger, divergence guard,
LR and throughput monitors, checkpoint at the end); no validation and no progress bar on either
side. The two loops alternate, `repeats` times each, and the medians are compared. Target:
Lightning / plain >= 0.95.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor

from bnstudy.callbacks import DivergenceGuard
from bnstudy.data import TensorLoader
from bnstudy.loggers import StudyCSVLogger
from bnstudy.modules import VGGModule


class StepClock(L.Callback):
    """Wall time from the start of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def make(width: float, seed: int = 0):
    torch.manual_seed(seed)
    model = VGGModule(depth=16, width=width, norm="batch", lr=0.1)
    data = (torch.randn(128 * 8, 3, 32, 32), torch.randint(0, 10, (128 * 8,)))
    return model, data


def lightning_fit(width: float, steps: int, warmup: int) -> float:
    model, data = make(width)
    clock = StepClock(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", devices=1, default_root_dir=tmp,
            logger=StudyCSVLogger(tmp, name="", version=""), enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, log_every_n_steps=10,
            callbacks=[clock, DivergenceGuard(), LearningRateMonitor("step"),
                       ThroughputMonitor(batch_size_fn=lambda b: b[0].shape[0]),
                       ModelCheckpoint(dirpath=tmp, save_last=True)])
        trainer.fit(model, train_dataloaders=TensorLoader(data, 128, shuffle=True))
    return 128 * (steps - warmup) / (clock.end - clock.start)


def plain_fit(width: float, steps: int, warmup: int) -> float:
    model, data = make(width)
    net, opt = model.net, torch.optim.SGD(model.net.parameters(), lr=0.1)
    net.train()
    step, start = 0, None
    while step < steps:
        for x, y in TensorLoader(data, 128, shuffle=True):
            if step == warmup:
                start = time.perf_counter()
            loss = model.loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            float(loss)  # Lightning reads the loss every step (progress/logging): same here
            step += 1
            if step == steps:
                break
    return 128 * (steps - warmup) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=float, default=0.25)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    results = {"lightning": [], "plain": []}
    for _ in range(args.repeats):  # alternate so both see the same machine load
        results["lightning"].append(lightning_fit(args.width, args.steps, args.warmup))
        results["plain"].append(plain_fit(args.width, args.steps, args.warmup))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"VGG-16 width {args.width} + BN, batch 128, CPU ({torch.get_num_threads()} threads), "
          f"{args.steps - args.warmup} timed steps x {args.repeats} repeats")
    print(f"{'loop':<12}{'samples/s (median)':>20}   all runs")
    for k in ("plain", "lightning"):
        print(f"{k:<12}{med[k]:>20.1f}   {'  '.join(f'{v:.1f}' for v in results[k])}")
    ratio = med["lightning"] / med["plain"]
    # each pair ran back to back: the median of the pairwise ratios is robust to load that
    # changes slowly over the benchmark
    paired = statistics.median(a / b for a, b in zip(results["lightning"], results["plain"]))
    print(f"ratio of medians lightning/plain = {ratio:.3f}; median pairwise ratio = {paired:.3f}"
          f"  (target >= 0.95: {'OK' if paired >= 0.95 else 'MISS'})")


if __name__ == "__main__":
    main()
