"""Tiny CLI fits the end-to-end tests share (not a test file): the arguments that shrink every
config, metrics.csv rows, and bit-for-bit comparison of checkpoints."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from bnstudy.cli import cli_main
from conftest import REPO

PRESETS = {"fast.yaml"}  # composed after a run config (tests/test_speed.py), not runs of their own


CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name not in PRESETS)


# VGG-16 and the 25-layer DLN keep their depth: the configs' instruments name their layers
TINY_VGG = ["--model.width=0.0625", "--data.batch_size=8"]


TINY_DLN = ["--data.num_samples=64", "--data.steps_per_epoch=2"]


def tiny_args(config: str, cifar_root: Path | None = None) -> list[str]:
    args = ["--config", str(REPO / "configs" / config), "--trainer.max_steps=3",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.log_every_n_steps=1"]
    if config.startswith("dln"):
        return args + TINY_DLN + ["--trainer.check_val_every_n_epoch=1"]
    args += TINY_VGG + ["--trainer.val_check_interval=3", "--trainer.limit_val_batches=2"]
    if cifar_root is not None and config.startswith("vgg"):
        args += [f"--data.root={cifar_root}", "--data.download=false",
                 "--data.eval_batch_size=10"]
    return args


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last(rows: list[dict], key: str) -> float:
    return [float(r[key]) for r in rows if r.get(key)][-1]


def assert_identical(a, b, where: str) -> None:
    """Bit-for-bit equality of tensors, also nested in dicts (noisy BN's extra state)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):  # Curvature's warm start: a list of {name: tensor}
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


# VGG-11 at 1/8 width on digits: a few hundred ms to build, ~10-20 ms a step
TINY = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--model.width=0.125",
        "--data.batch_size=16", "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=10",
        "--trainer.limit_val_batches=2", "--last_checkpoint.every_n_train_steps=10"]


ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def bnstudy(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnstudy", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env or ENV, **kw)


def one_error_line(stderr: str, prefix: str = "bnstudy: error: ") -> str:
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(prefix), stderr[-3000:]
    assert "Traceback" not in stderr and "weights_only=False" not in stderr
    return errors[0]


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def fit(run_dir: Path, *extra: str, steps: int = 20):
    return cli_main(["fit", *TINY, "--trainer.enable_progress_bar=false",
                     f"--trainer.max_steps={steps}", f"--run_dir={run_dir}", *extra])
