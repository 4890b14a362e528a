"""Internal covariate shift (bnstudy/instruments/covariate_shift.py) on models where it is known:
zero without an update or between layers that do not interact, and the generic path of a model
that is not a chain. Its twin runs in test_twins.py, its probe in test_callback.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnstudy import probes
from bnstudy.instruments.trace import Trace
from cases import CASES, assert_ics_close


class TwoBranches(nn.Module):
    """Branch b runs after branch a but never sees it: with a separable loss, b's gradients do
    not depend on a's parameters. Not a chain (the generic path)."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Linear(4, 4), nn.Linear(4, 2)
        self.b1, self.b2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        a = self.a2(torch.tanh(self.a1(x)))
        b = self.b2(torch.tanh(self.b1(x)))
        return torch.cat([a, b], dim=1)


def test_non_interacting_layers_have_zero_ics():
    torch.manual_seed(0)
    model = TwoBranches()
    x, y = torch.randn(16, 4), torch.randn(16, 4)
    loss_fn = lambda out, t: F.mse_loss(out, t, reduction="sum")  # noqa: E731
    after = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    result = probes.ics(model, loss_fn, x, y, after)
    assert list(result) == ["a1", "a2", "b1", "b2"]  # forward order
    for layer in ("a1", "b1"):  # b1 runs after a1, a2 but does not interact with them
        assert result[layer]["l2"] == 0.0 and result[layer]["cos"] == pytest.approx(1.0, abs=1e-12)
    assert result["a2"]["l2"] > 0 and result["b2"]["l2"] > 0
    assert_ics_close(result, probes.ics_bruteforce(model, loss_fn, x, y, after))


@pytest.mark.parametrize("case", ["vgg_bn", "dln"])
def test_no_update_gives_zero_ics(case):
    model, loss_fn, x, y = CASES[case]()
    same = {n: p.detach().clone() for n, p in model.named_parameters()}
    for v in probes.ics(model, loss_fn, x, y, same).values():
        assert v["l2"] == 0.0 and v["cos"] == pytest.approx(1.0, abs=1e-12)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.tensor(0.5))  # a parameter outside any leaf module

    def forward(self, x):
        h = torch.relu(self.bn(self.inp(x)))
        h = h + self.scale * torch.relu(self.mid(h))
        return self.out(h)


def test_generic_path_on_a_non_chain_model_equals_twin():
    torch.manual_seed(0)
    model = Residual()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    after = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    with probes.measuring(model):
        assert Trace(model, x).chain is None
    fast = probes.ics(model, F.cross_entropy, x, y, after)
    assert_ics_close(fast, probes.ics_bruteforce(model, F.cross_entropy, x, y, after))
