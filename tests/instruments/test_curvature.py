"""Curvature probes (Hessian eigenvalues, Hutchinson trace) against the dense float64 Hessian and
exact oracles; Theorem 4.1's two sides against a closed form; the measurement invariance."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnstudy import probes
from bnstudy.models import DeepLinear, init_weights
from test_probes import assert_same, snapshot, trained_step


def mlp_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    return model, F.cross_entropy, torch.randn(32, 5), torch.randint(0, 3, (32,))


def conv_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 3))
    return model, F.cross_entropy, torch.randn(16, 2, 4, 4), torch.randint(0, 3, (16,))


def small_dln(norm: str):
    def make():
        torch.manual_seed(0)
        model = DeepLinear(4, 3, norm)
        init_weights(model)
        x = torch.randn(64, 3)
        return model, lambda o, t: F.mse_loss(o, t, reduction="sum"), x, x @ torch.randn(3, 3)
    return make


TWINS = {"mlp_bn": mlp_bn, "conv_bn": conv_bn, "dln": small_dln("none"),
         "dln_bn": small_dln("batch")}


@pytest.mark.parametrize("case", list(TWINS))
def test_top_eigenvalues_and_trace_equal_the_dense_twin(case):
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


def quadratic(spectrum, diagonal: bool = False):
    """loss(w) = 1/2 w^T H w in float64 with the given eigenvalues (a random rotation unless
    `diagonal`): the Hessian is H everywhere."""
    n = len(spectrum)
    g = torch.Generator().manual_seed(3)
    q = torch.eye(n, dtype=torch.float64) if diagonal else torch.linalg.qr(
        torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    hess = q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T

    class Point(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

        def forward(self, x):
            return self.w

    return Point(), lambda w, _: 0.5 * w @ hess @ w, torch.zeros(1), torch.zeros(1), hess, q


SPECTRUM = [4.0, 2.5, 2.0, 1.0, 0.5, 0.1, -6.0]


def test_quadratic_oracle_is_exact():
    model, loss_fn, x, y, hess, q = quadratic(SPECTRUM)
    result = probes.hessian_eigs(model, loss_fn, x, y, k=3, tol=1e-12)
    # largest algebraic, not largest magnitude: -6 is not among them
    assert result["eigenvalues"] == pytest.approx([4.0, 2.5, 2.0], rel=1e-12)
    assert result["hvps"] <= len(SPECTRUM)  # Lanczos is exact after n products
    top = result["vectors"][0]["w"]
    assert abs(float(top @ q[:, 0])) == pytest.approx(1, rel=1e-12)
    # PyHessian's power iteration finds the largest |eigenvalue|
    power = probes.hessian_eigs(model, loss_fn, x, y, method="power", tol=1e-12, max_iter=2000)
    assert power["eigenvalues"][0] == pytest.approx(-6.0, rel=1e-8)
    # Hutchinson with Rademacher vectors is exact on a diagonal Hessian
    model, loss_fn, x, y, hess, _ = quadratic(SPECTRUM, diagonal=True)
    trace = probes.hessian_trace(model, loss_fn, x, y, samples=4)
    assert trace["trace"] == pytest.approx(sum(SPECTRUM), rel=1e-14) and trace["se"] == 0


def test_warm_start_converges_in_fewer_products():
    model, loss_fn, x, y = TWINS["mlp_bn"]()
    cold = probes.hessian_eigs(model, loss_fn, x, y, tol=1e-4)
    warm = probes.hessian_eigs(model, loss_fn, x, y, tol=1e-4, init=cold["vectors"])
    assert warm["hvps"] <= 2 < cold["hvps"]
    assert warm["eigenvalues"][0] == pytest.approx(cold["eigenvalues"][0], rel=1e-5)
    # a moved model: the old vector still starts close
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    moved = probes.hessian_eigs(model, loss_fn, x, y, tol=1e-4, init=cold["vectors"])
    moved_cold = probes.hessian_eigs(model, loss_fn, x, y, tol=1e-4)
    assert moved["hvps"] < moved_cold["hvps"]
    assert moved["eigenvalues"][0] == pytest.approx(moved_cold["eigenvalues"][0], rel=1e-4)


def test_bad_arguments_say_what_is_wrong():
    model, loss_fn, x, y = TWINS["mlp_bn"]()
    with pytest.raises(ValueError, match="k must be >= 1"):
        probes.hessian_eigs(model, loss_fn, x, y, k=0)
    with pytest.raises(ValueError, match="use k=1"):
        probes.hessian_eigs(model, loss_fn, x, y, k=2, method="power")
    with pytest.raises(ValueError, match="samples must be >= 2"):
        probes.hessian_trace(model, loss_fn, x, y, samples=1)
    with pytest.raises(ValueError, match="no BatchNorm follows"):
        probes.bn_gradient_bound(model, loss_fn, x, y, layers=[2])


def test_curvature_probes_leave_all_state_bit_for_bit():
    model, loss_fn, x, y, after, _ = trained_step("vgg_noisy_bn")
    model.train()
    loss_fn(model(x), y).backward()  # .grad populated, noise drawn and held
    before = snapshot(model)
    probes.hessian_eigs(model, loss_fn, x, y, k=2, max_iter=5)
    probes.hessian_trace(model, loss_fn, x, y, samples=2)
    probes.bn_gradient_bound(model, loss_fn, x, y, layers=[1, 2])
    assert_same(before, snapshot(model))


# ---- Theorem 4.1 -------------------------------------------------------------------------------
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


def whole_and_resumed(base: list[str], steps: int, stop: int) -> tuple[dict, dict]:
    """{step: (curv/lambda_max, curv/hvps)} of a CLI fit of `steps` steps in run_dir "whole" and
    of one stopped at `stop` and resumed from its checkpoint in run_dir "parts"."""
    from bnstudy.cli import cli_main
    from test_cli import read_metrics

    cli_main(["fit", *base, f"--trainer.max_steps={steps}", "--run_dir=whole"])
    cli_main(["fit", *base, f"--trainer.max_steps={stop}", "--run_dir=parts"])
    cli_main(["fit", *base, f"--trainer.max_steps={steps}", "--run_dir=parts",
              "--ckpt_path=parts/checkpoints/last.ckpt"])
    return tuple({int(r["step"]): (r["curv/lambda_max"], r["curv/hvps"])
                  for r in read_metrics(Path(run_dir)) if r.get("curv/lambda_max")}
                 for run_dir in ("whole", "parts"))


def test_a_resumed_run_measures_lambda_max_as_one_never_stopped(in_tmp, monkeypatch):
    """The warm start travels in the checkpoint: after a resume, curv/lambda_max and the products
    it took are those of the uninterrupted run, to the bit (a cold start costs more products and
    lands elsewhere within the tolerance)."""
    from test_cli import last, read_metrics, tiny_args

    monkeypatch.setenv("WANDB_MODE", "disabled")
    whole, parts = whole_and_resumed([*tiny_args("dln_bn.yaml"), "--data.steps_per_epoch=20"],
                                     steps=20, stop=10)
    assert sorted(whole) == [0, 1, 2, 4, 8, 16] and sorted(parts) == sorted(whole)
    assert parts[16] == whole[16]  # measured after the resume, warm-started from step 8's vector
    assert parts == whole
    assert last(read_metrics(in_tmp / "whole"), "train/loss") == last(
        read_metrics(in_tmp / "parts"), "train/loss")


def test_a_resumed_run_keeps_the_fixed_batch(in_tmp, monkeypatch):
    """Curvature(fixed_batch=True) on minibatches: the first step's batch travels in the
    checkpoint, so the measurement after a resume is on that batch and equals the uninterrupted
    run's to the bit (a resume that took its first batch instead would measure another loss)."""
    from test_cli import tiny_args

    monkeypatch.setenv("WANDB_MODE", "disabled")
    (in_tmp / "curv.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: bnstudy.instruments.Instruments\n"
        "      init_args:\n        probes:\n"
        "          - class_path: bnstudy.instruments.Curvature\n"
        "            init_args: {fixed_batch: true, every: 3, log_spaced: false}\n")
    whole, parts = whole_and_resumed([*tiny_args("quickstart.yaml"), "--config=curv.yaml"],
                                     steps=8, stop=4)
    assert sorted(whole) == [0, 3, 6] and parts == whole
