"""The loss landscape (bnstudy/instruments/loss_landscape.py) against the analytic landscape of a
quadratic, and the Landscape probe's log-spaced step sizes in a fit. Its twin runs in
test_twins.py."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnstudy import probes
from bnstudy.instruments import ICS, Instruments, Landscape
from bnstudy.modules import DLNModule
from cases import LIGHTNING_NOISE, trainer

pytestmark = LIGHTNING_NOISE


def quadratic(eigenvector: bool):
    """L(w) = 1/2 ||X w - y||^2: Hessian H = X^T X, g = H w - X^T y."""
    torch.manual_seed(1)
    n = 6
    model = nn.Linear(n, 1, bias=False).double()
    x = torch.randn(40, n, dtype=torch.float64)
    y = torch.randn(40, 1, dtype=torch.float64)
    hess = x.T @ x
    if eigenvector:  # choose w so that g is an eigenvector of H
        _, vecs = torch.linalg.eigh(hess)
        w = torch.linalg.solve(hess, vecs[:, 2] + x.T @ y[:, 0])
        with torch.no_grad():
            model.weight.copy_(w[None])
    loss_fn = lambda out, t: 0.5 * (out - t).pow(2).sum()  # noqa: E731
    return model, loss_fn, x, y, hess


@pytest.mark.parametrize("eigenvector", [False, True])
def test_landscape_on_a_quadratic_is_analytic(eigenvector):
    model, loss_fn, x, y, hess = quadratic(eigenvector)
    w = model.weight.detach()[0]
    g = hess @ w - x.T @ y[:, 0]
    loss0 = 0.5 * float((x @ w - y[:, 0]).pow(2).sum())
    rayleigh = float(g @ hess @ g / (g @ g))
    sizes = [1e-3, 3e-3, 1e-2, 3e-2]
    result = probes.landscape(model, loss_fn, x, y, sizes)
    # L(w - eta g) = L - eta ||g||^2 + eta^2 / 2 g^T H g
    expected = [loss0 - eta * float(g @ g) + eta ** 2 / 2 * float(g @ hess @ g) for eta in sizes]
    assert result["loss"] == pytest.approx(expected, rel=1e-10)
    # grad(w - eta g) = g - eta H g: the difference is eta ||H g||, beta = ||H g|| / ||g||
    beta = float((hess @ g).norm() / g.norm())
    assert result["beta"] == pytest.approx([beta] * 4, rel=1e-10)
    assert result["beta_eff"] == pytest.approx(beta, rel=1e-10)
    assert result["grad_diff"] == pytest.approx([eta * float((hess @ g).norm()) for eta in sizes],
                                                rel=1e-10)
    if eigenvector:  # along an eigenvector beta_eff is the Rayleigh quotient along g
        assert result["beta_eff"] == pytest.approx(rayleigh, rel=1e-8)
    else:  # otherwise ||Hg||/||g|| exceeds it (Cauchy-Schwarz)
        assert result["beta_eff"] > rayleigh * (1 + 1e-6)


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
