"""Noisy BN against algorithm 1, lp normalizations against a hand computation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnstudy.norms import (BatchNoise, LpNorm, NoiseConfig, _lp_reference, make_norm, noise_in_eval,
                           resample_noise)


def _drawn(shape, cfg=NoiseConfig(), seed=0):
    noise = BatchNoise(NoiseConfig(**{**vars(cfg), "seed": seed}))
    noise.train()
    x = torch.zeros(shape)
    noise(x)
    return noise


def test_noise_parameters_follow_algorithm_1():
    cfg = NoiseConfig(n_mu=0.5, n_sigma=1.25, r_mu=0.1, r_sigma=0.1)
    noise = _drawn((512, 8, 6, 6), cfg)  # conv map: batch x channels x H x W
    shift, scale = noise.shift, noise.scale
    assert shift.shape == scale.shape == (512, 8, 6, 6)  # per sample and position
    # per channel: mu_j is the centre of U(mu_j - r_mu, mu_j + r_mu) ...
    mu = (shift.amax(dim=(0, 2, 3)) + shift.amin(dim=(0, 2, 3))) / 2
    spread = (shift.amax(dim=(0, 2, 3)) - shift.amin(dim=(0, 2, 3))) / 2
    assert torch.all(mu.abs() <= cfg.n_mu + 1e-3)
    assert torch.allclose(spread, torch.full_like(spread, cfg.r_mu), atol=2e-3)
    # ... and sigma_j ~ U(1, n_sigma) is the mean of N(sigma_j, r_sigma)
    sigma = scale.mean(dim=(0, 2, 3))
    assert torch.all(sigma > 1 - 5e-3) and torch.all(sigma < cfg.n_sigma + 5e-3)
    assert torch.allclose(scale.std(dim=(0, 2, 3)), torch.full((8,), cfg.r_sigma), rtol=0.05)
    # the per-channel parameters differ between channels (not one draw for the layer)
    assert mu.std() > 0.05 and sigma.std() > 0.02
    # the shift within a channel is uniform: its variance is r_mu^2 / 3
    assert torch.allclose(shift.var(dim=(0, 2, 3)), torch.full((8,), cfg.r_mu ** 2 / 3), rtol=0.05)


def test_per_unit_parameters_over_many_draws_are_uniform():
    cfg = NoiseConfig(n_mu=0.5, n_sigma=1.25, r_mu=0.0, r_sigma=0.0)
    noise = _drawn((2, 4000), cfg)
    mu, sigma = noise.shift[0], noise.scale[0]
    assert torch.equal(noise.shift[0], noise.shift[1])  # r = 0: no per-sample variation
    assert mu.min() >= -0.5 and mu.max() <= 0.5 and abs(mu.mean()) < 0.03
    assert abs(mu.var() - 1 / 12) < 0.01  # U(-0.5, 0.5)
    assert sigma.min() >= 1 and sigma.max() <= 1.25 and abs(sigma.mean() - 1.125) < 0.01


def test_noise_is_held_within_a_step_and_redrawn_at_the_next():
    torch.manual_seed(0)
    layer = make_norm("noisy_batch", 4, spatial=False)
    layer.train()
    x = torch.randn(16, 4)
    rng_before = torch.get_rng_state()
    first = layer(x)
    assert torch.equal(torch.get_rng_state(), rng_before)  # own generator: global RNG untouched
    assert torch.equal(layer(x), first)  # a probe within the step sees the same noise
    resample_noise(layer)
    assert not torch.equal(layer(x), first)
    bn_only = nn.BatchNorm1d(4)
    assert not torch.allclose(first, bn_only(x))  # noise is really applied


def test_noise_off_in_eval_by_default_and_on_when_asked():
    layer = make_norm("noisy_batch", 3, spatial=False)
    x = torch.randn(8, 3)
    layer.train()
    layer(x)
    layer.eval()
    assert torch.equal(layer(x), layer[0](x))
    on = make_norm("noisy_batch", 3, spatial=False, noise=NoiseConfig(in_eval=True))
    on.train()
    on(x)
    on.eval()
    assert not torch.equal(on(x), on[0](x))


@pytest.mark.parametrize("shape", [(1000, 10), (16, 8, 4, 4)])
def test_noise_is_algorithm_1_drawn_value_by_value(shape):
    """The twin: algorithm 1 written out op by op, from the same generator's values in the same
    order, gives the same noise to float rounding (sample's fused ops round once where it
    rounds twice)."""
    cfg = NoiseConfig(n_mu=0.7, n_sigma=1.6, r_mu=0.15, r_sigma=0.2)
    layer = BatchNoise(cfg)
    like = torch.empty(shape)
    g_ours, g_twin = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(2):  # the second draw checks that both took as many values from the stream
        scale, shift = layer.sample(like, g_ours)
        unit = (1, shape[1]) + (1,) * (len(shape) - 2)
        mu = (torch.rand(unit, generator=g_twin) * 2 - 1) * cfg.n_mu
        sigma = 1 + torch.rand(unit, generator=g_twin) * (cfg.n_sigma - 1)
        twin_shift = torch.rand(shape, generator=g_twin) * 2 * cfg.r_mu + (mu - cfg.r_mu)
        twin_scale = torch.randn(shape, generator=g_twin) * cfg.r_sigma + sigma
        torch.testing.assert_close(shift, twin_shift, rtol=0, atol=1e-6)
        torch.testing.assert_close(scale, twin_scale, rtol=0, atol=1e-6)


def test_noise_state_round_trips_through_state_dict():
    a = make_norm("noisy_batch", 3, spatial=False, noise=NoiseConfig(seed=7))
    a.train()
    x = torch.randn(5, 3)
    a(x)
    resample_noise(a)
    b = make_norm("noisy_batch", 3, spatial=False, noise=NoiseConfig(seed=7))
    b.load_state_dict(a.state_dict())
    b.train()
    assert torch.equal(a(x), b(x))  # the second draw continues the saved generator


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("spatial", [False, True])
def test_lp_norm_matches_hand_computation(p, spatial):
    torch.manual_seed(1)
    x = torch.randn(6, 3, 4, 4) * 3 + 2 if spatial else torch.randn(10, 3) * 3 + 2
    layer = LpNorm(3, p)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, 3.0]))
    out = layer(x)
    # by hand, one unit at a time, with the unit's values over batch (x H x W) as a flat list
    for j in range(3):
        vals = (x[:, j] if not spatial else x[:, j].reshape(-1)).reshape(-1).tolist()
        mean = sum(vals) / len(vals)
        if p == math.inf:
            norm = max(abs(v) for v in vals) + layer.eps
        else:
            norm = (sum(abs(v) ** p for v in vals) / len(vals) + layer.eps) ** (1 / p)
        want = [(v - mean) / norm * layer.weight[j].item() + layer.bias[j].item() for v in vals]
        got = (out[:, j] if not spatial else out[:, j].reshape(-1)).reshape(-1)
        assert torch.allclose(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("spatial", [False, True])
def test_lp_norm_gradient_is_the_definitions(p, spatial):
    """The hand-written backward against autograd through the definition written out naively
    (its twin), against finite differences (gradcheck), and second derivatives (gradgradcheck:
    the Hessian-vector products of Curvature go through the definition)."""
    torch.manual_seed(2)
    x = (torch.randn(6, 3, 4, 4) if spatial else torch.randn(40, 3)).double() * 3 + 2
    layer = LpNorm(3, p).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, 3.0]))
    g = torch.randn_like(x)
    x.requires_grad_(True)
    got = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g)

    def naive(x, w, b):  # per unit over the batch (x H x W), as the docstring writes it
        flat = x.transpose(0, 1).reshape(3, -1)
        mean = flat.mean(dim=1)
        if p == math.inf:
            norm = flat.abs().max(dim=1).values + layer.eps
        else:
            norm = ((flat.abs() ** p).mean(dim=1) + layer.eps) ** (1 / p)
        shape = (1, 3) + (1,) * (x.dim() - 2)
        return (x - mean.view(shape)) / norm.view(shape) * w.view(shape) + b.view(shape)

    want = torch.autograd.grad(naive(x, layer.weight, layer.bias),
                               (x, layer.weight, layer.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    inputs = (x, layer.weight, layer.bias)
    assert torch.autograd.gradcheck(lambda x, w, b: _with(layer, w, b, x), inputs)
    assert torch.autograd.gradgradcheck(lambda x, w, b: _with(layer, w, b, x), inputs)


def _with(layer, weight, bias, x):
    """`layer(x)` with the given tensors as its weight and bias (gradcheck perturbs them)."""
    return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))


def test_lp_norm_inf_shares_the_gradient_among_tied_maxima_as_autograd_does():
    x = torch.tensor([[3.0, 1.0], [-3.0, 2.0], [1.0, -2.0], [0.5, 0.0]], dtype=torch.float64,
                     requires_grad=True)  # unit 0: |3| twice; unit 1: |2| twice
    layer = LpNorm(2, math.inf).double()
    g = torch.randn(4, 2, dtype=torch.float64)
    got = torch.autograd.grad(layer(x), x, g)[0]
    want = torch.autograd.grad(_lp_reference(x, layer.weight, layer.bias, math.inf, layer.eps,
                                             [0], (1, -1)), x, g)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_lp_norm_eval_uses_running_statistics():
    layer = LpNorm(2, 2, momentum=1.0)  # running stats = last batch
    x = torch.randn(32, 2) + 1
    train_out = layer(x)
    layer.eval()
    assert torch.allclose(layer(x), train_out, atol=1e-6)
    assert layer.num_batches_tracked.item() == 1
    assert not torch.allclose(layer(x[:4]), train_out[:4] * 0)


@pytest.mark.parametrize("kind", ["none", "batch", "noisy_batch", "noise", "l1", "l2", "linf",
                                  "layer", "group"])
def test_every_kind_builds_for_conv_and_linear(kind):
    for spatial, x in ((True, torch.randn(4, 12, 3, 3)), (False, torch.randn(4, 12))):
        layer = make_norm(kind, 12, spatial=spatial, groups=8)
        assert layer(x).shape == x.shape
    if kind == "group":
        assert make_norm(kind, 12, spatial=True, groups=8).num_groups == 6  # divisor of 12


def test_unknown_norm_names_the_choices():
    with pytest.raises(ValueError, match="norm must be one of none, batch"):
        make_norm("bn", 4, spatial=False)


def test_noise_follows_the_run_seed_unless_fixed():
    x = torch.randn(16, 4)

    def first_draw(run_seed, cfg=NoiseConfig()):
        torch.manual_seed(run_seed)
        layer = make_norm("noisy_batch", 4, spatial=False, noise=cfg)
        layer.train()
        return layer(x)

    assert torch.equal(first_draw(1), first_draw(1))
    assert not torch.equal(first_draw(1), first_draw(2))  # seeds of a sweep get their own noise
    fixed = NoiseConfig(seed=5)
    assert torch.equal(first_draw(1, fixed), first_draw(2, fixed))


def test_eval_noise_never_moves_the_training_noise():
    x = torch.randn(16, 4)
    with_eval, without = (make_norm("noisy_batch", 4, spatial=False,
                                    noise=NoiseConfig(seed=3, in_eval=True)) for _ in range(2))
    for layer in (with_eval, without):
        layer.train()
        layer(x)
        resample_noise(layer)
    with_eval.eval()
    a, b = with_eval(x), with_eval(x)
    assert not torch.equal(a, b)  # fresh noise at every evaluation, not the held training draw
    with_eval.train()
    assert torch.equal(with_eval(x), without(x))  # the training sequence is where it was


def test_noise_in_eval_is_seeded_by_the_evaluation_and_leaves_training_alone():
    x = torch.randn(16, 4)
    layer, twin = (make_norm("noisy_batch", 4, spatial=False, noise=NoiseConfig(seed=3))
                   for _ in range(2))
    for m in (layer, twin):
        m.train()
        m(x)
        resample_noise(m)
        m.eval()
    with noise_in_eval(layer, seed=7):
        a = layer(x)
    with noise_in_eval(layer, seed=7):
        again = layer(x)
    with noise_in_eval(layer, seed=8):
        other = layer(x)
    assert torch.equal(a, again) and not torch.equal(a, other)  # the seed decides, not a stream
    assert not torch.equal(a, layer[0](x))  # the noise is on ...
    assert torch.equal(layer(x), layer[0](x))  # ... only inside
    layer.train()
    twin.train()
    assert torch.equal(layer(x), twin(x))  # the training sequence is where it was


def test_lp_norm_traced_by_torch_compile_trains_as_eager():
    """LpNorm's autograd function updates the running averages inside its forward: through
    torch.compile's tracing (dynamo and AOT autograd, without generating code) the outputs,
    gradients and running averages of two training steps equal eager's."""
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    results = []
    for compiled in (False, True):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(6, 6), LpNorm(6, 1), nn.Linear(6, 3), LpNorm(3, math.inf))
        run = torch.compile(net, backend="aot_eager") if compiled else net
        outs = []
        for _ in range(2):
            out = run(x)
            out.square().sum().backward()
            outs.append(out.detach())
        results.append((outs, {k: v.clone() for k, v in net.state_dict().items()},
                        [p.grad.clone() for p in net.parameters()]))
    (eager_out, eager_state, eager_grads), (comp_out, comp_state, comp_grads) = results
    for a, b in zip(eager_out, comp_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(comp_state["1.num_batches_tracked"]) == 2
    for key in eager_state:
        torch.testing.assert_close(eager_state[key], comp_state[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_grads, comp_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
