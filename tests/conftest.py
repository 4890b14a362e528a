"""Shared fixtures. Tests never touch the network: W&B runs offline (real offline files)."""
from __future__ import annotations

import hashlib
import os
import pickle
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


@pytest.fixture
def quiet(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return in_tmp
