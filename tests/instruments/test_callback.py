"""The Instruments callback in real Lightning fits: same numbers as the brute-force twins on the
step's own batch, W^t and W^{t+1}; training unchanged; logs; bf16; YAML configs."""
from __future__ import annotations

import copy
import csv
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from bnstudy import probes
from bnstudy.instruments import (ICS, ActivationStats, BNGradientBound, Curvature, Instruments,
                                 Landscape, Probe, RandomLandscape)
from bnstudy.models import DeepLinear
from bnstudy.modules import DLNModule, VGGModule

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:You defined a `validation_step`"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec"),
              pytest.mark.filterwarnings("ignore:.*srun")]


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


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_is_unchanged_by_the_instruments(precision):
    """Noisy BN, momentum: with every probe at every step the run is bit for bit the same."""
    inst = Instruments(every_step_probes())
    runs = []
    for callbacks in ([inst], []):
        module = vgg_module(momentum=0.9)
        tr = trainer(4, callbacks, precision=precision)
        tr.fit(module, images())
        runs.append((module.state_dict(), tr.optimizers[0].state_dict()))
    assert same_state(runs[0][0], runs[1][0])  # parameters, BN buffers, noise state
    assert same_state(runs[0][1], runs[1][1])  # momentum buffers
    # and the instruments did measure, at every step, finite values
    assert [s for s, _ in inst.history] == [0, 1, 2, 3]
    assert all(math.isfinite(v) for _, m in inst.history for v in m.values())
    assert {"ics/cos/layer02", "landscape/beta_eff", "landscape_random/beta_eff",
            "act/layer02/dmean", "curv/lambda_max", "curv/lambda_2", "curv/trace"} <= set(
                inst.history[2][1])
    assert {"thm41/ratio_rederived/layer02", "thm41/holds_printed/layer13"} <= set(
        inst.history[3][1])


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


@pytest.mark.parametrize("optimizer", [dict(optimizer="sgd", momentum=0.9, weight_decay=5e-3),
                                       dict(optimizer="adamw", lr=0.01, weight_decay=0.1)])
def test_callback_equals_twins_on_the_step_batch_and_the_optimizers_update(optimizer):
    inst = Instruments([ICS(every=1), Landscape(every=1, lr_multiples=[0.5, 2])])
    rec = Recorder()
    module = vgg_module(**optimizer)
    trainer(3, [rec, inst]).fit(module, images())
    assert [s for s, _ in inst.history] == [0, 1, 2]
    for step, metrics in inst.history:
        r = rec.steps[step]
        x, y = r["batch"]
        ics = probes.ics_bruteforce(r["net"], module.loss_fn, x, y, r["after"])
        assert len(ics) == 14
        names = probes.layer_names(r["net"], x)  # layer i (logged as layer0i) is names[i - 1]
        assert names[4] == "features.14"  # layer 5 of VGG-16
        for layer, v in ics.items():
            key = f"layer{names.index(layer) + 1:02d}"
            assert metrics[f"ics/l2/{key}"] == pytest.approx(v["l2"], rel=1e-5, abs=1e-12)
            assert metrics[f"ics/cos/{key}"] == pytest.approx(v["cos"], rel=1e-5, abs=1e-5)
        assert sum(k.startswith("ics/l2/") for k in metrics) == 14
        land = probes.landscape_bruteforce(r["net"], module.loss_fn, x, y,
                                           [0.5 * r["lr"], 2 * r["lr"]])
        for key in ("loss_min", "loss_max", "grad_diff_min", "grad_diff_max", "beta_eff"):
            assert metrics[f"landscape/{key}"] == pytest.approx(land[key], rel=1e-5)
        assert metrics["landscape/loss/x2"] == pytest.approx(land["loss"][1], rel=1e-5)
        assert metrics["time/ics"] > 0 and metrics["time/landscape"] > 0


def read_csv(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_values_reach_the_csv_at_the_probe_steps_whatever_the_log_cadence(tmp_path):
    inst = Instruments([ICS(every=0, log_spaced=True, layers=[2, "classifier"]),
                        Landscape(every=3, log_spaced=False, lr_multiples=[1, 4])])
    logger = CSVLogger(tmp_path, name="run")
    module = vgg_module(norm="batch")
    trainer(9, [inst], logger=logger, log_every_n_steps=50).fit(module, images(72))
    rows = read_csv(os.path.join(logger.log_dir, "metrics.csv"))
    ics_steps = [int(r["step"]) for r in rows if r.get("ics/l2/layer02")]
    land_steps = [int(r["step"]) for r in rows if r.get("landscape/beta_eff")]
    assert ics_steps == [0, 1, 2, 4, 8]  # log-spaced
    assert land_steps == [0, 3, 6]
    row = next(r for r in rows if r.get("ics/l2/layer02") and int(r["step"]) == 4)
    assert float(row["ics/cos/layer14"]) <= 1 and float(row["time/ics"]) > 0  # "classifier"
    assert sorted(k for k in row if k.startswith("ics/")) == [  # layer subset honoured
        "ics/cos/layer02", "ics/cos/layer14", "ics/l2/layer02", "ics/l2/layer14"]
    assert all(k in rows[0] for k in ("landscape/loss_min", "landscape/loss_max",
                                      "landscape/grad_diff_min", "landscape/grad_diff_max",
                                      "landscape/loss/x4", "time/landscape"))


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


def test_dln_module_with_log_spaced_step_sizes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g)
    y = x @ torch.randn(10, 10, generator=g)
    land = Landscape(every=1, lr_logspace=(0.01, 30, 8))
    inst = Instruments([land, ICS(every=1, layers=[9, 17])])
    L.seed_everything(0, verbose=False)
    module = DLNModule(norm="batch", lr=1e-4)
    trainer(2, [inst]).fit(module, DataLoader(TensorDataset(x, y), batch_size=64))
    assert len(land.lr_multiples) == 8
    assert land.lr_multiples[0] == pytest.approx(0.01) and land.lr_multiples[-1] == 30
    metrics = inst.history[-1][1]
    # layers 9, 17 (layers.16, layers.32 with BN)
    assert sorted(k for k in metrics if k.startswith("ics/")) == [
        "ics/cos/layer09", "ics/cos/layer17", "ics/l2/layer09", "ics/l2/layer17"]
    assert metrics["landscape/loss_max"] >= metrics["landscape/loss_min"]
    assert all(math.isfinite(v) for v in metrics.values())


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


@pytest.mark.parametrize("model", ["vgg", "dln"])
def test_norm_variants_log_the_same_keys_per_layer_number(model):
    """BN and no-BN runs of one architecture log the same ics/act keys, so their curves of layer i
    overlay in W&B and `bnstudy plot`, although the DLN's module paths differ (layer 2 is layers.2
    with BN, layers.1 without; VGG keeps its paths, the norm slot being an Identity)."""
    make, data, count = ((vgg_module, images, 14) if model == "vgg" else
                         (dln_module, dln_data, 6))
    runs = {norm: fit_keys(make(norm), data()) for norm in ("batch", "none")}
    assert runs["batch"][0] == runs["none"][0]
    numbers = [f"layer{i:02d}" for i in range(1, count + 1)]
    stats = ("mean", "var", "dmean", "dvar", "q05", "q25", "q50", "q75", "q95")
    assert runs["none"][0] == ({f"ics/{m}/{n}" for m in ("l2", "cos") for n in numbers}
                               | {f"act/{n}/{s}" for n in numbers for s in stats})
    for norm, (_, metrics) in runs.items():  # layer01 is the first layer: G' = G
        assert metrics["ics/l2/layer01"] == 0, norm
        assert metrics["ics/cos/layer01"] == pytest.approx(1, abs=1e-12), norm
        assert metrics["ics/l2/layer02"] > 0, norm
    if model == "dln":  # the module paths do differ
        paths = [probes.layer_names(DeepLinear(6, 10, norm), torch.randn(2, 10))[1]
                 for norm in ("batch", "none")]
        assert paths == ["layers.2", "layers.1"]


def test_schedules():
    p = Probe(every=5, log_spaced=True, start=0, stop=40)
    assert [t for t in range(50) if p.due(t)] == [0, 1, 2, 4, 5, 8, 10, 15, 16, 20, 25, 30, 32,
                                                   35]
    assert [t for t in range(12) if Probe(every=4, log_spaced=False, start=2).due(t)] == [2, 6,
                                                                                           10]
    act = ActivationStats(every=10, log_spaced=False)
    assert [t for t in range(25) if act.active(t)] == [0, 9, 10, 19, 20]  # and each t - 1
    with pytest.raises(ValueError):
        Instruments([ICS(), ICS()])


def test_gradient_accumulation_is_rejected():
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer(2, [Instruments([ICS()])], accumulate_grad_batches=2).fit(vgg_module(), images())


@pytest.mark.parametrize("config", ["vgg_noisy_bn.yaml", "dln_bn.yaml"])
def test_paper_configs_carry_the_instruments(config, in_tmp):
    from bnstudy.cli import cli_main

    repo = Path(__file__).resolve().parents[1]
    cli = cli_main(["--config", str(repo / "configs" / config)], run=False)
    inst = next(c for c in cli.trainer.callbacks if isinstance(c, Instruments))
    paper = [ICS, Landscape, RandomLandscape, ActivationStats]
    extra = [Curvature] if config.startswith("dln") else []  # the edge-of-stability figure
    assert [type(p) for p in inst.probes] == paper + extra
    ics, land, rand, act = inst.probes[:4]
    assert (ics.every, ics.log_spaced, rand.every, act.every) == (100, True, 500, 50)
    names = probes.layer_names(cli.model.net, example_input(cli.model.net))
    if config.startswith("vgg"):
        assert ics.layers == [5, 10] and land.lr_multiples == [0.5, 1, 2, 4]
        assert probes.select_layers(names, ics.layers) == ["features.14", "features.30"]
    else:
        assert len(land.lr_multiples) == 8 and land.lr_multiples[-1] == pytest.approx(30)
        assert probes.select_layers(names, ics.layers) == ["layers.16", "layers.32"]
        assert probes.select_layers(names, act.layers) == ["layers.0", "layers.20", "layers.46"]


def example_input(net: torch.nn.Module) -> torch.Tensor:
    """A small input of the right shape for `net` (CIFAR-sized images, or feature vectors)."""
    first = next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    if isinstance(first, torch.nn.Conv2d):
        return torch.randn(2, first.in_channels, 32, 32)
    return torch.randn(4, first.in_features)


def test_curvature_and_theorem_probes_in_a_fit_equal_the_dense_twin():
    """Curvature logs the top Hessian eigenvalue of the step's loss at W^t (the dense float64
    twin on the recorded model and batch), warm-started: later steps spend fewer products;
    BNGradientBound logs the plain probe's numbers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    data = DataLoader(TensorDataset(x, x @ torch.randn(3, 3, generator=g)), batch_size=64)
    curv = Curvature(every=1, tol=1e-6, trace_samples=64)
    inst = Instruments([curv, Landscape(every=1), BNGradientBound(every=1, layers=[2])])
    rec = Recorder()
    L.seed_everything(0, verbose=False)
    module = DLNModule(depth=4, dim=3, norm="batch", lr=1e-4)
    trainer(4, [rec, inst]).fit(module, data)
    assert [s for s, _ in inst.history] == [0, 1, 2, 3]
    for step, metrics in inst.history:
        r = rec.steps[step]
        hess, _ = probes.hessian_dense(r["net"], module.loss_fn, *r["batch"])
        dense = torch.linalg.eigvalsh(hess).flip(0)
        assert metrics["curv/lambda_max"] == pytest.approx(float(dense[0]), rel=1e-4)
        assert abs(metrics["curv/trace"] - float(hess.trace())) <= 3 * metrics["curv/trace_se"]
        assert metrics["curv/two_over_lr"] == pytest.approx(2 / 1e-4)
        assert metrics["landscape/beta_eff"] > 0
        bound = probes.bn_gradient_bound(r["net"], module.loss_fn, *r["batch"], layers=[2])
        assert metrics["thm41/ratio_rederived/layer02"] == pytest.approx(
            bound["layers.2"]["ratio_rederived"], rel=1e-6)
    hvps = [m["curv/hvps"] for _, m in inst.history]
    assert max(hvps[1:]) < hvps[0]  # warm start
    assert curv._vectors is None  # dropped at teardown


def test_curvature_on_a_fixed_batch_measures_the_first_batch_at_every_step():
    """fixed_batch=True: lambda_max (and the trace) at W^t on the first measured step's batch,
    not the step's own batch (the dense float64 twin of each; the two differ at later steps),
    and the run trains bit for bit as without it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, generator=g)
    data = DataLoader(TensorDataset(x, x @ torch.randn(3, 3, generator=g)), batch_size=32)
    inst = Instruments([Curvature(every=1, tol=1e-6, trace_samples=64, fixed_batch=True)])
    rec = Recorder()
    runs = []
    for callbacks in ([rec, inst], []):
        L.seed_everything(0, verbose=False)
        module = DLNModule(depth=4, dim=3, norm="batch", lr=1e-3)
        trainer(4, callbacks).fit(module, data)
        runs.append(module.state_dict())
    assert same_state(runs[0], runs[1])
    assert [s for s, _ in inst.history] == [0, 1, 2, 3]
    first = rec.steps[0]["batch"]
    for step, metrics in inst.history:
        r = rec.steps[step]
        hess, _ = probes.hessian_dense(r["net"], module.loss_fn, *first)
        assert metrics["curv/lambda_max"] == pytest.approx(
            float(torch.linalg.eigvalsh(hess)[-1]), rel=1e-4)
        assert abs(metrics["curv/trace"] - float(hess.trace())) <= 3 * metrics["curv/trace_se"]
        if step in (1, 2):  # the epoch's second and third batches: another loss
            own, _ = probes.hessian_dense(r["net"], module.loss_fn, *r["batch"])
            assert metrics["curv/lambda_max"] != pytest.approx(
                float(torch.linalg.eigvalsh(own)[-1]), rel=1e-2)
