"""Theorem 4.1 of the paper on live training: BatchNorm's effect on the gradient with respect to
its input, both sides of the bound per BN layer (`bn_gradient_bound`), and the probe that logs
them (`BNGradientBound`)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from bnstudy.instruments.distributed import all_mean, sync_default
from bnstudy.instruments.probe import Layers, Probe, Step, layer_keys
from bnstudy.instruments.state import measuring
from bnstudy.instruments.trace import (NORM_LIKE, WEIGHT_LAYERS, LossFn, Trace, layer_names,
                                       module_names, select_layers)


def bn_modules(model: nn.Module, inputs: Tensor) -> dict[str, nn.Module]:
    """{layer: the BatchNorm module that normalizes its output} for every Conv/Linear layer
    directly followed (in forward order, through other norm-like modules) by a BatchNorm."""
    with measuring(model):
        trace = Trace(model, inputs)
    names = module_names(model)
    order = trace.leaf_order
    found: dict[str, nn.Module] = {}
    for k, m in enumerate(order):
        if not isinstance(m, WEIGHT_LAYERS) or names[m] in found:
            continue
        end = k + 1
        while end < len(order) and isinstance(order[end], NORM_LIKE):
            if isinstance(order[end], nn.modules.batchnorm._BatchNorm):
                found[names[m]] = order[end]
                break
            end += 1
    return found


def _per_unit(t: Tensor) -> Tensor:
    """(batch, units[, positions...]) -> (m, units) in float64: a unit's samples are over the
    batch and the positions, as BatchNorm normalizes them."""
    t = t.detach().double()
    return t.reshape(-1, t.shape[1]) if t.dim() == 2 else t.movedim(1, -1).reshape(-1, t.shape[1])


def bn_gradient_bound(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    layers: Sequence[str | int] | None = None,
    *,
    sync: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Theorem 4.1 of the paper, both sides, for the BatchNorm after each chosen layer (all that
    have one if None), on this batch in train mode.

    For unit j with pre-BN activations y_j (m values: batch x positions), its batch std sigma_j
    (sqrt(var + eps), as the layer computes it), y-hat_j = (y_j - mean) / sigma_j, the BN output
    z_j = gamma_j y-hat_j + beta_j and g_j = dL/dz_j (the gradient "without BN", seen from after
    the BN layer, as in the paper's proof):
      lhs        = ||dL-hat/dy_j||^2
      rhs(c)     = gamma_j^2 / sigma_j^2 (||g_j||^2 - (1/m) <1, g_j>^2 - c <g_j, y-hat_j>^2)
      printed: c = 1/sqrt(m);  rederived: c = 1/m.
    Backprop through BN gives dL-hat/dy_j = gamma_j / sigma_j (g_j - mean(g_j)
    - y-hat_j mean(g_j y-hat_j)): for eps = 0 (||y-hat_j||^2 = m) that is a projection and
    lhs = rhs(1/m) exactly; eps > 0 takes (gamma_j^2 / sigma_j^2)(eps / sigma_j^2)(1/m)
    <g_j, y-hat_j>^2 off lhs (rhs_exact includes it: lhs / rhs_exact = 1 up to rounding), so
    the 1/m bound holds, with equality at eps = 0. With 1/sqrt(m) > 1/m it fails whenever
    <g_j, y-hat_j> != 0.

    Returns {layer: {m, lhs, rhs_printed, rhs_rederived, rhs_exact (sums over units),
    ratio_printed, ratio_rederived, ratio_exact (lhs / rhs), holds_printed, holds_rederived
    (fraction of units with lhs <= rhs, relative slack 1e-5 for float32 rounding)}}.
    """
    sync = sync_default(sync)
    where = bn_modules(model, inputs)
    chosen = select_layers(layer_names(model, inputs), layers)
    missing = [n for n in chosen if n not in where]
    if layers is not None and missing:
        raise ValueError(f"no BatchNorm follows layer(s) {missing}; layers with one: "
                         f"{list(where)}")
    chosen = [n for n in chosen if n in where]
    seen: dict[str, list[Tensor]] = {}

    def keep(name):
        def hook(module, args, out):  # returns None: the output is left alone
            seen.setdefault(name, [args[0], out])
        return hook

    hooks = [where[n].register_forward_hook(keep(n)) for n in chosen]
    try:
        with measuring(model):
            loss = loss_fn(model(inputs), targets)
            tensors = [t for n in chosen for t in seen[n]]
            grads = torch.autograd.grad(loss, tensors) if tensors else []
    finally:
        for h in hooks:
            h.remove()
    sums, sizes = [], []
    for i, n in enumerate(chosen):
        bn = where[n]
        y, gy, gz = _per_unit(seen[n][0]), _per_unit(grads[2 * i]), _per_unit(grads[2 * i + 1])
        m = y.shape[0]
        var = y.var(0, unbiased=False)
        sigma2 = var + bn.eps
        y_hat = (y - y.mean(0)) / sigma2.sqrt()
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
        scale = gamma ** 2 / sigma2
        lhs = gy.pow(2).sum(0)
        a, b = gz.pow(2).sum(0), gz.sum(0).pow(2) / m
        c = (gz * y_hat).sum(0).pow(2)
        rhs_printed = scale * (a - b - c / math.sqrt(m))
        rhs_m = scale * (a - b - c / m)
        rhs_exact = scale * (a - b - 2 * c / m + c * y_hat.pow(2).sum(0) / m ** 2)
        slack = 1e-5 * scale * a  # float32 gradients
        holds_p = (lhs <= rhs_printed + slack).double().mean()
        holds_m = (lhs <= rhs_m + slack).double().mean()
        sums.append(torch.stack([lhs.sum(), rhs_printed.sum(), rhs_m.sum(), rhs_exact.sum(),
                                 holds_p, holds_m]))
        sizes.append(m)
    if sync and sums:
        sums = all_mean(sums)
    out = {}
    for n, m, s in zip(chosen, sizes, sums):
        lhs, rp, rm, re, hp, hm = (float(v) for v in s)
        out[n] = {"m": m, "lhs": lhs, "rhs_printed": rp, "rhs_rederived": rm, "rhs_exact": re,
                  "ratio_printed": lhs / rp if rp != 0 else float("nan"),
                  "ratio_rederived": lhs / rm if rm != 0 else float("nan"),
                  "ratio_exact": lhs / re if re != 0 else float("nan"),
                  "holds_printed": hp, "holds_rederived": hm}
    return out


class BNGradientBound(Probe):
    """Theorem 4.1 on live training (`bn_gradient_bound`), for the BatchNorm after each
    of `layers` (all BN layers if None), at W^t on the step's batch: logs
    thm41/<key>/layerNN for key in lhs, rhs_printed (last coefficient 1/sqrt(m), as printed),
    rhs_rederived (1/m), ratio_printed, ratio_rederived (lhs / rhs; <= 1 where the bound holds),
    holds_printed, holds_rederived (fraction of units where it holds)."""

    name = "thm41"
    KEYS = ("lhs", "rhs_printed", "rhs_rederived", "ratio_printed", "ratio_rederived",
            "holds_printed", "holds_rederived")

    def __init__(self, layers: Layers = None, every: int = 100, log_spaced: bool = True,
                 start: int = 0, stop: int | None = None):
        super().__init__(every, log_spaced, start, stop)
        self.layers = None if layers is None else list(layers)
        self._keys: dict[str, str] | None = None

    def before_optimizer_step(self, step: Step) -> dict[str, float]:
        result = bn_gradient_bound(step.net, step.loss_fn, step.inputs, step.targets,
                                          self.layers, sync=step.sync)
        if self._keys is None:
            self._keys = layer_keys(step.net, step.inputs)
        return {f"thm41/{k}/{self._keys[n]}": v[k] for n, v in result.items() for k in self.KEYS}

    def teardown(self) -> None:
        self._keys = None
