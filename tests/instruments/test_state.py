"""Leaving the model as found (bnstudy/instruments/state.py): every measurement puts back
parameters, .grad, buffers, the noisy-BN state, train/eval flags and the RNGs bit for bit, and
measures the loss the optimizer sees (train mode, the step's held noise), also under autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnstudy import probes
from bnstudy.norms import resample_noise
from cases import (CASES, assert_ics_close, assert_same, run_every_probe, snapshot,
                   trained_step)


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


def test_curvature_probes_leave_all_state_bit_for_bit():
    model, loss_fn, x, y, after, _ = trained_step("vgg_noisy_bn")
    model.train()
    loss_fn(model(x), y).backward()  # .grad populated, noise drawn and held
    before = snapshot(model)
    probes.hessian_eigs(model, loss_fn, x, y, k=2, max_iter=5)
    probes.hessian_trace(model, loss_fn, x, y, samples=2)
    probes.bn_gradient_bound(model, loss_fn, x, y, layers=[1, 2])
    assert_same(before, snapshot(model))
