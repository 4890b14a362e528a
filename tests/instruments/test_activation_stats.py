"""Activations (bnstudy/instruments/activation_stats.py): what the non-linearity receives, the
ActivationStats probe's moments and drift against the step's own forward, and its histograms in
W&B's offline files."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from bnstudy import probes
from bnstudy.instruments import ActivationStats, Instruments, Landscape
from bnstudy.norms import BatchNoise
from cases import CASES, LIGHTNING_NOISE, images, trainer, vgg_module

pytestmark = LIGHTNING_NOISE


def test_activations_are_what_the_nonlinearity_receives():
    model, _, x, _ = CASES["vgg_noisy_bn"]()
    where = probes.activation_modules(model, x)
    assert isinstance(where["features.0"], BatchNoise)  # conv -> BN -> noise -> ReLU
    assert isinstance(where["classifier"], nn.Linear)
    acts = probes.activations(model, x, layers=[1])
    relu_in = {}
    model.features[2].register_forward_hook(lambda m, a, out: relu_in.setdefault("x", a[0]))
    model.train()
    model(x)
    assert torch.equal(acts["features.0"], relu_in["x"])
    raw = probes.activations(model, x, layers=[1], after_norm=False)
    assert torch.equal(raw["features.0"], model.features[0](x))


def test_activation_stats_match_the_step_forward():
    """mean/var/dmean of the chosen units equal those of the activations of the step's forward
    (recomputed here at W^t with the step's batch: BN without noise, so the forward repeats)."""

    class Acts(Callback):
        def __init__(self):
            self.acts = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.acts[trainer.global_step] = probes.activations(pl_module.net, batch[0])

    act = ActivationStats(every=3, log_spaced=False, units=3, layers=[2, 14])
    inst, acts = Instruments([act]), Acts()
    module = vgg_module(norm="batch")
    trainer(4, [acts, inst]).fit(module, images())
    assert [s for s, _ in inst.history] == [0, 3]
    metrics = dict(inst.history)[3]
    for layer, key in (("features.3", "layer02"), ("classifier", "layer14")):
        units = act._units[layer]
        assert len(units) == 3

        def moments(t):
            a = acts.acts[t][layer].index_select(1, units).transpose(0, 1).reshape(3, -1)
            return a.mean(1), a.var(1, unbiased=False)

        (m3, v3), (m2, v2) = moments(3), moments(2)
        assert metrics[f"act/{key}/mean"] == pytest.approx(float(m3.mean()), rel=1e-5)
        assert metrics[f"act/{key}/var"] == pytest.approx(float(v3.mean()), rel=1e-5)
        assert metrics[f"act/{key}/dmean"] == pytest.approx(float((m3 - m2).abs().mean()),
                                                            rel=1e-4)
        assert metrics[f"act/{key}/dvar"] == pytest.approx(float((v3 - v2).abs().mean()),
                                                           rel=1e-4)
        assert metrics[f"act/{key}/q05"] < metrics[f"act/{key}/q50"] < metrics[
            f"act/{key}/q95"]
    assert "act/layer02/dmean" not in dict(inst.history)[0]  # no step -1


def test_histograms_go_to_wandb(tmp_path, monkeypatch):
    import wandb
    import wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # an earlier in-process run may have set wandb up disabled
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="bnstudy-test")
    inst = Instruments([ActivationStats(every=1, units=2, histogram_units=1, layers=[1]),
                        Landscape(every=1)])
    module = vgg_module(norm="batch")
    trainer(2, [inst], logger=[logger, CSVLogger(tmp_path)]).fit(module, images())
    logger.experiment.finish()
    unit = int(inst.probes[0]._units["features.0"][0])
    rows = [r for r in wandb_records.history(tmp_path) if f"act/layer01/u{unit}" in r]
    assert len(rows) == 2  # one histogram per measured step
    hist = rows[-1][f"act/layer01/u{unit}"]
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 8 * 8 * 8  # batch x H x W
    assert all(r["landscape/beta_eff"] > 0 for r in wandb_records.history(tmp_path)
               if "landscape/beta_eff" in r)
