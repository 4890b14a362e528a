"""Curvature (bnstudy/instruments/curvature.py): Lanczos and Hutchinson on quadratics with a known
Hessian, the warm start, the Curvature probe in fits (against the dense float64 twin, on the
step's batch or one fixed batch) and across resumes. The plain twin check runs in test_twins.py."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnstudy import probes
from bnstudy.instruments import BNGradientBound, Curvature, Instruments, Landscape, Step
from bnstudy.modules import DLNModule
from cases import (LIGHTNING_NOISE, SPECTRUM, TWINS, Recorder, quadratic, same_state,
                   trainer)

pytestmark = LIGHTNING_NOISE


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lanczos_over_several_tensors_and_many_steps_finds_the_known_top(dtype):
    """Lanczos keeps its basis as one matrix of flat vectors, grown as steps are taken (16 rows,
    then doubled): a 60-dimensional quadratic over three parameter tensors of other shapes, with
    clustered eigenvalues that need more than 16 steps, against numpy's eigh of the same H."""
    n, g = 60, torch.Generator().manual_seed(5)
    spectrum = torch.cat([torch.tensor([10.0, 9.9, 9.8]), torch.linspace(-1, 9, n - 3)])
    rotation = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    hess = (rotation @ torch.diag(spectrum.double()) @ rotation.T).to(dtype)

    class Pieces(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(4, 5, generator=g, dtype=torch.float64).to(dtype))
            self.b = nn.Parameter(torch.randn(30, generator=g, dtype=torch.float64).to(dtype))
            self.c = nn.Parameter(torch.randn(2, 5, 1, generator=g, dtype=torch.float64).to(dtype))

        def forward(self, x):
            return torch.cat([self.a.reshape(-1), self.b, self.c.reshape(-1)])

    model = Pieces()
    result = probes.hessian_eigs(model, lambda z, _: 0.5 * z @ hess @ z, torch.zeros(1),
                                 torch.zeros(1), k=3, tol=1e-6 if dtype == torch.float32
                                 else 1e-10, max_iter=n)
    assert result["hvps"] > 16  # the basis grew past its first allocation
    exact = np.linalg.eigh(hess.double().numpy())
    rel = 1e-5 if dtype == torch.float32 else 1e-10
    assert result["eigenvalues"] == pytest.approx(exact[0][::-1][:3].tolist(), rel=rel)
    top = result["vectors"][0]
    assert {k: tuple(v.shape) for k, v in top.items()} == {"a": (4, 5), "b": (30,),
                                                           "c": (2, 5, 1)}
    flat = torch.cat([top[k].reshape(-1) for k in ("a", "b", "c")]).double().numpy()
    assert abs(float(flat @ exact[1][:, -1])) == pytest.approx(1, rel=rel)


def test_lanczos_under_bf16_autocast_keeps_its_basis_in_float32():
    """Under bf16-mixed (the fast preset) the probes run inside autocast: the products are the
    loss's own, but the basis arithmetic (matrix products, which autocast would run in bf16)
    stays float32. A diagonal quadratic, whose products are elementwise (autocast leaves them
    alone), with clustered eigenvalues: found to 1e-5 (bf16 reorthogonalization: about 1e-3)."""
    n = 48
    diagonal = torch.cat([torch.tensor([5.0, 4.95, 4.9]), torch.linspace(-1, 4.8, n - 3)])

    class Point(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(2)))

        def forward(self, x):
            return self.w

    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = probes.hessian_eigs(Point(), lambda w, _: 0.5 * (diagonal * w * w).sum(),
                                     torch.zeros(1), torch.zeros(1), k=3, tol=1e-6, max_iter=n)
    assert result["hvps"] > 16
    assert result["eigenvalues"] == pytest.approx([5.0, 4.95, 4.9], rel=1e-5)
    assert result["vectors"][0]["w"].dtype == torch.float32


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


@pytest.mark.parametrize("cold_every", [0, 1])
def test_the_cold_check_catches_a_warm_start_on_the_second_eigenvalue(cold_every):
    """A warm start planted exactly on the second eigenvector: Lanczos stops at once on lambda_2
    (an invariant subspace, residual 0). Only the cold check sees that the top is 4, not 2.5."""
    model, loss_fn, x, y, hess, q = quadratic(SPECTRUM)
    probe = Curvature(cold_every=cold_every, tol=1e-10, max_iter=20)
    probe._vectors = [{"w": q[:, 1].clone()}]
    step = Step(index=5, net=model, loss_fn=loss_fn, inputs=x, targets=y, sync=False, lr=0.1)
    metrics = probe.before_optimizer_step(step)
    if not cold_every:  # unchecked, the planted warm start is reported as the top
        assert metrics["curv/lambda_max"] == pytest.approx(2.5, rel=1e-9)
        assert "curv/warm_gap" not in metrics
        return
    assert metrics["curv/cold_lambda_max"] == pytest.approx(4.0, rel=1e-9)
    assert metrics["curv/warm_gap"] == pytest.approx((4.0 - 2.5) / 4.0, rel=1e-6)
    assert metrics["curv/lambda_max"] == pytest.approx(4.0, rel=1e-9)
    # the next warm start starts from the top eigenvector, and the check's schedule is kept
    assert abs(float(probe._vectors[0]["w"] @ q[:, 0])) == pytest.approx(1, rel=1e-9)
    assert probe.state_dict()["warm_measurements"] == 1


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


def test_curvature_and_theorem_probes_in_a_fit_equal_the_dense_twin():
    """Curvature logs the top Hessian eigenvalue of the step's loss at W^t (the dense float64
    twin on the recorded model and batch), warm-started: later steps spend fewer products;
    BNGradientBound logs the plain probe's numbers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    data = DataLoader(TensorDataset(x, x @ torch.randn(3, 3, generator=g)), batch_size=64)
    curv = Curvature(every=1, tol=1e-6, trace_samples=64)
    inst = Instruments([curv, Landscape(every=1), BNGradientBound(every=1, layers=[2])])
    rec = Recorder()
    L.seed_everything(0, verbose=False)
    module = DLNModule(depth=4, dim=3, norm="batch", lr=1e-4)
    trainer(4, [rec, inst]).fit(module, data)
    assert [s for s, _ in inst.history] == [0, 1, 2, 3]
    for step, metrics in inst.history:
        r = rec.steps[step]
        hess, _ = probes.hessian_dense(r["net"], module.loss_fn, *r["batch"])
        dense = torch.linalg.eigvalsh(hess).flip(0)
        assert metrics["curv/lambda_max"] == pytest.approx(float(dense[0]), rel=1e-4)
        assert abs(metrics["curv/trace"] - float(hess.trace())) <= 3 * metrics["curv/trace_se"]
        assert metrics["curv/two_over_lr"] == pytest.approx(2 / 1e-4)
        assert metrics["landscape/beta_eff"] > 0
        bound = probes.bn_gradient_bound(r["net"], module.loss_fn, *r["batch"], layers=[2])
        assert metrics["thm41/ratio_rederived/layer02"] == pytest.approx(
            bound["layers.2"]["ratio_rederived"], rel=1e-6)
    hvps = [m["curv/hvps"] for _, m in inst.history]
    assert max(hvps[1:]) < hvps[0]  # warm start
    assert curv._vectors is None  # dropped at teardown


def test_curvature_on_a_fixed_batch_measures_the_first_batch_at_every_step():
    """fixed_batch=True: lambda_max (and the trace) at W^t on the first measured step's batch,
    not the step's own batch (the dense float64 twin of each; the two differ at later steps),
    and the run trains bit for bit as without it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, generator=g)
    data = DataLoader(TensorDataset(x, x @ torch.randn(3, 3, generator=g)), batch_size=32)
    inst = Instruments([Curvature(every=1, tol=1e-6, trace_samples=64, fixed_batch=True)])
    rec = Recorder()
    runs = []
    for callbacks in ([rec, inst], []):
        L.seed_everything(0, verbose=False)
        module = DLNModule(depth=4, dim=3, norm="batch", lr=1e-3)
        trainer(4, callbacks).fit(module, data)
        runs.append(module.state_dict())
    assert same_state(runs[0], runs[1])
    assert [s for s, _ in inst.history] == [0, 1, 2, 3]
    first = rec.steps[0]["batch"]
    for step, metrics in inst.history:
        r = rec.steps[step]
        hess, _ = probes.hessian_dense(r["net"], module.loss_fn, *first)
        assert metrics["curv/lambda_max"] == pytest.approx(
            float(torch.linalg.eigvalsh(hess)[-1]), rel=1e-4)
        assert abs(metrics["curv/trace"] - float(hess.trace())) <= 3 * metrics["curv/trace_se"]
        if step in (1, 2):  # the epoch's second and third batches: another loss
            own, _ = probes.hessian_dense(r["net"], module.loss_fn, *r["batch"])
            assert metrics["curv/lambda_max"] != pytest.approx(
                float(torch.linalg.eigvalsh(own)[-1]), rel=1e-2)


def whole_and_resumed(base: list[str], steps: int, stop: int) -> tuple[dict, dict]:
    """{step: (curv/lambda_max, curv/hvps)} of a CLI fit of `steps` steps in run_dir "whole" and
    of one stopped at `stop` and resumed from its checkpoint in run_dir "parts"."""
    from bnstudy.cli import cli_main
    from tiny_fits import read_metrics

    cli_main(["fit", *base, f"--trainer.max_steps={steps}", "--run_dir=whole"])
    cli_main(["fit", *base, f"--trainer.max_steps={stop}", "--run_dir=parts"])
    cli_main(["fit", *base, f"--trainer.max_steps={steps}", "--run_dir=parts",
              "--ckpt_path=parts/checkpoints/last.ckpt"])
    return tuple({int(r["step"]): (r["curv/lambda_max"], r["curv/hvps"])
                  for r in read_metrics(Path(run_dir)) if r.get("curv/lambda_max")}
                 for run_dir in ("whole", "parts"))


@pytest.mark.slow
def test_a_resumed_run_measures_lambda_max_as_one_never_stopped(in_tmp, monkeypatch):
    """The warm start travels in the checkpoint: after a resume, curv/lambda_max and the products
    it took are those of the uninterrupted run, to the bit (a cold start costs more products and
    lands elsewhere within the tolerance)."""
    from tiny_fits import last, read_metrics, tiny_args

    monkeypatch.setenv("WANDB_MODE", "disabled")
    whole, parts = whole_and_resumed([*tiny_args("dln_bn.yaml"), "--data.steps_per_epoch=20"],
                                     steps=20, stop=10)
    assert sorted(whole) == [0, 1, 2, 4, 8, 16] and sorted(parts) == sorted(whole)
    assert parts[16] == whole[16]  # measured after the resume, warm-started from step 8's vector
    assert parts == whole
    assert last(read_metrics(in_tmp / "whole"), "train/loss") == last(
        read_metrics(in_tmp / "parts"), "train/loss")


@pytest.mark.slow
def test_a_resumed_run_keeps_the_fixed_batch(in_tmp, monkeypatch):
    """Curvature(fixed_batch=True) on minibatches: the first step's batch travels in the
    checkpoint, so the measurement after a resume is on that batch and equals the uninterrupted
    run's to the bit (a resume that took its first batch instead would measure another loss)."""
    from tiny_fits import tiny_args

    monkeypatch.setenv("WANDB_MODE", "disabled")
    (in_tmp / "curv.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: bnstudy.instruments.Instruments\n"
        "      init_args:\n        probes:\n"
        "          - class_path: bnstudy.instruments.Curvature\n"
        "            init_args: {fixed_batch: true, every: 3, log_spaced: false}\n")
    whole, parts = whole_and_resumed([*tiny_args("quickstart.yaml"), "--config=curv.yaml"],
                                     steps=8, stop=4)
    assert sorted(whole) == [0, 3, 6] and parts == whole
