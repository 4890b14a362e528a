"""The model cases the instrument tests share (not a test file): small VGGs and DLNs at a trained
step, the tiny models whose dense Hessian is cheap, the Lightning fits of the callback tests, and
the snapshot that checks a measurement left everything as it found it."""
from __future__ import annotations

import copy
import csv
import random

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnstudy import probes
from bnstudy.instruments import (ICS, ActivationStats, BNGradientBound, Curvature, Instruments,
                                 Landscape, Probe, RandomLandscape)
from bnstudy.models import VGG, DeepLinear, init_weights
from bnstudy.modules import DLNModule, VGGModule
from bnstudy.norms import BatchNoise, resample_noise

# Lightning's warnings about tiny fits without workers or validation: every fit test's pytestmark
LIGHTNING_NOISE = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
                   pytest.mark.filterwarnings("ignore:You defined a `validation_step`"),
                   pytest.mark.filterwarnings("ignore:.*LeafSpec"),
                   pytest.mark.filterwarnings("ignore:.*srun")]


# ---- plain models at a trained step (the paper's two networks, tiny) -------------------------
def vgg(norm: str) -> tuple:
    torch.manual_seed(0)
    model = VGG(16, 0.0625, norm, image_size=8)
    init_weights(model)
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 10, (12,))
    return model, F.cross_entropy, x, y


def dln(norm: str) -> tuple:
    torch.manual_seed(0)
    model = DeepLinear(25, 10, norm)
    init_weights(model)
    x = torch.randn(200, 10)
    y = x @ torch.randn(10, 10)
    return model, lambda out, t: F.mse_loss(out, t, reduction="sum"), x, y


CASES = {
    "vgg": lambda: vgg("none"),
    "vgg_bn": lambda: vgg("batch"),
    "vgg_noisy_bn": lambda: vgg("noisy_batch"),
    "dln": lambda: dln("none"),
    "dln_bn": lambda: dln("batch"),
}


LR = {"vgg": 0.1, "dln": 1e-4}


def trained_step(case: str):
    """A model at W^t (the second step of SGD with momentum and weight decay, its noise held),
    the W^{t+1} that step produced, the batch and the lr."""
    model, loss_fn, x, y = CASES[case]()
    lr = LR[case.split("_")[0]]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    for _ in range(2):  # the second step has momentum in it
        resample_noise(model)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        w_t = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(w_t[n])
    return model, loss_fn, x, y, after, lr


def assert_ics_close(fast: dict, twin: dict, rel: float = 1e-5) -> None:
    assert fast.keys() == twin.keys()
    for layer in fast:
        f, t = fast[layer], twin[layer]
        assert f["l2"] == pytest.approx(t["l2"], rel=rel, abs=1e-12), layer
        assert f["cos"] == pytest.approx(t["cos"], rel=rel, abs=rel), layer


# ---- models whose dense Hessian is cheap ------------------------------------------------------
def mlp_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    return model, F.cross_entropy, torch.randn(32, 5), torch.randint(0, 3, (32,))


def conv_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 3))
    return model, F.cross_entropy, torch.randn(16, 2, 4, 4), torch.randint(0, 3, (16,))


def small_dln(norm: str):
    def make():
        torch.manual_seed(0)
        model = DeepLinear(4, 3, norm)
        init_weights(model)
        x = torch.randn(64, 3)
        return model, lambda o, t: F.mse_loss(o, t, reduction="sum"), x, x @ torch.randn(3, 3)
    return make


TWINS = {"mlp_bn": mlp_bn, "conv_bn": conv_bn, "dln": small_dln("none"),
         "dln_bn": small_dln("batch")}


# ---- a measurement leaves everything as it found it -------------------------------------------
def snapshot(model: nn.Module) -> dict:
    noise = [m for m in model.modules() if isinstance(m, BatchNoise)]
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "noise": [(m.scale, m.shift, m.stale,
                   None if m.generator is None else m.generator.get_state()) for m in noise],
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def assert_same(a: dict, b: dict) -> None:
    for kind in ("params", "grads", "buffers"):
        assert a[kind].keys() == b[kind].keys()
        for n in a[kind]:
            x, y = a[kind][n], b[kind][n]
            assert (x is None and y is None) or (torch.equal(x, y) and x.dtype == y.dtype), (kind,
                                                                                             n)
    assert a["modes"] == b["modes"]
    for (s1, h1, st1, g1), (s2, h2, st2, g2) in zip(a["noise"], b["noise"]):
        assert s1 is s2 and h1 is h2 and st1 == st2  # the very same held noise tensors
        assert (g1 is None and g2 is None) or torch.equal(g1, g2)
    assert torch.equal(a["rng"][0], b["rng"][0])
    assert a["rng"][1] == b["rng"][1]
    assert np.array_equal(a["rng"][2], b["rng"][2])


def run_every_probe(model, loss_fn, x, y, after):
    probes.ics(model, loss_fn, x, y, after)
    probes.ics(model, loss_fn, x, y, after, layers=[2])
    probes.landscape(model, loss_fn, x, y, [0.05, 0.1])
    probes.random_landscape(model, loss_fn, x, y, [0.05], seed=1)
    probes.activations(model, x)
    probes.layer_names(model, x)


# ---- Lightning fits with the Instruments callback ---------------------------------------------
def images(n: int = 32, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def vgg_module(norm: str = "noisy_batch", **kw) -> VGGModule:
    L.seed_everything(0, verbose=False)
    return VGGModule(width=0.0625, norm=norm, image_size=8, **kw)


def trainer(steps: int, callbacks=(), logger=False, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=list(callbacks),
                     logger=logger, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, **kw)


def same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def every_step_probes(**kw) -> list[Probe]:
    return [ICS(every=1, **kw), Landscape(every=1), RandomLandscape(every=2),
            ActivationStats(every=2, units=4),
            Curvature(every=2, k=2, max_iter=4, trace_samples=2), BNGradientBound(every=3)]


class Recorder(Callback):
    """Keeps, per step, the model at W^t (a deep copy, held noise included), the batch, the lr and
    the W^{t+1} the optimizer produced, to replay the definitions naively after the fit."""

    def __init__(self):
        self.steps: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps[trainer.global_step] = {"batch": batch}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        rec = self.steps[trainer.global_step]
        rec["net"] = copy.deepcopy(pl_module.net)
        rec["lr"] = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec = self.steps[trainer.global_step - 1]
        rec["after"] = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}


def read_csv(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def fit_keys(module, data: DataLoader) -> tuple[set[str], dict[str, float]]:
    """The ICS and activation keys a 2-step fit logs (all layers), and step 1's metrics."""
    inst = Instruments([ICS(every=1), ActivationStats(every=1, units=2)])
    trainer(2, [inst]).fit(module, data)
    assert [s for s, _ in inst.history] == [0, 1]
    keys = {k for _, m in inst.history for k in m if k.startswith(("ics/", "act/"))}
    return keys, inst.history[1][1]


def dln_module(norm: str) -> DLNModule:
    L.seed_everything(0, verbose=False)
    return DLNModule(depth=6, norm=norm, lr=1e-3)


def dln_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 10, generator=g)
    return DataLoader(TensorDataset(x, x @ torch.randn(10, 10, generator=g)), batch_size=16)


def example_input(net: torch.nn.Module) -> torch.Tensor:
    """A small input of the right shape for `net` (CIFAR-sized images, or feature vectors)."""
    first = next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    if isinstance(first, torch.nn.Conv2d):
        return torch.randn(2, first.in_channels, 32, 32)
    return torch.randn(4, first.in_features)
