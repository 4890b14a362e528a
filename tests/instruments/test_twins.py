"""Each quantity against its brute-force twin, on each model case, through one harness (Cockpit's
way): the fast measurement and the definition written out naively agree."""
from __future__ import annotations

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


# quantity: (its check against the twin, the model cases it runs on). The dense Hessian of the
# curvature twin is affordable on the tiny TWINS models only.
HARNESS = {
    "ics": (ics_twin, list(CASES)),
    "landscape": (landscape_twin, list(CASES)),
    "random_landscape": (random_landscape_twin, ["vgg_noisy_bn", "dln"]),
    "curvature": (curvature_twin, list(TWINS)),
}


@pytest.mark.parametrize("quantity, case", [(q, c) for q, (_, cases) in HARNESS.items()
                                            for c in cases])
def test_quantity_equals_its_twin(quantity, case):
    check, _ = HARNESS[quantity]
    check(case)
