"""Each quantity against its brute-force twin, on each model case, through one harness (Cockpit's
way): the fast measurement and the definition written out naively agree."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from bnstudy import probes
from cases import CASES, TWINS, assert_ics_close, trained_step


def ics_twin(case: str) -> None:
    model, loss_fn, x, y, after, _ = trained_step(case)
    fast = probes.ics(model, loss_fn, x, y, after)
    twin = probes.ics_bruteforce(model, loss_fn, x, y, after)
    assert len(fast) == (14 if case.startswith("vgg") else 25)
    assert_ics_close(fast, twin)
    # the shift is real: some layer moved (the check above is not comparing zeros)
    assert max(v["l2"] for v in fast.values()) > 0


def landscape_twin(case: str) -> None:
    model, loss_fn, x, y, _, lr = trained_step(case)
    sizes = [m * lr for m in (0.5, 1, 2, 4)]
    fast = probes.landscape(model, loss_fn, x, y, sizes)
    twin = probes.landscape_bruteforce(model, loss_fn, x, y, sizes)
    for key in ("loss", "grad_diff", "beta"):
        assert fast[key] == pytest.approx(twin[key], rel=1e-5)
    for key in ("loss_min", "loss_max", "grad_diff_min", "grad_diff_max", "beta_eff"):
        assert fast[key] == pytest.approx(twin[key], rel=1e-5)
    assert fast["grad_diff_max"] > 0


def random_landscape_twin(case: str) -> None:
    model, loss_fn, x, y, _, lr = trained_step(case)
    sizes = [m * lr for m in (0.5, 1, 2, 4)]
    fast = probes.random_landscape(model, loss_fn, x, y, sizes, seed=3)
    g = probes.landscape(model, loss_fn, x, y, [lr])["grad_norm"]
    params = {n: p for n, p in model.named_parameters()}
    d = probes.random_direction(params, seed=3, norm=g)
    twin = probes.landscape_bruteforce(model, loss_fn, x, y, sizes, direction=d)
    assert fast["direction_norm"] == pytest.approx(g, rel=1e-6)
    for key in ("loss", "grad_diff", "beta"):
        assert fast[key] == pytest.approx(twin[key], rel=1e-5)
    # a random direction is not the gradient: the first-order loss change differs
    along_g = probes.landscape(model, loss_fn, x, y, sizes)
    assert fast["loss"] != pytest.approx(along_g["loss"], rel=1e-3)


def curvature_twin(case: str) -> None:
    model, loss_fn, x, y = TWINS[case]()
    hess, names = probes.hessian_dense(model, loss_fn, x, y)
    assert names == [n for n, _ in model.named_parameters()]
    dense = torch.linalg.eigvalsh(hess).flip(0).numpy()
    result = probes.hessian_eigs(model, loss_fn, x, y, k=3, tol=1e-6)
    assert result["eigenvalues"] == pytest.approx(dense[:3].tolist(), rel=1e-4)
    assert result["residual"] <= 1e-6
    # the vectors are unit eigenvectors: u^T H u = lambda for the dense H
    u = torch.cat([result["vectors"][0][n].double().reshape(-1) for n in names])
    assert float(u.norm()) == pytest.approx(1, rel=1e-5)
    assert float(u @ hess @ u) == pytest.approx(dense[0], rel=1e-4)
    trace = probes.hessian_trace(model, loss_fn, x, y, samples=64, seed=1)
    assert abs(trace["trace"] - float(hess.trace())) <= 3 * trace["se"]
    assert trace["se"] > 0 and trace["hvps"] == 64


def l1(a: np.ndarray, b: np.ndarray, grid: np.ndarray) -> float:
    """L1 distance of two densities on an even grid (each integrates to 1)."""
    return float(np.abs(a - b).sum() * (grid[1] - grid[0]))


def density_twin(case: str) -> None:
    """Moments tr(H^k)/n, k = 1..4, within 3 standard errors of the dense float64 Hessian's; the
    smoothed density within L1 of twice the distance its own error bars predict (sqrt(2/pi) x the
    summed pointwise standard error: the mean |error| of a Gaussian) plus its quadrature change,
    so that sampling over vectors is the only error left."""
    model, loss_fn, x, y = TWINS[case]()
    result = probes.hessian_density(model, loss_fn, x, y, n_v=40, m=60, seed=1)
    grid = result["grid"]
    dense = probes.hessian_density_dense(model, loss_fn, x, y, grid, result["sigma"])
    assert result["n"] == dense["n"] and result["n_v"] == 40
    assert result["hvps"] == sum(result["steps"]) and max(result["steps"]) <= 60
    assert np.all(result["moments_se"] > 0)
    assert np.all(np.abs(result["moments"] - dense["moments"]) <= 3 * result["moments_se"]), (
        (result["moments"] - dense["moments"]) / result["moments_se"])
    assert abs(result["trace"] - dense["trace"]) <= 3 * result["trace_se"]
    assert l1(result["density"], 0 * grid, grid) == pytest.approx(1, abs=1e-3)
    predicted = math.sqrt(2 / math.pi) * float(result["density_se"].sum() * (grid[1] - grid[0]))
    distance = l1(result["density"], dense["density"], grid)
    assert result["quadrature_l1"] < 0.01
    assert distance <= 2 * predicted + result["quadrature_l1"], (distance, predicted)
    # the extremes: Lanczos finds them first
    assert result["lambda_max"] == pytest.approx(dense["lambda_max"], rel=1e-4)
    assert result["lambda_min"] == pytest.approx(dense["lambda_min"], rel=1e-3, abs=1e-4)
    assert abs(result["neg_mass"] - dense["neg_mass"]) <= 3 * result["neg_mass_se"] + 0.02


def surface_twin(case: str) -> None:
    """The grid along the default (filter-normalized) directions equals a deep copy per point, in
    train mode (batch statistics, the held noise) and in eval mode (running statistics)."""
    model, loss_fn, x, y, _, _ = trained_step(case)  # running statistics moved by two steps
    directions = [probes.filter_normalized_direction(model, seed=s) for s in (4, 5)]
    coords = [np.linspace(-1, 1, 3), np.linspace(-0.5, 0.5, 3)]
    results = {}
    for mode in ("train", "eval"):
        fast = probes.loss_surface(model, loss_fn, x, y, coords=coords, mode=mode, seed=4)
        twin = probes.loss_surface_bruteforce(model, loss_fn, x, y, directions, coords, mode)
        assert fast["loss"].shape == (3, 3) and fast["done"].all() and fast["evaluations"] == 9
        np.testing.assert_allclose(fast["loss"], twin, rtol=1e-5)
        # the center is the model's own loss in that mode
        with torch.no_grad():
            center = float(loss_fn(copy.deepcopy(model).train(mode == "train")(x), y))
        assert fast["loss"][1, 1] == pytest.approx(center, rel=1e-6)
        results[mode] = fast["loss"]
    if "bn" in case:  # BN: the two modes measure different losses
        assert not np.allclose(results["train"], results["eval"], rtol=1e-3)


# quantity: (its check against the twin, the model cases it runs on). The dense Hessian of the
# curvature and density twins is affordable on the tiny TWINS models only.
HARNESS = {
    "ics": (ics_twin, list(CASES)),
    "landscape": (landscape_twin, list(CASES)),
    "random_landscape": (random_landscape_twin, ["vgg_noisy_bn", "dln"]),
    "curvature": (curvature_twin, list(TWINS)),
    "density": (density_twin, list(TWINS)),
    "surface": (surface_twin, list(CASES)),
}


@pytest.mark.parametrize("quantity, case", [(q, c) for q, (_, cases) in HARNESS.items()
                                            for c in cases])
def test_quantity_equals_its_twin(quantity, case):
    check, _ = HARNESS[quantity]
    check(case)
