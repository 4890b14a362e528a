"""The Hessian's eigenvalue density (bnstudy/instruments/spectrum.py) on an exact oracle, its early
stop, per-layer blocks of hessian_eigs/trace/density against the dense block, and the Spectrum
instrument in real fits (training unchanged bit for bit, W&B histogram). The twin check against
the dense float64 Hessian runs in test_twins.py; commands on run directories in
tests/analysis/test_landscape_commands.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnstudy import probes
from bnstudy.instruments import Instruments, Spectrum, hessian_density
from cases import (LIGHTNING_NOISE, SPECTRUM, TWINS, Recorder, conv_bn, images, quadratic,
                   same_state, trainer, vgg_module)

pytestmark = LIGHTNING_NOISE


def l1(a: np.ndarray, b: np.ndarray, grid: np.ndarray) -> float:
    return float(np.abs(a - b).sum() * (grid[1] - grid[0]))


def test_diagonal_quadratic_is_exact():
    """On a diagonal Hessian every Rademacher vector sees the whole spectrum with equal weights:
    the quadrature nodes are the eigenvalues, each of weight 1/n, the moments exact (se 0)."""
    model, loss_fn, x, y, _, _ = quadratic(SPECTRUM, diagonal=True)
    result = hessian_density(model, loss_fn, x, y, n_v=3, m=20)
    n = len(SPECTRUM)
    assert result["steps"] == [n] * 3  # the Krylov space is exhausted after n steps
    for nodes, weights in zip(result["nodes"], result["weights"]):
        assert nodes == pytest.approx(sorted(SPECTRUM), abs=1e-12)
        assert weights == pytest.approx([1 / n] * n, abs=1e-12)
    exact = [np.mean(np.array(SPECTRUM) ** k) for k in range(1, 5)]
    assert result["moments"] == pytest.approx(exact, rel=1e-12)
    assert result["moments_se"] == pytest.approx([0] * 4, abs=1e-9)
    assert result["neg_mass"] == pytest.approx(1 / n, abs=1e-12)  # the -6
    assert result["lambda_max"] == pytest.approx(4.0, rel=1e-12)
    assert result["quadrature_l1"] == 0  # exhausted: exact
    # a rotated quadratic: moments exact only in expectation, the extremes still exact
    model, loss_fn, x, y, _, _ = quadratic(SPECTRUM)
    rotated = hessian_density(model, loss_fn, x, y, n_v=3, m=20)
    assert rotated["lambda_min"] == pytest.approx(-6.0, rel=1e-10)
    assert rotated["moments_se"][1] > 0


def test_an_early_stop_at_tol_keeps_the_density():
    model, loss_fn, x, y = TWINS["conv_bn"]()
    full = hessian_density(model, loss_fn, x, y, n_v=3, m=100)
    early = hessian_density(model, loss_fn, x, y, n_v=3, m=100, tol=1e-3, grid=full["grid"],
                            sigma=full["sigma"])
    assert max(early["steps"]) < max(full["steps"])
    assert early["hvps"] < full["hvps"]
    assert l1(early["density"], full["density"], full["grid"]) < 5e-3
    assert early["moments"] == pytest.approx(full["moments"], rel=1e-6)  # exact from m = 3 on


@pytest.mark.parametrize("params", [[2], ["1", "7.bias"]], ids=["layer", "paths"])
def test_blocks_equal_the_dense_submatrix(params):
    model, loss_fn, x, y = conv_bn()
    sub, chosen = probes.hessian_dense(model, loss_fn, x, y, params=params)
    assert chosen == probes.parameter_names(model, x, params)
    eigenvalues = torch.linalg.eigvalsh(sub).numpy()
    eigs = probes.hessian_eigs(model, loss_fn, x, y, k=2, tol=1e-6, params=params)
    assert eigs["eigenvalues"] == pytest.approx(eigenvalues[::-1][:2].tolist(), rel=1e-4)
    assert sorted(eigs["vectors"][0]) == sorted(chosen)
    trace = probes.hessian_trace(model, loss_fn, x, y, samples=64, params=params)
    assert abs(trace["trace"] - float(sub.trace())) <= 3 * trace["se"]
    density = hessian_density(model, loss_fn, x, y, n_v=30, m=40, params=params, seed=2)
    assert density["n"] == len(eigenvalues) and density["names"] == chosen
    exact = np.array([np.mean(eigenvalues ** k) for k in range(1, 5)])
    assert np.all(np.abs(density["moments"] - exact) <= 3 * density["moments_se"] + 1e-12)
    # the block is the dense Hessian's submatrix, and not the whole Hessian
    whole, names = probes.hessian_dense(model, loss_fn, x, y)
    offsets = np.cumsum([0] + [model.get_parameter(n).numel() for n in names])
    index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names)
                       if n in chosen])
    torch.testing.assert_close(whole[index][:, index], sub, rtol=1e-10, atol=1e-12)
    assert eigs["eigenvalues"][0] < float(torch.linalg.eigvalsh(whole)[-1]) * (1 - 1e-3)


def test_a_diverged_model_gives_nan_not_an_error():
    model, loss_fn, x, y = TWINS["mlp_bn"]()
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    result = hessian_density(model, loss_fn, x, y, n_v=2, m=5)
    assert math.isnan(result["lambda_max"]) and math.isnan(result["trace"])


def test_bad_arguments_say_what_is_wrong():
    model, loss_fn, x, y = TWINS["mlp_bn"]()
    with pytest.raises(ValueError, match="n_v must be >= 1"):
        hessian_density(model, loss_fn, x, y, n_v=0)
    with pytest.raises(ValueError, match="m must be >= 1"):
        hessian_density(model, loss_fn, x, y, m=0)
    with pytest.raises(ValueError, match="width must be > 0"):
        hessian_density(model, loss_fn, x, y, width=0)
    with pytest.raises(ValueError, match="n_v must be >= 2"):
        Spectrum(n_v=1)


# ---- the instrument in real fits ----------------------------------------------------------------
def test_spectrum_in_a_fit_leaves_training_unchanged_and_equals_the_function():
    from bnstudy.instruments import Curvature

    inst = Instruments([Spectrum(every=2, log_spaced=False, n_v=2, m=4),
                        Curvature(every=2, log_spaced=False, max_iter=3)])
    rec = Recorder()
    runs = []
    for callbacks in ([inst, rec], []):
        module = vgg_module(momentum=0.9)  # noisy BN, momentum
        tr = trainer(4, callbacks)
        tr.fit(module, images())
        runs.append((module.state_dict(), tr.optimizers[0].state_dict()))
    assert same_state(runs[0][0], runs[1][0]) and same_state(runs[0][1], runs[1][1])
    assert [s for s, _ in inst.history] == [0, 2]
    for step, metrics in inst.history:
        r = rec.steps[step]
        twin = hessian_density(r["net"], module.loss_fn, *r["batch"], n_v=2, m=4,
                               seed=step)  # the instrument's seed: 0 * 1000003 + step
        for key in ("lambda_max", "lambda_min", "trace", "trace_se", "neg_mass"):
            assert metrics[f"spec/{key}"] == pytest.approx(twin[key], rel=1e-6, abs=1e-9)
        assert metrics["spec/hvps"] == 8 and metrics["time/spec"] > 0


def test_the_density_goes_to_wandb_as_a_histogram(tmp_path, monkeypatch):
    import wandb
    import wandb_records
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="bnstudy-test")
    inst = Instruments([Spectrum(every=1, log_spaced=False, n_v=2, m=3)])
    trainer(2, [inst], logger=[logger, CSVLogger(tmp_path)]).fit(vgg_module(norm="batch"),
                                                                  images())
    logger.experiment.finish()
    rows = [r for r in wandb_records.history(tmp_path) if "spec/density" in r]
    assert len(rows) == 2
    hist = rows[-1]["spec/density"]
    assert hist["_type"] == "histogram" and len(hist["values"]) == 64
    assert sum(hist["values"]) == pytest.approx(1, abs=1e-6)  # the quadrature's mass
    csv_rows = [r for r in wandb_records.history(tmp_path) if "spec/neg_mass" in r]
    assert len(csv_rows) == 2 and all(0 <= r["spec/neg_mass"] <= 1 for r in csv_rows)
