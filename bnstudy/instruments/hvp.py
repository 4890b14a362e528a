"""Hessian-vector products of the loss over all trainable parameters (double backward through
one gradient graph), and the eigensolvers that use them: Lanczos with full reorthogonalization
and PyHessian's power iteration. Vectors are lists of tensors shaped like the parameters."""
from __future__ import annotations

import math
from typing import Callable

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


def lanczos(hvp: Callable[[list[Tensor]], list[Tensor]], start: list[Tensor], k: int, tol: float,
             max_iter: int, gen: torch.Generator) -> tuple[np.ndarray, list[list[Tensor]], float]:
    """Top-k (largest algebraic) eigenpairs by Lanczos with full reorthogonalization, stopped when
    each of the k Ritz pairs has residual ||H u - theta u|| = |beta_m s_mi| <= tol |theta| (the
    Lanczos residual identity). Returns eigenvalues (descending), their vectors and the largest
    relative residual."""
    n = sum(t.numel() for t in start)
    basis: list[list[Tensor]] = []
    alphas: list[float] = []
    betas: list[float] = []  # betas[j]: coupling of basis j and j + 1
    q = start
    norm = math.sqrt(dot(q, q))
    q = scaled(q, 1.0 / norm)
    theta, s, worst = None, None, float("inf")
    for j in range(min(max_iter, n)):
        basis.append(q)
        w = hvp(q)
        alpha = dot(w, q)
        alphas.append(alpha)
        axpy(-alpha, q, w)
        if j > 0:
            axpy(-betas[j - 1], basis[j - 1], w)
        for _ in range(2):  # full reorthogonalization, twice is enough (Parlett)
            for b in basis:
                axpy(-dot(w, b), b, w)
        beta = math.sqrt(max(dot(w, w), 0.0))
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        evals, evecs = np.linalg.eigh(t)
        order = np.argsort(evals)[::-1][:k]
        theta, s = evals[order], evecs[:, order]
        residual = np.abs(beta * s[-1, :])
        scale = np.maximum(np.abs(theta), 1e-30)
        worst = float(np.max(residual / scale)) if len(theta) >= min(k, n) else float("inf")
        if len(theta) >= min(k, n) and worst <= tol:
            break
        if j + 1 == min(max_iter, n):
            break
        if beta <= 1e-10 * max(1.0, float(np.max(np.abs(evals)))):
            # an invariant subspace: go on from a fresh random vector orthogonal to it
            w = random_vector(q, gen)
            for _ in range(2):
                for b in basis:
                    axpy(-dot(w, b), b, w)
            beta_next = 0.0
            w_norm = math.sqrt(dot(w, w))
            q = scaled(w, 1.0 / w_norm)
        else:
            beta_next = beta
            q = scaled(w, 1.0 / beta)
        betas.append(beta_next)
    vectors = []
    for i in range(len(theta)):
        u = [torch.zeros_like(t) for t in start]
        for coef, b in zip(s[:, i], basis):
            axpy(float(coef), b, u)
        vectors.append(u)
    return np.asarray(theta), vectors, worst


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
