"""Internal covariate shift (Definition 2.1, docs/protocol.md section 3): for layer i,
  G  = dL/dW_i at (W_1^t .. W_k^t),
  G' = dL/dW_i at (W_1^{t+1} .. W_{i-1}^{t+1}, W_i^t .. W_k^t), same batch;
reported as ||G - G'||_2 and cos(G, G'). "Layers before i" are all parameters of the modules that
run before layer i (weights, biases, norm affine). `ics` is the fast measurement,
`ics_bruteforce` the definition written out naively (its twin), `ICS` the probe that logs it."""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from bnstudy.instruments.distributed import all_mean, sync_default
from bnstudy.instruments.probe import Layers, Probe, Step, layer_keys
from bnstudy.instruments.state import SavedParams, measuring
from bnstudy.instruments.trace import (WEIGHT_LAYERS, LossFn, Trace, layers_in_order,
                                       naive_grads, select_layers)


def ics(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    params_after: Mapping[str, Tensor],
    layers: Sequence[str | int] | None = None,
    *,
    grads: Mapping[str, Tensor] | None = None,
    sync: bool | None = None,
) -> dict[str, dict[str, float]]:
    """{layer: {"l2": ||G - G'||, "cos": cos(G, G')}} for the Conv/Linear layers (all, or `layers`:
    module paths or 1-based numbers).

    The model holds W^t; `params_after` maps every parameter name to W^{t+1} (what the optimizer
    produced). `grads` may give G (parameter name -> gradient at W^t on this batch, e.g. the
    step's own .grad) to save one forward/backward.

    Fast path (models that are a chain of leaf modules, e.g. VGG and DeepLinear): one no-grad
    forward at W^{t+1} caches the input of every layer (it depends only on the modules before it),
    then for each layer i only the suffix from layer i is run at W^t and back-propagated to W_i.
    Other models: one forward/backward per layer with the prefix parameters swapped in.
    """
    sync = sync_default(sync)
    with measuring(model) as state:
        after = _after_params(state, params_after)
        state.load(list(after), after)  # W^{t+1}: one pass caches every layer's input
        trace = Trace(model, inputs)
        state.reset()  # W^t
        all_layers = layers_in_order(model, trace)
        modules = dict(model.named_modules())
        chosen = [n for n in select_layers(all_layers, layers) if modules[n].weight.requires_grad]
        weights = [modules[n].weight for n in chosen]

        if grads is None:
            loss = loss_fn(model(inputs), targets)
            g = list(torch.autograd.grad(loss, weights))
            g = all_mean(g) if sync else g
        else:
            g = [grads[f"{n}.weight"] for n in chosen]

        g_shift: list[Tensor | None] = []
        for name in chosen:
            before = _params_before(model, trace, modules[name])
            if not before:  # nothing runs before this layer: G' is G by definition
                g_shift.append(None)
            elif trace.chain is not None:
                g_shift.append(_suffix_grad(trace, modules[name], loss_fn, targets))
            else:  # any model: the prefix at W^{t+1}, a full forward, back to W^t
                state.load(before, after)
                loss = loss_fn(model(inputs), targets)
                g_shift.append(torch.autograd.grad(loss, modules[name].weight)[0])
                state.reset(before)
        computed = [t for t in g_shift if t is not None]
        if sync and computed:
            computed = iter(all_mean(computed))
            g_shift = [None if t is None else next(computed) for t in g_shift]
    return {n: _l2_cos(gi, gi if gs is None else gs) for n, gi, gs in zip(chosen, g, g_shift)}


def _after_params(state: SavedParams, params_after: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """W^{t+1} for every parameter (frozen ones may be left out: they stay as they are)."""
    missing = [n for n, p in state.params.items() if p.requires_grad and n not in params_after]
    if missing:
        raise KeyError(f"params_after lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {n: params_after[n].detach() for n in state.params if n in params_after}


def _params_before(model: nn.Module, trace: Trace, layer: nn.Module) -> list[str]:
    """Names of the parameters of the modules whose first call precedes `layer`'s."""
    rank = trace.first_call[layer]
    return [f"{prefix}.{n}" if prefix else n
            for prefix, m in model.named_modules() if trace.first_call.get(m, rank) < rank
            for n, p in m._parameters.items() if p is not None]


def _suffix_grad(trace: Trace, layer: nn.Module, loss_fn: LossFn, targets: Tensor) -> Tensor:
    """dL/dW_i with the W^{t+1} prefix activation cached by the trace and the suffix at W^t."""
    chain = trace.chain
    start = next(k for k, (m, _) in enumerate(chain) if m is layer)
    h = trace.layer_inputs[layer]
    for m, in_shape in chain[start:]:
        h = m(h if h.shape == in_shape else h.reshape(in_shape))
    out = trace.output
    h = h if h.shape == out.shape else h.reshape(out.shape)
    return torch.autograd.grad(loss_fn(h, targets), layer.weight)[0]


def _l2_cos(g: Tensor, g2: Tensor) -> dict[str, float]:
    a, b = g.double().flatten(), g2.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")
    return {"l2": float((a - b).norm()), "cos": cos}


def _naive_order(model: nn.Module, inputs: Tensor) -> list[str]:
    """Module names in the order they first run, from a forward of a deep copy."""
    twin = copy.deepcopy(model).train()
    names = {m: n for n, m in twin.named_modules()}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: order.append(names[m]) if names[m] not in
                                         order else None) for m in twin.modules()]
    with torch.no_grad():
        twin(inputs)
    for h in hooks:
        h.remove()
    return order


def ics_bruteforce(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                   params_after: Mapping[str, Tensor], layers: Sequence[str | int] | None = None
                   ) -> dict[str, dict[str, float]]:
    """Definition 2.1 naively: for each layer a deep copy of the model, the parameters of every
    module that ran before the layer set to W^{t+1}, a full forward/backward."""
    order = _naive_order(model, inputs)
    modules = dict(model.named_modules())
    all_layers = [n for n in order if isinstance(modules[n], WEIGHT_LAYERS)]
    g = naive_grads(copy.deepcopy(model).train(), loss_fn, inputs, targets)
    result = {}
    for name in select_layers(all_layers, layers):
        twin = copy.deepcopy(model).train()
        with torch.no_grad():
            for before in order[:order.index(name)]:
                for pname, p in twin.get_submodule(before).named_parameters(recurse=False):
                    p.copy_(params_after[f"{before}.{pname}" if before else pname])
        g_shift = naive_grads(twin, loss_fn, inputs, targets)
        result[name] = _l2_cos(g[f"{name}.weight"], g_shift[f"{name}.weight"])
    return result


class ICS(Probe):
    """Internal covariate shift (Definition 2.1) of `layers` (all Conv/Linear layers if None):
    logs ics/l2/layerNN = ||G - G'|| and ics/cos/layerNN = cos(G, G') (NN: the layer number).
    G is the step's own gradient (`reuse_step_grad`) or recomputed; W^{t+1} is what the optimizer
    produced."""

    name = "ics"

    def __init__(self, layers: Layers = None, reuse_step_grad: bool = True, every: int = 100,
                 log_spaced: bool = True, start: int = 0, stop: int | None = None):
        super().__init__(every, log_spaced, start, stop)
        self.layers = None if layers is None else list(layers)
        self.reuse_step_grad = reuse_step_grad
        self._before: dict[str, Tensor] | None = None
        self._grads: dict[str, Tensor] | None = None
        self._keys: dict[str, str] | None = None  # module path -> layerNN, found once

    def before_optimizer_step(self, step: Step) -> None:
        params = dict(step.net.named_parameters())
        self._before = {n: p.detach().clone() for n, p in params.items()}
        if self.reuse_step_grad:  # copies: the optimizer may change .grad in place
            self._grads = {n: g.detach().clone() for n, g in step.grads.items()}

    def step_end(self, step: Step) -> dict[str, float] | None:
        if self._before is None:  # no optimizer step this time (training_step returned None)
            return None
        params = dict(step.net.named_parameters())
        after = {n: p.detach().clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self._before[n])
            result = ics(step.net, step.loss_fn, step.inputs, step.targets, after,
                                self.layers, grads=self._grads, sync=step.sync)
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(after[n])
            self._before = self._grads = None
        if self._keys is None:
            self._keys = layer_keys(step.net, step.inputs)
        metrics = {f"ics/l2/{self._keys[n]}": v["l2"] for n, v in result.items()}
        metrics.update({f"ics/cos/{self._keys[n]}": v["cos"] for n, v in result.items()})
        return metrics

    def teardown(self) -> None:
        self._keys = None  # the next fit may train another model
