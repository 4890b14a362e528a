"""Hessian-vector products of the loss over all trainable parameters (double backward through
one gradient graph), and the eigensolvers that use them: Lanczos with full reorthogonalization
and PyHessian's power iteration. Vectors are lists of tensors shaped like the parameters."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bnstudy.instruments.distributed import all_mean
from bnstudy.instruments.trace import LossFn
from bnstudy.instruments.vectors import axpy, dot, random_vector, scaled, widen


class HVP:
    """H v at the model's current parameters on one batch: the gradient graph is built once
    (create_graph) and each product is one backward through it. Counts the products."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                 params: list[Tensor], sync: bool):
        self.params, self.sync, self.count = params, sync, 0
        loss = loss_fn(model(inputs), targets)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        # a parameter the loss does not use has a zero gradient and a zero Hessian block
        self.used = [p for p, g in zip(params, grads) if g is not None]
        self.grads = [g for g in grads if g is not None]

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        self.count += 1
        by_param = dict(zip(map(id, self.params), v))
        hv_used = dict(zip(map(id, self.used), torch.autograd.grad(
            self.grads, self.used, [by_param[id(p)].to(p.dtype) for p in self.used],
            retain_graph=True))) if self.used else {}
        hv = widen([hv_used[id(p)].detach() if id(p) in hv_used else torch.zeros_like(p)
                     for p in self.params])
        return all_mean(hv) if self.sync else list(hv)


BLOCK = 16  # basis rows allocated at a time


class FlatLanczos:
    """The Lanczos basis as flat vectors in blocks of BLOCK rows, for `lanczos` (eigenpairs) and
    spectrum.lanczos_tridiagonal (quadrature): each step is one Hessian-vector product (on views
    of the flat vector, shaped like the parameters) and matrix-vector products that
    reorthogonalize against the whole basis, a block at a time, instead of a Python loop over
    basis vectors and parameter tensors (a DLN with a norm has 72: those loops cost more than its
    products). Blocks are allocated as steps are taken, so a large model holds the rows it uses,
    not max_iter of them, and never two copies.

    The basis arithmetic runs with autocast off: under bf16-mixed (the fast preset) the
    products, which stand for the loss the optimizer sees, run in bf16, but reorthogonalizing in
    bf16 would leave the basis orthogonal to about 1e-3 only."""

    def __init__(self, hvp: Callable[[list[Tensor]], list[Tensor]], like: list[Tensor],
                 steps: int):
        self.hvp, self.like, self.steps = hvp, like, steps
        self.blocks: list[Tensor] = []
        self.size = 0  # rows in use

    def flat(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def shaped(self, vector: Tensor) -> list[Tensor]:
        """Views of `vector` shaped like the parameters (in each one's dtype where they differ)."""
        sizes = [t.numel() for t in self.like]
        return [c.view(t.shape).to(t.dtype) for c, t in zip(torch.split(vector, sizes), self.like)]

    def _used(self) -> list[Tensor]:
        return [b[:min(BLOCK, self.size - i * BLOCK)] for i, b in enumerate(self.blocks)]

    def orthogonalize(self, w: Tensor) -> Tensor:
        """w minus its projection on the basis, twice (twice is enough: Parlett), in place."""
        with torch.autocast(w.device.type, enabled=False):
            for _ in range(2):
                for rows in self._used():
                    w.sub_(rows.T @ (rows @ w))
        return w

    def step(self, q: Tensor, beta_prev: float) -> tuple[float, Tensor]:
        """Append the unit vector q; return alpha = q.Hq and the next residual vector
        w = Hq - alpha q - beta_prev q_prev, reorthogonalized."""
        if self.size == len(self.blocks) * BLOCK:
            self.blocks.append(q.new_empty(min(BLOCK, self.steps - self.size), q.numel()))
        self.blocks[-1][self.size % BLOCK] = q
        self.size += 1
        w = self.flat(self.hvp(self.shaped(q)))
        alpha = float(w.double() @ q.double())
        w.sub_(q, alpha=alpha)
        if self.size > 1:
            prev = self.size - 2
            w.sub_(self.blocks[prev // BLOCK][prev % BLOCK], alpha=beta_prev)
        return alpha, self.orthogonalize(w)

    def combine(self, coefficients: np.ndarray) -> list[Tensor]:
        """sum_j c_j q_j, shaped like the parameters (a Ritz vector)."""
        rows = self._used()
        c = torch.as_tensor(coefficients, dtype=rows[0].dtype, device=rows[0].device)
        with torch.autocast(rows[0].device.type, enabled=False):
            u = sum(c[i * BLOCK:i * BLOCK + len(r)] @ r for i, r in enumerate(rows))
        return self.shaped(u)


def lanczos(hvp: Callable[[list[Tensor]], list[Tensor]], start: list[Tensor], k: int, tol: float,
             max_iter: int, gen: torch.Generator) -> tuple[np.ndarray, list[list[Tensor]], float]:
    """Top-k (largest algebraic) eigenpairs by Lanczos with full reorthogonalization, stopped when
    each of the k Ritz pairs has residual ||H u - theta u|| = |beta_m s_mi| <= tol |theta| (the
    Lanczos residual identity). Returns eigenvalues (descending), their vectors and the largest
    relative residual."""
    n = sum(t.numel() for t in start)
    solver = FlatLanczos(hvp, start, min(max_iter, n))
    q = solver.flat(start)
    q = q / math.sqrt(float(q.double() @ q.double()))
    alphas: list[float] = []
    betas: list[float] = []  # betas[j]: coupling of basis j and j + 1
    theta, s, worst = None, None, float("inf")
    for j in range(solver.steps):
        alpha, w = solver.step(q, betas[-1] if betas else 0.0)
        alphas.append(alpha)
        beta = math.sqrt(max(float(w.double() @ w.double()), 0.0))
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        evals, evecs = np.linalg.eigh(t)
        order = np.argsort(evals)[::-1][:k]
        theta, s = evals[order], evecs[:, order]
        residual = np.abs(beta * s[-1, :])
        scale = np.maximum(np.abs(theta), 1e-30)
        worst = float(np.max(residual / scale)) if len(theta) >= min(k, n) else float("inf")
        if len(theta) >= min(k, n) and worst <= tol:
            break
        if j + 1 == solver.steps:
            break
        if beta <= 1e-10 * max(1.0, float(np.max(np.abs(evals)))):
            # an invariant subspace: go on from a fresh random vector orthogonal to it
            w = solver.orthogonalize(solver.flat(random_vector(start, gen)))
            betas.append(0.0)
            q = w / math.sqrt(float(w.double() @ w.double()))
        else:
            betas.append(beta)
            q = w / beta
    return np.asarray(theta), [solver.combine(s[:, i]) for i in range(len(theta))], worst


def power_iteration(hvp: Callable[[list[Tensor]], list[Tensor]], start: list[Tensor], tol: float,
           max_iter: int) -> tuple[float, list[Tensor], float]:
    """Power iteration as PyHessian runs it (largest |eigenvalue|), stopped when the eigenvalue
    estimate changes by <= tol relative; also returns the final relative residual."""
    v = scaled(start, 1.0 / math.sqrt(dot(start, start)))
    eig, hv = None, hvp(v)
    for _ in range(max_iter):
        new = dot(hv, v)
        v = scaled(hv, 1.0 / math.sqrt(dot(hv, hv)))
        hv = hvp(v)
        if eig is not None and abs(new - eig) <= tol * abs(eig):
            eig = new
            break
        eig = new
    eig = dot(hv, v)
    res = list(hv)
    axpy(-eig, v, res)
    return eig, v, math.sqrt(dot(res, res)) / max(abs(eig), 1e-30)
