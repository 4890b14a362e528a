"""bnstudy.probes against brute-force twins and exact oracles, and the measurement invariance."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnstudy import probes
from bnstudy.models import VGG, DeepLinear, init_weights
from bnstudy.norms import BatchNoise, resample_noise


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


@pytest.mark.parametrize("case", list(CASES))
def test_ics_equals_bruteforce_twin(case):
    model, loss_fn, x, y, after, _ = trained_step(case)
    fast = probes.ics(model, loss_fn, x, y, after)
    twin = probes.ics_bruteforce(model, loss_fn, x, y, after)
    assert len(fast) == (14 if case.startswith("vgg") else 25)
    assert_ics_close(fast, twin)
    # the shift is real: some layer moved (the check above is not comparing zeros)
    assert max(v["l2"] for v in fast.values()) > 0


@pytest.mark.parametrize("case", list(CASES))
def test_landscape_equals_bruteforce_twin(case):
    model, loss_fn, x, y, _, lr = trained_step(case)
    sizes = [m * lr for m in (0.5, 1, 2, 4)]
    fast = probes.landscape(model, loss_fn, x, y, sizes)
    twin = probes.landscape_bruteforce(model, loss_fn, x, y, sizes)
    for key in ("loss", "grad_diff", "beta"):
        assert fast[key] == pytest.approx(twin[key], rel=1e-5)
    for key in ("loss_min", "loss_max", "grad_diff_min", "grad_diff_max", "beta_eff"):
        assert fast[key] == pytest.approx(twin[key], rel=1e-5)
    assert fast["grad_diff_max"] > 0


@pytest.mark.parametrize("case", ["vgg_noisy_bn", "dln"])
def test_random_landscape_equals_twin_along_the_same_direction(case):
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


def test_twins_agree_under_bf16_autocast():
    """Probes move parameters in place; autocast's cache of low-precision weights must not go
    stale (the twins use fresh copies, so a stale cache would show)."""
    model, loss_fn, x, y, after, lr = trained_step("vgg_bn")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = probes.ics(model, loss_fn, x, y, after)
        twin = probes.ics_bruteforce(model, loss_fn, x, y, after)
        land = probes.landscape(model, loss_fn, x, y, [lr, 2 * lr])
        land_twin = probes.landscape_bruteforce(model, loss_fn, x, y, [lr, 2 * lr])
    assert_ics_close(fast, twin)
    assert land["loss"] == pytest.approx(land_twin["loss"], rel=1e-5)
    assert land["grad_diff"] == pytest.approx(land_twin["grad_diff"], rel=1e-5)


# ---- oracles ---------------------------------------------------------------------------------
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
        assert probes._Trace(model, x).chain is None
    fast = probes.ics(model, F.cross_entropy, x, y, after)
    assert_ics_close(fast, probes.ics_bruteforce(model, F.cross_entropy, x, y, after))


@pytest.mark.parametrize("case", ["vgg_noisy_bn", "dln_bn"])
def test_paper_models_take_the_chain_path(case):
    model, _, x, _ = CASES[case]()
    with probes.measuring(model):
        chain = probes._Trace(model, x).chain
    assert chain is not None and sum(isinstance(m, probes.WEIGHT_LAYERS) for m, _ in chain) in (
        14, 25)


def test_layer_selection_by_number_and_name():
    model, loss_fn, x, y, after, _ = trained_step("vgg_bn")
    names = probes.layer_names(model, x)
    assert names[0] == "features.0" and names[-1] == "classifier"
    by_number = probes.ics(model, loss_fn, x, y, after, layers=[5, 10])
    assert list(by_number) == [names[4], names[9]]
    assert by_number == probes.ics(model, loss_fn, x, y, after, layers=[names[9], names[4]])
    with pytest.raises(ValueError):
        probes.ics(model, loss_fn, x, y, after, layers=[15])
    with pytest.raises(ValueError):
        probes.ics(model, loss_fn, x, y, after, layers=["features.1"])  # a BN, not a layer


# ---- invariance: a probe leaves everything as it found it, bit for bit -----------------------
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


@pytest.mark.parametrize("stale", [False, True])
def test_probes_leave_all_state_bit_for_bit(stale):
    model, loss_fn, x, y, after, _ = trained_step("vgg_noisy_bn")
    model.train()
    loss_fn(model(x), y).backward()  # .grad populated, noise drawn and held
    model.features[4][0].eval()  # a mixed train/eval state must come back too (a BN)
    if stale:
        resample_noise(model)  # the next training forward draws new noise
    before = snapshot(model)
    run_every_probe(model, loss_fn, x, y, after)
    assert_same(before, snapshot(model))
    # the noise the next training forward sees is what it would have seen without the probes
    model.train()
    twin_out = model(x)
    model2, *_ = trained_step("vgg_noisy_bn")
    model2.train()
    loss_fn(model2(x), y).backward()
    if stale:
        resample_noise(model2)
    assert torch.equal(model2(x), twin_out)


def test_probes_restore_the_global_rng():
    """A model that draws from the global RNG in its forward (dropout): probes put it back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x, y = torch.randn(16, 5), torch.randn(16, 2)
    loss_fn = lambda out, t: F.mse_loss(out, t)  # noqa: E731
    after = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    before = snapshot(model)
    run_every_probe(model, loss_fn, x, y, after)
    assert_same(before, snapshot(model))


def test_invariance_check_can_fail():
    """The snapshot comparison notices a probe-like pass that forgets to restore BN state."""
    model, loss_fn, x, y = CASES["vgg_bn"]()
    before = snapshot(model)
    model.train()
    with torch.no_grad():
        model(x)  # updates running stats and num_batches_tracked
    with pytest.raises(AssertionError):
        assert_same(before, snapshot(model))


def test_probes_evaluate_the_loss_the_optimizer_sees():
    """Train mode, batch statistics and the step's held noise: the probe's loss at W equals the
    training forward's loss bit for bit, even when the model was left in eval mode."""
    model, loss_fn, x, y, _, lr = trained_step("vgg_noisy_bn")
    resample_noise(model)
    model.train()
    train_loss = float(loss_fn(model(x), y).detach())
    model.eval()
    result = probes.landscape(model, loss_fn, x, y, [0.0, lr])
    assert result["loss0"] == train_loss
    assert result["loss"][0] == train_loss
    assert not model.training


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
