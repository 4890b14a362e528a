"""Theorem 4.1 (bnstudy/instruments/theorem41.py): both sides against a closed form written out
with numpy, on linear and conv layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnstudy import probes
from cases import conv_bn


def one_bn_layer(eps: float):
    """y = W1 x, z = BN(y) (gamma, beta set), out = W2 z, loss 1/2 ||out - t||^2: dL/dz = (out -
    t) W2 in closed form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3, eps=eps),
                          nn.Linear(3, 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, 2.0, -1.5]))
        model[1].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x, t = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    return model, lambda o, tt: 0.5 * (o - tt).pow(2).sum(), x, t


def closed_form(model, x, t):
    """Both sides of Theorem 4.1 written out with numpy from the forward values alone."""
    w1, w2 = model[0].weight.detach().numpy(), model[2].weight.detach().numpy()
    gamma, beta, eps = model[1].weight.detach().numpy(), model[1].bias.detach().numpy(), \
        model[1].eps
    y = x.numpy() @ w1.T
    m = len(y)
    sigma = np.sqrt(y.var(0) + eps)
    y_hat = (y - y.mean(0)) / sigma
    out = (gamma * y_hat + beta) @ w2.T
    g = (out - t.numpy()) @ w2  # dL/dz
    g_hat = gamma * g  # dL/dy-hat
    dy = (g_hat - g_hat.mean(0) - y_hat * (g_hat * y_hat).mean(0)) / sigma  # BN backward
    lhs = (dy ** 2).sum(0)
    scale = gamma ** 2 / sigma ** 2
    core = (g ** 2).sum(0) - g.sum(0) ** 2 / m
    inner = (g * y_hat).sum(0) ** 2
    return m, lhs, scale * (core - inner / np.sqrt(m)), scale * (core - inner / m)


@pytest.mark.parametrize("eps", [1e-300, 1e-2])  # torch needs eps > 0; 1e-300 is 0 here
def test_theorem_4_1_both_sides_equal_the_closed_form(eps):
    model, loss_fn, x, t = one_bn_layer(eps)
    m, lhs, rhs_printed, rhs_m = closed_form(model, x, t)
    result = probes.bn_gradient_bound(model, loss_fn, x, t)
    assert list(result) == ["0"]
    r = result["0"]
    assert r["m"] == m == 10
    assert r["lhs"] == pytest.approx(lhs.sum(), rel=1e-12)
    assert r["rhs_printed"] == pytest.approx(rhs_printed.sum(), rel=1e-12)
    assert r["rhs_rederived"] == pytest.approx(rhs_m.sum(), rel=1e-12)
    assert r["ratio_exact"] == pytest.approx(1, rel=1e-12)
    # the printed 1/sqrt(m) bound fails on every unit; 1/m holds, with equality as eps -> 0
    assert r["holds_printed"] == 0 and r["holds_rederived"] == 1
    assert r["ratio_printed"] > 1.05
    if eps < 1e-100:
        assert r["ratio_rederived"] == pytest.approx(1, rel=1e-12)
        assert lhs == pytest.approx(rhs_m, rel=1e-12)
    else:
        assert r["ratio_rederived"] < 1 - 1e-4


def test_theorem_4_1_on_conv_layers_counts_positions_as_samples():
    """BatchNorm2d: a unit's m samples are batch x height x width; the exact identity holds."""
    model, loss_fn, x, y = conv_bn()
    result = probes.bn_gradient_bound(model, loss_fn, x, y)
    assert list(result) == ["0", "3"]
    assert [r["m"] for r in result.values()] == [16 * 4 * 4, 16 * 2 * 2]
    for r in result.values():
        assert r["ratio_exact"] == pytest.approx(1, rel=1e-5)
        assert r["holds_rederived"] == 1 and r["holds_printed"] < 1
