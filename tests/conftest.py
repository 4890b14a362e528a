"""Shared fixtures. Tests never touch the network: W&B runs offline (real offline files)."""
from __future__ import annotations

import csv
import hashlib
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("BNSTUDY_RUN_DIR", None)
# Tiny models: one thread is faster than two threads fighting over two cores.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def write_cifar10(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """Tiny files in CIFAR-10's own python format (cifar-10-batches-py/*), so torchvision's real
    loading code runs on them. Returns root."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int, label: bytes) -> dict:
        return {"batch_label": label, "labels": rng.integers(0, 10, n).tolist(),
                "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "filenames": ["img%d.png" % i for i in range(n)]}

    per = max(1, n_train // 5)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per, "training batch %d of 5" % i), f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test, "testing batch 1 of 1"), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["c%d" % i for i in range(10)], "num_vis": 3072,
                     "num_cases_per_batch": per}, f, protocol=2)
    return Path(root)


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def tiny_cifar(tmp_path_factory, monkeypatch) -> Path:
    """A root with tiny CIFAR-10 files. torchvision checks each file's md5 against the official
    archive's even with download=False: point those checksums at our files (monkeypatch restores
    them) so torchvision's own integrity check and loader run unchanged."""
    from torchvision.datasets import CIFAR10

    root = write_cifar10(tmp_path_factory.mktemp("cifar"))
    folder = root / "cifar-10-batches-py"
    monkeypatch.setattr(CIFAR10, "train_list",
                        [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(folder / "batches.meta")})
    return root


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in a fresh directory (runs/ lands there) with no run directory inherited."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BNSTUDY_RUN_DIR", raising=False)
    return tmp_path


# metrics.csv columns that are wall-clock timings, different in every run however it is run: the
# instruments' own timers (time/*), and the throughput monitor's clock and rates in training and
# validation ({train,validate}/time, .../*_per_sec, .../device/*_per_sec)
TIMINGS = re.compile(r"time/.*|(train|validate)/(time|.*_per_sec)")


def metrics(run_dir: Path) -> tuple[list[str], list[dict]]:
    """metrics.csv's columns and rows, without the wall-clock timings."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if not TIMINGS.fullmatch(c)]
    return columns, [{c: r[c] for c in columns} for r in rows]


def assert_same_metrics(a: Path, b: Path) -> int:
    """Both metrics.csv hold the same columns, steps and values, timings aside (bit for bit:
    the CSV's text). Returns the number of values compared."""
    (cols_a, rows_a), (cols_b, rows_b) = metrics(a), metrics(b)
    assert cols_a == cols_b, (a, b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b], (a, b)
    for ra, rb in zip(rows_a, rows_b):
        differ = [c for c in cols_a if ra[c] != rb[c]]
        assert not differ, (a, b, ra["step"], {c: (ra[c], rb[c]) for c in differ[:5]})
    assert {"train/loss", "train/batches", "train/samples"} <= set(cols_a)
    return sum(v != "" for r in rows_a for v in r.values())
