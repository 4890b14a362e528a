"""The whole Hessian spectrum: its eigenvalue density by stochastic Lanczos quadrature (SLQ),
measured on the loss the optimizer sees (`hessian_density`), its twin from the dense float64
Hessian (`hessian_density_dense`), and the `Spectrum` instrument that logs it in training.

Definition. For the Hessian H (n x n) of the loss over the chosen parameters, at the model's
parameters on the batch, in train mode (batch statistics), the spectral density is
phi(t) = (1/n) sum_i delta(t - lambda_i), and its smoothed version phi_sigma = phi * N(0, sigma^2).
SLQ (Lin, Saad and Yang 2016; Ghorbani, Krishnan and Xiao 2019; PyHessian's `density`) estimates
it from `n_v` Rademacher vectors v (|v|^2 = n): m Lanczos steps from v / |v| give a tridiagonal
T_m whose eigenvalues theta_j (Ritz nodes) with weights tau_j = (first component of the j-th
eigenvector)^2 are the m-point Gauss quadrature of the spectral measure seen from v:
sum_j tau_j f(theta_j) ~ v^T f(H) v / n, exact for polynomials f of degree <= 2m - 1. Averaged
over the vectors it is unbiased for tr f(H) / n (Hutchinson), so

  moments      sum_j tau_j theta_j^k, averaged over vectors: tr(H^k) / n, exact in the
               quadrature for m >= (k + 1) / 2, with the standard error of the mean over vectors
  density      sum_j tau_j N(t; theta_j, sigma^2), averaged over vectors, on a grid, with the
               pointwise standard error over vectors
  trace        n x the first moment (Hutchinson's estimate, with its standard error)
  lambda_max   the largest Ritz node (Lanczos finds the extremes first), lambda_min the smallest
  neg_mass     the quadrature mass of the nodes below -neg_tol x max |theta|: the fraction of
               eigenvalues that are negative (mass at zero is not counted)

Each vector's run stops early when the Krylov space is exhausted (an invariant subspace: the
quadrature is then exact) and, with `tol`, when its smoothed density moved by less than `tol`
(L1) over the last `check` steps. Lanczos keeps every basis vector and
reorthogonalizes twice against all of them (m vectors the size of the parameters in memory).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from bnstudy.instruments.curvature import hessian_dense
from bnstudy.instruments.distributed import sync_default
from bnstudy.instruments.hvp import HVP, FlatLanczos
from bnstudy.instruments.probe import Probe, Step
from bnstudy.instruments.state import measuring
from bnstudy.instruments.trace import LossFn, Params, parameter_names
from bnstudy.instruments.vectors import random_vector

MOMENTS = 4  # tr(H^k) / n for k = 1..MOMENTS


def smoothed_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float
                     ) -> np.ndarray:
    """sum_j weights_j N(grid; nodes_j, sigma^2) for each row of (nodes, weights): (rows, grid).
    NaN nodes (a run that stopped early) carry no weight."""
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    ok = np.isfinite(nodes)
    z = (grid[None, None, :] - np.where(ok, nodes, 0.0)[:, :, None]) / sigma
    kernel = np.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
    return np.einsum("rj,rjg->rg", np.where(ok, weights, 0.0), kernel)


def default_grid(nodes: np.ndarray, width: float, points: int) -> tuple[np.ndarray, float]:
    """A grid over [min node - 4 sigma, max node + 4 sigma] and sigma = width x the node range
    (an absolute floor keeps it positive for a spectrum of one point)."""
    lo, hi = float(np.nanmin(nodes)), float(np.nanmax(nodes))
    sigma = width * max(hi - lo, 1e-12 * max(1.0, abs(hi), abs(lo)))
    return np.linspace(lo - 4 * sigma, hi + 4 * sigma, points), sigma


def quadrature(alphas: list[float] | np.ndarray, betas: list[float] | np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Ritz nodes and Gauss quadrature weights of the Lanczos matrix tridiag(betas, alphas,
    betas) (len(betas) = len(alphas) - 1)."""
    alphas, betas = np.asarray(alphas, dtype=float), np.asarray(betas, dtype=float)
    if not (np.isfinite(alphas).all() and np.isfinite(betas).all()):  # a diverged model
        return np.full(len(alphas), np.nan), np.full(len(alphas), np.nan)
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    theta, s = np.linalg.eigh(t)
    return theta, s[0] ** 2


def lanczos_tridiagonal(hvp: Callable[[list[Tensor]], list[Tensor]], start: list[Tensor],
                        m: int, stop: Callable[[list[float], list[float]], bool] | None = None
                        ) -> tuple[list[float], list[float], bool]:
    """Up to m steps of Lanczos from start / |start| (full reorthogonalization, twice): the
    coefficients alphas (m) and betas (m - 1) of the Lanczos matrix, and whether the Krylov
    space was exhausted (an invariant subspace: the quadrature is then exact). Ends earlier when
    `stop(alphas, betas)` says so (asked after every step).

    The basis is kept as flat vectors in blocks (FlatLanczos, as hessian_eigs' Lanczos), so
    reorthogonalizing is matrix-vector products; hvp sees views of a flat vector."""
    n = sum(t.numel() for t in start)
    solver = FlatLanczos(hvp, start, min(m, n))
    q = solver.flat(start)
    q = q / float(q.double().norm())
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0  # the largest |alpha| or beta seen: the breakdown test is relative to it
    for j in range(solver.steps):
        alpha, w = solver.step(q, betas[-1] if betas else 0.0)
        alphas.append(alpha)
        beta = float(w.double().norm())
        scale = max(scale, abs(alpha), beta)
        if not math.isfinite(beta):  # a diverged model: nothing more to learn
            return alphas, betas, False
        if j + 1 == n or beta <= 1e-7 * scale:
            return alphas, betas, True
        if j + 1 == solver.steps or (stop is not None and stop(alphas, betas)):
            break
        betas.append(beta)
        q = w / beta
    return alphas, betas, False


def _l1(a: np.ndarray, b: np.ndarray, grid: np.ndarray) -> float:
    return float(np.abs(a - b).sum() * (grid[1] - grid[0]))


def hessian_density(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    n_v: int = 10,
    m: int = 40,
    *,
    params: Params = None,
    width: float = 0.01,
    sigma: float | None = None,
    grid: int | np.ndarray = 512,
    tol: float | None = None,
    check: int = 5,
    neg_tol: float = 1e-4,
    seed: int = 0,
    sync: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature (module docstring): `n_v`
    Rademacher vectors, up to `m` Lanczos steps each, over all trainable parameters or the block
    `params` selects (layer numbers, parameter names, module paths: parameter_names), in
    train mode on this batch, the model left bit for bit as found, every product averaged over
    DDP processes (`sync`, as hessian_eigs).

    The density is smoothed with a Gaussian of std `sigma`, by default `width` x the range of
    the Ritz nodes, on `grid` (a number of points over the nodes' range +- 4 sigma, or the points
    themselves). `tol`: stop a vector's run once its smoothed density moved by less than `tol`
    in L1 over the last `check` steps (None: always m steps). `progress(k)` is called after
    every product (k = 1).

    Returns nodes and weights (n_v x steps; runs that ended early padded with NaN nodes and 0
    weights), steps (per vector), grid, sigma, density and density_se (its pointwise standard
    error over vectors), moments and moments_se (tr(H^k) / n, k = 1..4), trace and trace_se,
    lambda_max, lambda_min, neg_mass and neg_mass_se, n (the dimension), n_v, hvps and names
    (the parameters)."""
    if n_v < 1:
        raise ValueError(f"n_v must be >= 1; got {n_v}")
    if m < 1:
        raise ValueError(f"m must be >= 1; got {m}")
    if width <= 0 and sigma is None:
        raise ValueError(f"width must be > 0; got {width}")
    if sigma is not None and sigma <= 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    sync = sync_default(sync)
    gen = torch.Generator().manual_seed(seed)
    names = parameter_names(model, inputs, params)

    def converged(alphas: list[float], betas: list[float]) -> bool:
        if len(alphas) <= check:
            return False
        points, s = default_grid(quadrature(alphas, betas)[0], width, 256)
        return _change(alphas, betas, check, points, s) < tol

    runs = []
    with measuring(model) as state:
        chosen = [state.params[n] for n in names]
        hvp = HVP(model, loss_fn, inputs, targets, chosen, sync)

        def product(v: list[Tensor]) -> list[Tensor]:
            out = hvp(v)
            if progress is not None:
                progress(1)
            return out

        for _ in range(n_v):
            start = random_vector(chosen, gen, rademacher=True)
            runs.append(lanczos_tridiagonal(product, start, m, converged if tol else None))
        del hvp.grads  # free the double-backward graph before leaving
    return summarize(runs, sum(p.numel() for p in chosen), width=width, sigma=sigma, grid=grid,
                     neg_tol=neg_tol, check=check) | {"hvps": hvp.count, "names": names}


def _change(alphas, betas, check: int, grid: np.ndarray, sigma: float) -> float:
    """L1 distance between the smoothed quadratures of the last step and `check` steps before."""
    j = len(alphas)
    now = smoothed_density(*quadrature(alphas, betas[:j - 1]), grid, sigma)[0]
    before = smoothed_density(*quadrature(alphas[:j - check], betas[:j - check - 1]), grid,
                              sigma)[0]
    return _l1(now, before, grid)


def summarize(runs: list[tuple[list[float], list[float], bool]], n: int, *, width: float = 0.01,
              sigma: float | None = None, grid: int | np.ndarray = 512, neg_tol: float = 1e-4,
              check: int = 5) -> dict:
    """The estimates of hessian_density from each vector's Lanczos coefficients (alphas, betas,
    exhausted). quadrature_l1: the largest L1 change of a vector's smoothed quadrature over its
    last `check` steps (0 for an exhausted Krylov space, where it is exact): how far m is from
    enough at this smoothing."""
    quads = [quadrature(a, b) for a, b, _ in runs]
    steps = [len(a) for a, _, _ in runs]
    nodes = np.full((len(runs), max(steps)), np.nan)
    weights = np.zeros_like(nodes)
    for i, (t, w) in enumerate(quads):
        nodes[i, :len(t)], weights[i, :len(w)] = t, w
    if not np.isfinite(nodes).all(axis=1).any():  # a diverged model: every estimate NaN
        nodes[:] = np.nan
        weights = np.full_like(nodes, np.nan)
        nan = float("nan")
        points = np.full(grid if isinstance(grid, (int, np.integer)) else len(grid), nan)
        return {"nodes": nodes, "weights": weights, "steps": steps, "grid": points,
                "sigma": nan, "density": points, "density_se": points, "quadrature_l1": nan,
                "moments": np.full(MOMENTS, nan), "moments_se": np.full(MOMENTS, nan),
                **dict.fromkeys(("trace", "trace_se", "lambda_max", "lambda_min", "neg_mass",
                                 "neg_mass_se"), nan), "n": n, "n_v": len(runs)}
    if isinstance(grid, (int, np.integer)):
        grid, s = default_grid(nodes, width, int(grid))
    else:
        grid, s = np.asarray(grid, dtype=float), default_grid(nodes, width, 2)[1]
    s = s if sigma is None else float(sigma)
    per_vector = smoothed_density(nodes, weights, grid, s)
    powers = np.where(np.isfinite(nodes), nodes, 0.0)[:, :, None] ** np.arange(1, MOMENTS + 1)
    moments = np.einsum("rj,rjk->rk", weights, powers)
    top = float(np.nanmax(np.abs(nodes)))
    negative = (weights * (np.nan_to_num(nodes, nan=0.0) < -neg_tol * top)).sum(1)
    change = max([_change(a, b, check, grid, s) for a, b, exact in runs
                  if not exact and len(a) > check] or [0.0])

    def mean_se(values: np.ndarray):
        se = values.std(0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else \
            np.full(values.shape[1:], np.nan)
        return values.mean(0), se

    density, density_se = mean_se(per_vector)
    moment, moment_se = mean_se(moments)
    neg, neg_se = mean_se(negative[:, None])
    return {"nodes": nodes, "weights": weights, "steps": steps, "grid": grid, "sigma": s,
            "density": density, "density_se": density_se, "quadrature_l1": change,
            "moments": moment, "moments_se": moment_se, "trace": float(n * moment[0]),
            "trace_se": float(n * moment_se[0]), "lambda_max": float(np.nanmax(nodes)),
            "lambda_min": float(np.nanmin(nodes)), "neg_mass": float(neg[0]),
            "neg_mass_se": float(neg_se[0]), "n": n, "n_v": len(runs)}


def hessian_density_dense(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                          grid: np.ndarray, sigma: float, *, params: Params = None,
                          neg_tol: float = 1e-4) -> dict:
    """The twin of hessian_density for small models, from the definition: the eigenvalues of the
    dense float64 Hessian (`hessian_dense`, over the block `params` selects), their moments
    tr(H^k) / n (k = 1..4), their histogram smoothed with N(0, sigma^2) on `grid` (pass the
    estimate's grid and sigma to compare the two), trace, lambda_max, lambda_min and neg_mass."""
    hess, _ = hessian_dense(model, loss_fn, inputs, targets, params=params)
    eigenvalues = torch.linalg.eigvalsh(hess).numpy()
    n = len(eigenvalues)
    density = smoothed_density(eigenvalues[None], np.full((1, n), 1.0 / n), np.asarray(grid),
                               sigma)[0]
    top = float(np.abs(eigenvalues).max())
    return {"eigenvalues": eigenvalues, "density": density, "n": n,
            "moments": np.array([np.mean(eigenvalues ** k) for k in range(1, MOMENTS + 1)]),
            "trace": float(eigenvalues.sum()), "lambda_max": float(eigenvalues[-1]),
            "lambda_min": float(eigenvalues[0]),
            "neg_mass": float(np.mean(eigenvalues < -neg_tol * top))}


class Spectrum(Probe):
    """The Hessian's eigenvalue density during training (`hessian_density`: `n_v` vectors, `m`
    Lanczos steps, smoothing `width`, over all trainable parameters or the block `params`
    selects), at W^t on the step's batch, where Landscape and Curvature measure.

    Logs spec/lambda_max, spec/lambda_min (the extreme Ritz nodes), spec/trace and
    spec/trace_se, spec/neg_mass and spec/neg_mass_se (the fraction of negative eigenvalues),
    spec/quadrature_l1 (how far m is from enough) and spec/hvps; with a WandbLogger attached,
    the quadrature's mass in 64 bins as the W&B histogram spec/density (a heat map over steps).
    The vectors come from a generator seeded with seed and step (the same on every DDP process;
    the global RNG untouched)."""

    name = "spec"

    def __init__(self, n_v: int = 4, m: int = 40, width: float = 0.01, params: Params = None,
                 seed: int = 0, every: int = 1000, log_spaced: bool = True, start: int = 0,
                 stop: int | None = None):
        super().__init__(every, log_spaced, start, stop)
        if n_v < 2:
            raise ValueError(f"n_v must be >= 2 (for error bars); got {n_v}")
        if m < 1:
            raise ValueError(f"m must be >= 1; got {m}")
        self.n_v, self.m, self.width, self.seed = n_v, m, width, seed
        self.params = None if params is None else list(params)

    def before_optimizer_step(self, step: Step) -> dict[str, float]:
        result = hessian_density(step.net, step.loss_fn, step.inputs, step.targets, self.n_v,
                                 self.m, params=self.params, width=self.width,
                                 seed=self.seed * 1_000_003 + step.index, sync=step.sync)
        nodes, weights = result["nodes"], result["weights"]
        ok = np.isfinite(nodes)
        mass, edges = np.histogram(nodes[ok], bins=64, weights=weights[ok] / result["n_v"])
        step.histograms["spec/density"] = (mass, edges)
        return {f"spec/{k}": float(result[k]) for k in
                ("lambda_max", "lambda_min", "trace", "trace_se", "neg_mass", "neg_mass_se",
                 "quadrature_l1", "hvps")}
