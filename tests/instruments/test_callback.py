"""The Instruments callback (bnstudy/instruments/callback.py) in real Lightning fits: the same
numbers as the brute-force twins on the step's own batch, W^t and W^{t+1}; training unchanged;
logs at the probe steps; bf16; the paper's YAML configs."""
from __future__ import annotations

import copy
import math
import os

import pytest
from lightning.pytorch.loggers import CSVLogger

from bnstudy import probes
from bnstudy.instruments import (ICS, ActivationStats, BNGradientBound, Curvature, Instruments,
                                 Landscape, RandomLandscape)
from cases import (LIGHTNING_NOISE, Recorder, every_step_probes, example_input, images, read_csv,
                   same_state, trainer, vgg_module)
from conftest import REPO

pytestmark = LIGHTNING_NOISE


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
            assert metrics[f"ics/rel/{key}"] == pytest.approx(v["rel"], rel=1e-5, abs=1e-12)
            assert metrics[f"ics/cos/{key}"] == pytest.approx(v["cos"], rel=1e-5, abs=1e-5)
        assert sum(k.startswith("ics/l2/") for k in metrics) == 14
        land = probes.landscape_bruteforce(r["net"], module.loss_fn, x, y,
                                           [0.5 * r["lr"], 2 * r["lr"]])
        for key in ("loss_min", "loss_max", "grad_diff_min", "grad_diff_max", "beta_eff"):
            assert metrics[f"landscape/{key}"] == pytest.approx(land[key], rel=1e-5)
        assert metrics["landscape/loss/x2"] == pytest.approx(land["loss"][1], rel=1e-5)
        # the loss at W itself, on the step's batch with its noise (a copy: BN buffers move)
        loss_w = float(module.loss_fn(copy.deepcopy(r["net"]).train()(x), y))
        assert metrics["landscape/loss_w"] == pytest.approx(loss_w, rel=1e-6)
        assert metrics["time/ics"] > 0 and metrics["time/landscape"] > 0


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
        "ics/cos/layer02", "ics/cos/layer14", "ics/l2/layer02", "ics/l2/layer14",
        "ics/rel/layer02", "ics/rel/layer14"]
    assert all(k in rows[0] for k in ("landscape/loss_min", "landscape/loss_max",
                                      "landscape/grad_diff_min", "landscape/grad_diff_max",
                                      "landscape/loss/x4", "time/landscape"))


def test_gradient_accumulation_is_rejected():
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer(2, [Instruments([ICS()])], accumulate_grad_batches=2).fit(vgg_module(), images())


@pytest.mark.slow
@pytest.mark.parametrize("config", ["vgg_noisy_bn.yaml", "dln_bn.yaml"])
def test_paper_configs_carry_the_instruments(config, in_tmp):
    from bnstudy.cli import cli_main

    cli = cli_main(["--config", str(REPO / "configs" / config)], run=False)
    inst = next(c for c in cli.trainer.callbacks if isinstance(c, Instruments))
    paper = [ICS, Landscape, RandomLandscape, ActivationStats]
    # the edge-of-stability figure and Theorem 4.1's content
    extra = [Curvature, BNGradientBound] if config.startswith("dln") else []
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
