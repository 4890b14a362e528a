"""The loss landscape along the gradient (section 3.2) or a random direction: at W with
g = dL/dW (all trainable parameters), for each step size eta, L(W - eta g),
||g - grad L(W - eta g)||_2 and that over ||eta g||_2 (beta); the bands (min, max) over eta and
beta_eff = max beta. `random_landscape` is the same along a random Gaussian direction d with
||d|| = ||g||. `landscape_bruteforce` is the twin, `Landscape` and `RandomLandscape` the probes."""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bnstudy.instruments.distributed import all_mean, sync_default
from bnstudy.instruments.probe import Probe, Step
from bnstudy.instruments.state import assign, measuring
from bnstudy.instruments.trace import LossFn, naive_grads
from bnstudy.instruments.vectors import total_norm, wide, widen


def landscape(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    step_sizes: Sequence[float],
    *,
    grads: Mapping[str, Tensor] | None = None,
    direction: Mapping[str, Tensor] | None = None,
    sync: bool | None = None,
) -> dict:
    """Loss and gradient along W - eta d for each absolute step size eta; d = g = dL/dW (all
    trainable parameters) unless `direction` is given. `grads` may give g (e.g. the step's own
    .grad), saving one forward/backward.

    Returns step_sizes, loss, grad_diff, beta (one value per eta), their bands loss_min/max,
    grad_diff_min/max, beta_eff = max beta, grad_norm = ||g||, direction_norm = ||d|| and loss0
    (the loss at W, None when `grads` were given).
    """
    sync = sync_default(sync)
    with measuring(model) as state:
        names = [n for n, p in state.params.items() if p.requires_grad]
        params = [state.params[n] for n in names]
        loss0 = None
        if grads is None:
            loss0, g = _loss_and_grads(model, loss_fn, inputs, targets, params, sync)
        else:
            g = [grads[n] if grads[n] is not None else torch.zeros_like(p)
                 for n, p in zip(names, params)]
        g = widen(g)  # low-precision gradients are compared in float32
        d = g if direction is None else [direction[n] for n in names]
        d_norm = total_norm(d)
        start = [state.saved[n] for n in names]
        losses, diffs, betas = [], [], []
        for eta in step_sizes:
            assign(params, torch._foreach_add(start, d, alpha=-eta))  # W - eta d
            loss, g_eta = _loss_and_grads(model, loss_fn, inputs, targets, params, sync)
            torch._foreach_sub_(g_eta, g)  # g_eta is ours to overwrite
            diff = total_norm(g_eta)
            losses.append(loss)
            diffs.append(diff)
            betas.append(diff / (eta * d_norm) if eta * d_norm > 0 else float("nan"))
    return {
        "step_sizes": list(step_sizes), "loss": losses, "grad_diff": diffs, "beta": betas,
        "loss_min": min(losses), "loss_max": max(losses),
        "grad_diff_min": min(diffs), "grad_diff_max": max(diffs), "beta_eff": max(betas),
        "grad_norm": total_norm(g), "direction_norm": d_norm, "loss0": loss0,
    }


def random_direction(params: Mapping[str, Tensor], seed: int, norm: float | None = None
                     ) -> dict[str, Tensor]:
    """A Gaussian direction shaped like `params`, drawn from a private generator (the global RNG
    is untouched; the same seed gives the same direction on every process and device), rescaled
    to total norm `norm` if given."""
    gen = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for n, p in params.items()}
    if norm is not None:
        scale = norm / total_norm(list(d.values()))
        d = {n: t * scale for n, t in d.items()}
    return d


def random_landscape(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    step_sizes: Sequence[float],
    *,
    seed: int = 0,
    grads: Mapping[str, Tensor] | None = None,
    sync: bool | None = None,
) -> dict:
    """`landscape` along a random Gaussian direction d scaled to ||d|| = ||g||, so a step eta
    moves as far as the gradient step of the same size (the paper: "the loss behaves alike")."""
    sync = sync_default(sync)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if grads is None:
        with measuring(model):
            _, g = _loss_and_grads(model, loss_fn, inputs, targets, list(params.values()), sync)
        grads = dict(zip(params, g))
    g_norm = total_norm([grads[n] for n in params if grads[n] is not None])
    d = random_direction(params, seed, g_norm)
    return landscape(model, loss_fn, inputs, targets, step_sizes, grads=grads, direction=d,
                     sync=sync)


def _loss_and_grads(model, loss_fn, inputs, targets, params: list[Tensor], sync: bool
                    ) -> tuple[float, list[Tensor]]:
    """Loss at the model's current parameters and its gradient w.r.t. `params`."""
    loss = loss_fn(model(inputs), targets)
    g = torch.autograd.grad(loss, params, allow_unused=True)
    g = widen([torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)])
    loss = wide(loss.detach()).reshape(1)
    if sync:
        loss, *g = all_mean([loss, *g])
    return float(loss), g


def landscape_bruteforce(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                         step_sizes: Sequence[float],
                         direction: Mapping[str, Tensor] | None = None) -> dict:
    """Section 3.2 naively: one deep copy of the model per step size, moved in place, full
    forward/backward."""
    g = naive_grads(copy.deepcopy(model).train(), loss_fn, inputs, targets)
    d = g if direction is None else dict(direction)
    d_norm = total_norm(list(d.values()))
    losses, diffs, betas = [], [], []
    for eta in step_sizes:
        twin = copy.deepcopy(model).train()
        with torch.no_grad():
            for n, p in twin.named_parameters():
                if p.requires_grad:
                    p.sub_(eta * d[n])
        twin.zero_grad(set_to_none=True)
        loss = loss_fn(twin(inputs), targets)
        loss.backward()
        loss = float(loss.detach())
        diff = total_norm([g[n] - (p.grad if p.grad is not None else torch.zeros_like(p))
                      for n, p in twin.named_parameters() if p.requires_grad])
        losses.append(loss)
        diffs.append(diff)
        betas.append(diff / (eta * d_norm) if eta * d_norm > 0 else float("nan"))
    return {"step_sizes": list(step_sizes), "loss": losses, "grad_diff": diffs, "beta": betas,
            "loss_min": min(losses), "loss_max": max(losses), "grad_diff_min": min(diffs),
            "grad_diff_max": max(diffs), "beta_eff": max(betas),
            "grad_norm": total_norm(list(g.values())), "direction_norm": d_norm}


class Landscape(Probe):
    """Loss landscape along the step's gradient (section 3.2) at step sizes eta = m x lr for each
    multiple m: `lr_multiples`, or `lr_logspace: [lo, hi, n]` (n log-spaced multiples in
    [lo, hi]). Logs <prefix>/loss_min, loss_max, grad_diff_min, grad_diff_max, beta_eff and the
    per-step <prefix>/loss/x<m>, grad_diff/x<m>, beta/x<m>."""

    name = "landscape"

    def __init__(self, lr_multiples: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
                 lr_logspace: tuple[float, float, int] | None = None,
                 reuse_step_grad: bool = True, every: int = 100, log_spaced: bool = True,
                 start: int = 0, stop: int | None = None):
        super().__init__(every, log_spaced, start, stop)
        if lr_logspace is not None:
            lo, hi, n = lr_logspace
            lr_multiples = [float(v) for v in np.geomspace(lo, hi, int(n))]
        self.lr_multiples = [float(m) for m in lr_multiples]
        if not self.lr_multiples or min(self.lr_multiples) <= 0:
            raise ValueError(f"lr multiples must be > 0; got {self.lr_multiples}")
        self.reuse_step_grad = reuse_step_grad

    def measure(self, step: Step, sizes: list[float]) -> dict:
        grads = step.grads if self.reuse_step_grad else None
        return landscape(step.net, step.loss_fn, step.inputs, step.targets, sizes,
                                grads=grads, sync=step.sync)

    def before_optimizer_step(self, step: Step) -> dict[str, float]:
        result = self.measure(step, [m * step.lr for m in self.lr_multiples])
        p = self.name
        metrics = {f"{p}/{k}": result[k] for k in
                   ("loss_min", "loss_max", "grad_diff_min", "grad_diff_max", "beta_eff")}
        for i, m in enumerate(self.lr_multiples):
            for k in ("loss", "grad_diff", "beta"):
                metrics[f"{p}/{k}/x{m:.3g}"] = result[k][i]
        return metrics


class RandomLandscape(Landscape):
    """`Landscape` along a random Gaussian direction with the norm of the step's gradient (a new
    direction at every measurement, from seed and step: the same on every DDP process)."""

    name = "landscape_random"

    def __init__(self, lr_multiples: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
                 lr_logspace: tuple[float, float, int] | None = None, seed: int = 0,
                 reuse_step_grad: bool = True, every: int = 500, log_spaced: bool = False,
                 start: int = 0, stop: int | None = None):
        super().__init__(lr_multiples, lr_logspace, reuse_step_grad, every, log_spaced, start,
                         stop)
        self.seed = seed

    def measure(self, step: Step, sizes: list[float]) -> dict:
        grads = step.grads if self.reuse_step_grad else None
        return random_landscape(step.net, step.loss_fn, step.inputs, step.targets, sizes,
                                       seed=self.seed * 1_000_003 + step.index, grads=grads,
                                       sync=step.sync)
