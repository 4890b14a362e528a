"""Loss surfaces (bnstudy/instruments/surface.py): filter normalization as defined, a quadratic's
closed form, split grids merged equal the unsplit one exactly (parts and DDP ranks, where the
density's products are averaged too), 1-D interpolation, PCA directions of a planar trajectory.
The twin (a deep copy per point) runs in test_twins.py, the state check in test_state.py; the
surface command in tests/analysis/test_landscape_commands.py."""
from __future__ import annotations

import copy
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from bnstudy.instruments import (filter_normalized_direction, hessian_density, interpolate,
                                 loss_surface, merge_surfaces, pca_directions, project)
from bnstudy.models import VGG, init_weights
from cases import conv_bn, quadratic, spawned, trained_step


def test_filter_normalization_scales_each_filter_to_the_weights_filter():
    model, _, _, _ = conv_bn()
    state = torch.get_rng_state()
    d = filter_normalized_direction(model, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # a private generator
    params = dict(model.named_parameters())
    assert list(d) == list(params)
    for name, w in params.items():
        if w.dim() > 1:  # conv filters (out, in, h, w) and linear rows (out, in)
            assert torch.allclose(d[name].reshape(len(w), -1).norm(dim=1),
                                  w.detach().reshape(len(w), -1).norm(dim=1), rtol=1e-5)
            assert not torch.allclose(d[name], w.detach())  # random, not the weights
        else:  # biases, BN gamma and beta
            assert torch.equal(d[name], torch.zeros_like(w))
    keep = filter_normalized_direction(model, seed=3, bias_bn="keep")
    assert torch.equal(keep["1.weight"], params["1.weight"].detach())
    assert torch.equal(keep["0.weight"], d["0.weight"])  # the same draws
    layer = filter_normalized_direction(model, seed=3, norm="layer")
    assert float(layer["7.weight"].norm()) == pytest.approx(
        float(params["7.weight"].detach().norm()), rel=1e-5)
    with pytest.raises(ValueError, match="norm must be one of filter, layer, none"):
        filter_normalized_direction(model, norm="unit")


def test_quadratic_oracle_along_eigenvectors():
    """L = 1/2 w^T H w along unit eigenvectors q1, q2: L(w + a q1 + b q2) =
    L(w) + a q1.Hw + b q2.Hw + 1/2 (lambda1 a^2 + lambda2 b^2), to rounding."""
    model, loss_fn, x, y, hess, q = quadratic([4.0, 2.5, 2.0, 1.0, -1.0])
    w = model.w.detach().clone()
    d = [{"w": q[:, 0].clone()}, {"w": q[:, 4].clone()}]
    coords = [np.linspace(-2, 2, 7), np.linspace(-1, 1, 5)]
    result = loss_surface(model, loss_fn, x, y, d, coords)
    a, b = np.meshgrid(*coords, indexing="ij")
    hw = (hess @ w).numpy()
    exact = (0.5 * float(w @ hess @ w) + a * float(q[:, 0] @ hw) + b * float(q[:, 4] @ hw)
             + 0.5 * (4.0 * a ** 2 - 1.0 * b ** 2))
    np.testing.assert_allclose(result["loss"], exact, rtol=1e-12, atol=1e-12)


def test_split_grids_merge_into_the_unsplit_one_exactly():
    model, loss_fn, x, y = conv_bn()
    whole = loss_surface(model, loss_fn, x, y, grid=7, seed=5)
    parts = [loss_surface(model, loss_fn, x, y, grid=7, seed=5, part=(i, 3)) for i in range(3)]
    assert [p["evaluations"] for p in parts] == [17, 16, 16]
    assert np.isnan(parts[0]["loss"][~parts[0]["done"]]).all()
    merged = merge_surfaces(parts[::-1])
    assert np.array_equal(merged["loss"], whole["loss"])  # bit for bit
    assert merged["evaluations"] == 49 and merged["part"] == (0, 1)
    with pytest.raises(ValueError, match="1 of 49 points missing|points missing"):
        merge_surfaces(parts[:2])
    with pytest.raises(ValueError, match="computes points another part computed"):
        merge_surfaces([parts[0], parts[0]])
    other = loss_surface(model, loss_fn, x, y, grid=7, span=2.0, seed=5, part=(1, 3))
    with pytest.raises(ValueError, match="parts of different grids"):
        merge_surfaces([parts[0], other, parts[2]])
    with pytest.raises(ValueError, match="part must be"):
        loss_surface(model, loss_fn, x, y, part=(3, 3))


def test_progress_is_called_once_per_point_and_product():
    model, loss_fn, x, y = conv_bn()
    points, products = [], []
    loss_surface(model, loss_fn, x, y, grid=3, part=(1, 2), progress=points.append)
    result = hessian_density(model, loss_fn, x, y, n_v=2, m=3, params=[1, 2],
                             progress=products.append)
    assert points == [1] * 4
    assert products == [1] * result["hvps"] and result["hvps"] == 6


def test_interpolation_ends_at_both_checkpoints():
    model, loss_fn, x, y, after, _ = trained_step("vgg_bn")
    line = interpolate(model, loss_fn, x, y, after, alphas=[0.0, 0.5, 1.0])
    assert line["loss"].shape == (3,)
    moved = copy.deepcopy(model).train()
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.copy_(after[n])
        start = float(loss_fn(copy.deepcopy(model).train()(x), y))
        end = float(loss_fn(moved(x), y))
    assert line["loss"][0] == pytest.approx(start, rel=1e-6)
    assert line["loss"][2] == pytest.approx(end, rel=1e-5)


def test_pca_directions_recover_a_planar_trajectory():
    """Points W + t1 u + t2 v: the top two principal directions span (u, v), the projections
    give back (t1, t2) exactly, and the explained variance is all in two components."""
    torch.manual_seed(0)
    center = {"a.weight": torch.randn(4, 3, dtype=torch.float64),
              "a.bias": torch.randn(4, dtype=torch.float64)}
    u = {"a.weight": torch.randn(4, 3, dtype=torch.float64), "a.bias": torch.zeros(4)}
    v = {"a.weight": torch.randn(4, 3, dtype=torch.float64), "a.bias": torch.zeros(4)}
    ts = np.array([[0, 0], [1, 0.5], [2, -1], [3, 2], [0.5, 3]], dtype=float)
    points = [{n: center[n] + t1 * u[n] + t2 * v[n] for n in center} for t1, t2 in ts]
    directions, ratios = pca_directions(points, center)
    assert ratios.sum() == pytest.approx(1, abs=1e-12)
    assert torch.equal(directions[0]["a.bias"], torch.zeros(4))  # 1-D parameters left out
    coords = project(points, center, directions)
    back = project(points, center, [u, v])
    np.testing.assert_allclose(back, ts, atol=1e-10)
    # the PCA coordinates are a rotation of (t1, t2) about their mean: same distances
    dist_pca = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    true = np.array([torch.cat([(p[n] - center[n]).reshape(-1) for n in center]).numpy()
                     for p in points])
    np.testing.assert_allclose(dist_pca, np.linalg.norm(true[:, None] - true[None], axis=-1),
                               rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="at least 3 points"):
        pca_directions(points[:2], center)


# ---- DDP: the grid split over ranks; the density's products averaged ------------------------
WORLD = 2


def ddp_problem():
    torch.manual_seed(0)
    model = VGG(11, 0.0625, "none", image_size=8)
    init_weights(model)
    return model, F.cross_entropy, torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    model, loss_fn, x, y = ddp_problem()
    shard = slice(rank * 8, (rank + 1) * 8)
    out = {"split": loss_surface(model, loss_fn, x, y, grid=5, distribute=True),
           "averaged": loss_surface(model, loss_fn, x[shard], y[shard], grid=3),
           "density": hessian_density(model, loss_fn, x[shard], y[shard], n_v=2, m=5)}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch and Lightning: 10-50 s here
@pytest.mark.timeout(150)
def test_ddp_ranks_split_the_grid_and_average_the_products(tmp_path):
    ranks = spawned(ddp_worker, tmp_path, WORLD, deadline_s=120)
    model, loss_fn, x, y = ddp_problem()
    whole = loss_surface(model, loss_fn, x, y, grid=5)
    for r in ranks:  # every rank has the whole grid, equal to one process's bit for bit
        assert r["split"]["evaluations"] in (12, 13) and r["split"]["done"].all()
        assert np.array_equal(r["split"]["loss"], whole["loss"])
    # data parallel: the mean of the ranks' mean losses is the global batch's (no BN)
    np.testing.assert_allclose(ranks[0]["averaged"]["loss"],
                               loss_surface(model, loss_fn, x, y, grid=3)["loss"], rtol=1e-5)
    single = hessian_density(model, loss_fn, x, y, n_v=2, m=5)
    for key in ("moments", "density"):
        np.testing.assert_array_equal(ranks[0]["density"][key], ranks[1]["density"][key])
        np.testing.assert_allclose(ranks[0]["density"][key], single[key], rtol=1e-3)
    assert ranks[0]["density"]["lambda_max"] == pytest.approx(single["lambda_max"], rel=1e-4)
