"""The study's measurements as plain PyTorch: point them at any nn.Module (no Lightning needed).

Definitions (docs/protocol.md section 3):
  layer i      the i-th Conv/Linear module in forward order, named by its module path
  ics          G  = dL/dW_i at (W_1^t .. W_k^t),
               G' = dL/dW_i at (W_1^{t+1} .. W_{i-1}^{t+1}, W_i^t .. W_k^t), same batch;
               reports ||G - G'||_2 and cos(G, G'). "Layers before i" are all parameters of the
               modules that run before layer i (weights, biases, norm affine).
  landscape    at W with g = dL/dW (all trainable parameters), for each eta in step_sizes:
               L(W - eta g), ||g - grad L(W - eta g)||_2 and that over ||eta g||_2 (beta);
               the bands (min, max) over eta and beta_eff = max beta.
  random_landscape   the same along a random Gaussian direction d with ||d|| = ||g||.

Every probe is a measurement, not training: it evaluates the loss the optimizer sees (train mode,
batch statistics, the step's noisy-BN noise) and leaves parameters, .grad, buffers (BN running
statistics and num_batches_tracked), the noisy-BN state and every RNG exactly as it found them
(`measuring`). Probes move parameters in place and put them back bit for bit; gradients are taken
with torch.autograd.grad, so .grad is never written.

Under torch.distributed (DDP) pass sync=True (the default when a process group of more than one
process is initialized): every gradient and loss a probe computes is averaged over the processes,
as DDP averages the training gradient, so all ranks get the same numbers. Gradients handed in
(`grads=`) are taken as already averaged (the step's own .grad under DDP is).

The `*_bruteforce` functions at the end are the definitions written out naively (a deep copy of
the model per layer or step size); tests and bench/bench_probes.py check the fast ones against them.
"""
from __future__ import annotations

import copy
import math
import random
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnstudy.norms import BatchNoise, LpNorm

LossFn = Callable[[Tensor, Tensor], Tensor]
WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
# Modules that may sit between a weight layer and its non-linearity: the activation of a layer
# (activation statistics) is taken after them, i.e. what the non-linearity receives.
NORM_LIKE = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, BatchNoise, LpNorm,
             nn.Identity)


# --------------------------------------------------------------------------------------------
# Leaving the model as it was found
# --------------------------------------------------------------------------------------------
def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, py, npy = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(py)
    np.random.set_state(npy)


class _Saved:
    """The model's parameters (name -> Parameter) and a copy of their values on entry."""

    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters())
        self.saved = {n: p.detach().clone() for n, p in self.params.items()}

    def load(self, names: Sequence[str], values: Mapping[str, Tensor]) -> None:
        _assign([self.params[n] for n in names], [values[n] for n in names])

    def reset(self, names: Sequence[str] | None = None) -> None:
        self.load(list(self.params) if names is None else names, self.saved)


def _assign(params: list[Tensor], values: list[Tensor]) -> None:
    """Write `values` into `params` in place (optimizer state keeps pointing at them)."""
    if params:
        with torch.no_grad():
            torch._foreach_copy_(params, values)
    # autocast caches low-precision copies of parameters for the rest of its region: drop them
    torch.clear_autocast_cache()


@contextmanager
def measuring(model: nn.Module) -> Iterator[_Saved]:
    """Train mode for the duration, then the parameters, every buffer, the noisy-BN state, the
    train/eval flags and the RNGs exactly as before (bit for bit). Yields the saved parameters:
    probes move parameters in place (far cheaper than swapping them per call with
    torch.func.functional_call) and read gradients with torch.autograd.grad (.grad untouched)."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    buffers = [(m, name, b, b.clone()) for m in modules
               for name, b in m._buffers.items() if b is not None]
    noise = [(m, m.scale, m.shift, m.stale, m.generator,
              None if m.generator is None else m.generator.get_state(), m._loaded_state)
             for m in modules if isinstance(m, BatchNoise)]
    rng = _rng_state()
    state = _Saved(model)
    try:
        if not all(modes):
            model.train()
        with torch.enable_grad():
            yield state
    finally:
        state.reset()
        for m, name, b, _ in buffers:
            m._buffers[name] = b
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_([b[2] for b in buffers], [b[3] for b in buffers])
        for m, scale, shift, stale, gen, gen_state, loaded in noise:
            m.scale, m.shift, m.stale, m.generator, m._loaded_state = (scale, shift, stale, gen,
                                                                       loaded)
            if gen is not None:
                gen.set_state(gen_state)
        for m, mode in zip(modules, modes):
            m.training = mode
        _set_rng_state(rng)


# --------------------------------------------------------------------------------------------
# What a forward pass does: module order, and whether the model is a chain of leaf modules
# --------------------------------------------------------------------------------------------
class _Trace:
    """One no-grad forward pass, recorded: `first_call` maps each module to the rank of its first
    call, `leaf_order` lists the leaf modules in call order, `layer_inputs` holds the input of
    each Conv/Linear layer. `chain` is set when the model is a plain chain of leaves (each leaf
    takes the previous leaf's output, at most reshaped, nothing changes it in between, and the
    model returns the last one): then any suffix of it can be re-run on its own."""

    def __init__(self, model: nn.Module, inputs: Tensor):
        self.first_call: dict[nn.Module, int] = {}
        calls: list[list] = []
        leaf = {m: not any(True for _ in m.children()) for m in model.modules()}

        def pre(m, args, kwargs):
            self.first_call.setdefault(m, len(self.first_call))
            if leaf[m]:
                x = args[0] if len(args) == 1 and not kwargs else None
                calls.append([m, x, None if x is None else x._version, None, None])

        def post(m, args, kwargs, out):
            if leaf[m]:
                call = next(c for c in reversed(calls) if c[0] is m and c[3] is None)
                call[3], call[4] = out, out._version if isinstance(out, Tensor) else None

        handles = [h for m in model.modules() for h in (
            m.register_forward_pre_hook(pre, with_kwargs=True),
            m.register_forward_hook(post, with_kwargs=True))]
        try:
            with torch.no_grad():
                out = model(inputs)
        finally:
            for h in handles:
                h.remove()
        self.output = out
        self.chain = self._chain(model, inputs, calls, out, leaf)
        # inputs of the weight layers only: the prefix activations the ICS fast path starts from
        self.layer_inputs = {c[0]: c[1] for c in calls if isinstance(c[0], WEIGHT_LAYERS)}
        self.leaf_order = [c[0] for c in calls]

    @staticmethod
    def _chain(model, inputs, calls, out, leaf) -> list[tuple[nn.Module, torch.Size]] | None:
        if not calls or len({id(c[0]) for c in calls}) != len(calls):
            return None  # a leaf module used twice
        if any(not leaf[m] and any(p is not None for p in m._parameters.values())
               for m in model.modules()):
            return None  # parameters used outside leaf modules
        prev, prev_version = inputs, inputs._version
        for m, x, x_version, y, y_version in calls:
            if x is None or not _same_data(x, prev) or x_version != prev_version:
                return None  # not fed the previous output (or it was changed in between)
            if not isinstance(y, Tensor):
                return None
            prev, prev_version = y, y_version
        if not isinstance(out, Tensor) or not _same_data(out, prev):
            return None
        return [(c[0], c[1].shape) for c in calls]


def _same_data(a: Tensor, b: Tensor) -> bool:
    """a is b, or a plain reshape of it (same memory, both contiguous)."""
    if a is b:
        return True
    return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.data_ptr() == b.data_ptr()
            and a.numel() == b.numel() and a.dtype == b.dtype and a.is_contiguous()
            and b.is_contiguous())


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, m in model.named_modules():
        names.setdefault(m, name)
    return names


def layer_names(model: nn.Module, inputs: Tensor) -> list[str]:
    """Module paths of the Conv/Linear layers in forward order (layer i = entry i - 1)."""
    with measuring(model):
        trace = _Trace(model, inputs)
    return _layers_in_order(model, trace)


def _layers_in_order(model: nn.Module, trace: _Trace) -> list[str]:
    names = _module_names(model)
    ran = sorted(trace.first_call, key=trace.first_call.get)
    return [names[m] for m in ran if isinstance(m, WEIGHT_LAYERS)]


def select_layers(all_layers: list[str], layers: Sequence[str | int] | None) -> list[str]:
    """Restrict to `layers`: module paths, or 1-based layer numbers as in the paper's figures."""
    if layers is None:
        return list(all_layers)
    chosen = []
    for layer in layers:
        if isinstance(layer, int):
            if not 1 <= layer <= len(all_layers):
                raise ValueError(f"layer number {layer} out of range 1..{len(all_layers)}")
            layer = all_layers[layer - 1]
        elif layer not in all_layers:
            raise ValueError(f"{layer!r} is not a Conv/Linear layer; layers: {all_layers}")
        chosen.append(layer)
    return sorted(set(chosen), key=all_layers.index)


Params = Sequence[str | int] | None  # what a block of the Hessian is taken over


def parameter_names(model: nn.Module, inputs: Tensor, params: Params = None) -> list[str]:
    """The trainable parameters a selection names, in named_parameters order: all of them for
    None; for each entry a 1-based layer number (layer i, as the other probes number layers:
    that Conv/Linear module's own weight and bias, not the norm after it), a parameter name
    ("features.0.weight") or a module path ("features.1": every parameter under that module)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return trainable
    if isinstance(params, (str, int)):
        params = [params]
    modules = dict(model.named_modules())
    layers = layer_names(model, inputs) if any(isinstance(p, int) for p in params) else []
    chosen: set[str] = set()
    for item in params:
        if isinstance(item, int):
            path = select_layers(layers, [item])[0]
            found = [f"{path}.{n}" for n, _ in modules[path].named_parameters(recurse=False)]
        elif item in trainable:
            found = [item]
        elif item in modules:
            prefix = f"{item}." if item else ""
            found = [n for n in trainable if n.startswith(prefix)]
        else:
            raise ValueError(f"params: {item!r} is neither a layer number, a parameter name nor "
                             f"a module path of the model")
        found = [n for n in found if n in trainable]
        if not found:
            raise ValueError(f"params: {item!r} selects no trainable parameter")
        chosen.update(found)
    return [n for n in trainable if n in chosen]


# --------------------------------------------------------------------------------------------
# Distributed: average what each process computed on its shard
# --------------------------------------------------------------------------------------------
def _sync_default(sync: bool | None) -> bool:
    if sync is not None:
        return sync
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_mean(tensors: list[Tensor]) -> list[Tensor]:
    """The mean over processes of each tensor, in one all_reduce."""
    flat = torch.cat([_wide(t.detach()).reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return out


def _norm(tensors: Sequence[Tensor]) -> float:
    """Euclidean norm of the tensors taken as one vector."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
        _widen(tensors))).double()))


def _wide(t: Tensor) -> Tensor:
    """float32, or float64 when it is already (the quadratic oracles run in float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _widen(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    if all(t.dtype in (torch.float32, torch.float64) for t in tensors):
        return tensors
    return [_wide(t) for t in tensors]


def _l2_cos(g: Tensor, g2: Tensor) -> dict[str, float]:
    a, b = g.double().flatten(), g2.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")
    return {"l2": float((a - b).norm()), "cos": cos}


# --------------------------------------------------------------------------------------------
# Internal covariate shift (Definition 2.1)
# --------------------------------------------------------------------------------------------
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
    sync = _sync_default(sync)
    with measuring(model) as state:
        after = _after_params(state, params_after)
        state.load(list(after), after)  # W^{t+1}: one pass caches every layer's input
        trace = _Trace(model, inputs)
        state.reset()  # W^t
        all_layers = _layers_in_order(model, trace)
        modules = dict(model.named_modules())
        chosen = [n for n in select_layers(all_layers, layers) if modules[n].weight.requires_grad]
        weights = [modules[n].weight for n in chosen]

        if grads is None:
            loss = loss_fn(model(inputs), targets)
            g = list(torch.autograd.grad(loss, weights))
            g = _all_mean(g) if sync else g
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
            computed = iter(_all_mean(computed))
            g_shift = [None if t is None else next(computed) for t in g_shift]
    return {n: _l2_cos(gi, gi if gs is None else gs) for n, gi, gs in zip(chosen, g, g_shift)}


def _after_params(state: _Saved, params_after: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """W^{t+1} for every parameter (frozen ones may be left out: they stay as they are)."""
    missing = [n for n, p in state.params.items() if p.requires_grad and n not in params_after]
    if missing:
        raise KeyError(f"params_after lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {n: params_after[n].detach() for n in state.params if n in params_after}


def _params_before(model: nn.Module, trace: _Trace, layer: nn.Module) -> list[str]:
    """Names of the parameters of the modules whose first call precedes `layer`'s."""
    rank = trace.first_call[layer]
    return [f"{prefix}.{n}" if prefix else n
            for prefix, m in model.named_modules() if trace.first_call.get(m, rank) < rank
            for n, p in m._parameters.items() if p is not None]


def _suffix_grad(trace: _Trace, layer: nn.Module, loss_fn: LossFn, targets: Tensor) -> Tensor:
    """dL/dW_i with the W^{t+1} prefix activation cached by the trace and the suffix at W^t."""
    chain = trace.chain
    start = next(k for k, (m, _) in enumerate(chain) if m is layer)
    h = trace.layer_inputs[layer]
    for m, in_shape in chain[start:]:
        h = m(h if h.shape == in_shape else h.reshape(in_shape))
    out = trace.output
    h = h if h.shape == out.shape else h.reshape(out.shape)
    return torch.autograd.grad(loss_fn(h, targets), layer.weight)[0]


# --------------------------------------------------------------------------------------------
# Loss landscape along the gradient (section 3.2) or a random direction
# --------------------------------------------------------------------------------------------
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
    sync = _sync_default(sync)
    with measuring(model) as state:
        names = [n for n, p in state.params.items() if p.requires_grad]
        params = [state.params[n] for n in names]
        loss0 = None
        if grads is None:
            loss0, g = _loss_and_grads(model, loss_fn, inputs, targets, params, sync)
        else:
            g = [grads[n] if grads[n] is not None else torch.zeros_like(p)
                 for n, p in zip(names, params)]
        g = _widen(g)  # low-precision gradients are compared in float32
        d = g if direction is None else [direction[n] for n in names]
        d_norm = _norm(d)
        start = [state.saved[n] for n in names]
        losses, diffs, betas = [], [], []
        for eta in step_sizes:
            _assign(params, torch._foreach_add(start, d, alpha=-eta))  # W - eta d
            loss, g_eta = _loss_and_grads(model, loss_fn, inputs, targets, params, sync)
            torch._foreach_sub_(g_eta, g)  # g_eta is ours to overwrite
            diff = _norm(g_eta)
            losses.append(loss)
            diffs.append(diff)
            betas.append(diff / (eta * d_norm) if eta * d_norm > 0 else float("nan"))
    return {
        "step_sizes": list(step_sizes), "loss": losses, "grad_diff": diffs, "beta": betas,
        "loss_min": min(losses), "loss_max": max(losses),
        "grad_diff_min": min(diffs), "grad_diff_max": max(diffs), "beta_eff": max(betas),
        "grad_norm": _norm(g), "direction_norm": d_norm, "loss0": loss0,
    }


def random_direction(params: Mapping[str, Tensor], seed: int, norm: float | None = None
                     ) -> dict[str, Tensor]:
    """A Gaussian direction shaped like `params`, drawn from a private generator (the global RNG
    is untouched; the same seed gives the same direction on every process and device), rescaled
    to total norm `norm` if given."""
    gen = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for n, p in params.items()}
    if norm is not None:
        scale = norm / _norm(list(d.values()))
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
    sync = _sync_default(sync)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if grads is None:
        with measuring(model):
            _, g = _loss_and_grads(model, loss_fn, inputs, targets, list(params.values()), sync)
        grads = dict(zip(params, g))
    g_norm = _norm([grads[n] for n in params if grads[n] is not None])
    d = random_direction(params, seed, g_norm)
    return landscape(model, loss_fn, inputs, targets, step_sizes, grads=grads, direction=d,
                     sync=sync)


def _loss_and_grads(model, loss_fn, inputs, targets, params: list[Tensor], sync: bool
                    ) -> tuple[float, list[Tensor]]:
    """Loss at the model's current parameters and its gradient w.r.t. `params`."""
    loss = loss_fn(model(inputs), targets)
    g = torch.autograd.grad(loss, params, allow_unused=True)
    g = _widen([torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)])
    loss = _wide(loss.detach()).reshape(1)
    if sync:
        loss, *g = _all_mean([loss, *g])
    return float(loss), g


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------
def activation_modules(model: nn.Module, inputs: Tensor, after_norm: bool = True
                       ) -> dict[str, nn.Module]:
    """{layer: module whose output is that layer's activation}: the layer itself, or with
    `after_norm` the last of the norm/noise modules that directly follow it in forward order
    (what the non-linearity receives: conv -> BN -> noise -> [ReLU])."""
    with measuring(model):
        trace = _Trace(model, inputs)
    names = _module_names(model)
    order = trace.leaf_order
    found = {}
    for k, m in enumerate(order):
        if not isinstance(m, WEIGHT_LAYERS) or names[m] in found:
            continue
        end = k
        while after_norm and end + 1 < len(order) and isinstance(order[end + 1], NORM_LIKE):
            end += 1
        found[names[m]] = order[end]
    return found


def activations(model: nn.Module, inputs: Tensor, layers: Sequence[str | int] | None = None,
                after_norm: bool = True) -> dict[str, Tensor]:
    """Each layer's activation (see `activation_modules`) on `inputs`, from one train-mode forward
    that leaves the model as it was."""
    where = activation_modules(model, inputs, after_norm)
    chosen = select_layers(list(where), layers)
    out: dict[str, Tensor] = {}
    hooks = [where[n].register_forward_hook(
        lambda m, a, y, n=n: out.setdefault(n, y.detach().clone())) for n in chosen]
    try:
        with measuring(model), torch.no_grad():
            model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return out


# --------------------------------------------------------------------------------------------
# Brute-force twins: the definitions written out naively (tests and benchmark only)
# --------------------------------------------------------------------------------------------
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


def _naive_grads(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor
                 ) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model(inputs), targets).backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters() if p.requires_grad}


def ics_bruteforce(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                   params_after: Mapping[str, Tensor], layers: Sequence[str | int] | None = None
                   ) -> dict[str, dict[str, float]]:
    """Definition 2.1 naively: for each layer a deep copy of the model, the parameters of every
    module that ran before the layer set to W^{t+1}, a full forward/backward."""
    order = _naive_order(model, inputs)
    modules = dict(model.named_modules())
    all_layers = [n for n in order if isinstance(modules[n], WEIGHT_LAYERS)]
    g = _naive_grads(copy.deepcopy(model).train(), loss_fn, inputs, targets)
    result = {}
    for name in select_layers(all_layers, layers):
        twin = copy.deepcopy(model).train()
        with torch.no_grad():
            for before in order[:order.index(name)]:
                for pname, p in twin.get_submodule(before).named_parameters(recurse=False):
                    p.copy_(params_after[f"{before}.{pname}" if before else pname])
        g_shift = _naive_grads(twin, loss_fn, inputs, targets)
        result[name] = _l2_cos(g[f"{name}.weight"], g_shift[f"{name}.weight"])
    return result


def landscape_bruteforce(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                         step_sizes: Sequence[float],
                         direction: Mapping[str, Tensor] | None = None) -> dict:
    """Section 3.2 naively: one deep copy of the model per step size, moved in place, full
    forward/backward."""
    g = _naive_grads(copy.deepcopy(model).train(), loss_fn, inputs, targets)
    d = g if direction is None else dict(direction)
    d_norm = _norm(list(d.values()))
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
        diff = _norm([g[n] - (p.grad if p.grad is not None else torch.zeros_like(p))
                      for n, p in twin.named_parameters() if p.requires_grad])
        losses.append(loss)
        diffs.append(diff)
        betas.append(diff / (eta * d_norm) if eta * d_norm > 0 else float("nan"))
    return {"step_sizes": list(step_sizes), "loss": losses, "grad_diff": diffs, "beta": betas,
            "loss_min": min(losses), "loss_max": max(losses), "grad_diff_min": min(diffs),
            "grad_diff_max": max(diffs), "beta_eff": max(betas),
            "grad_norm": _norm(list(g.values())), "direction_norm": d_norm}


# --------------------------------------------------------------------------------------------
# Curvature: the Hessian of the loss over all trainable parameters, through Hessian-vector
# products (double backward). Vectors are lists of tensors shaped like the parameters.
# --------------------------------------------------------------------------------------------
class _HVP:
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
        hv = _widen([hv_used[id(p)].detach() if id(p) in hv_used else torch.zeros_like(p)
                     for p in self.params])
        return _all_mean(hv) if self.sync else list(hv)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum(float(torch.vdot(x.reshape(-1).double(), y.reshape(-1).double()))
                     for x, y in zip(a, b)))


def _axpy(alpha: float, x: Sequence[Tensor], y: list[Tensor]) -> None:
    """y += alpha x, in place."""
    torch._foreach_add_(y, list(x), alpha=alpha)


def _scaled(x: Sequence[Tensor], alpha: float) -> list[Tensor]:
    return list(torch._foreach_mul(list(x), alpha))


def _random_vector(params: Sequence[Tensor], gen: torch.Generator, rademacher: bool = False
                   ) -> list[Tensor]:
    """Gaussian (or Rademacher +-1) entries from a private CPU generator: the global RNG is
    untouched and every process draws the same vector."""
    out = []
    for p in params:
        if rademacher:
            t = torch.randint(0, 2, p.shape, generator=gen).mul_(2).sub_(1)
        else:
            t = torch.randn(p.shape, generator=gen)
        out.append(_wide(t.to(p.device, p.dtype)))
    return out


def _lanczos(hvp: Callable[[list[Tensor]], list[Tensor]], start: list[Tensor], k: int, tol: float,
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
    norm = math.sqrt(_dot(q, q))
    q = _scaled(q, 1.0 / norm)
    theta, s, worst = None, None, float("inf")
    for j in range(min(max_iter, n)):
        basis.append(q)
        w = hvp(q)
        alpha = _dot(w, q)
        alphas.append(alpha)
        _axpy(-alpha, q, w)
        if j > 0:
            _axpy(-betas[j - 1], basis[j - 1], w)
        for _ in range(2):  # full reorthogonalization, twice is enough (Parlett)
            for b in basis:
                _axpy(-_dot(w, b), b, w)
        beta = math.sqrt(max(_dot(w, w), 0.0))
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
            w = _random_vector(q, gen)
            for _ in range(2):
                for b in basis:
                    _axpy(-_dot(w, b), b, w)
            beta_next = 0.0
            w_norm = math.sqrt(_dot(w, w))
            q = _scaled(w, 1.0 / w_norm)
        else:
            beta_next = beta
            q = _scaled(w, 1.0 / beta)
        betas.append(beta_next)
    vectors = []
    for i in range(len(theta)):
        u = [torch.zeros_like(t) for t in start]
        for coef, b in zip(s[:, i], basis):
            _axpy(float(coef), b, u)
        vectors.append(u)
    return np.asarray(theta), vectors, worst


def _power(hvp: Callable[[list[Tensor]], list[Tensor]], start: list[Tensor], tol: float,
           max_iter: int) -> tuple[float, list[Tensor], float]:
    """Power iteration as PyHessian runs it (largest |eigenvalue|), stopped when the eigenvalue
    estimate changes by <= tol relative; also returns the final relative residual."""
    v = _scaled(start, 1.0 / math.sqrt(_dot(start, start)))
    eig, hv = None, hvp(v)
    for _ in range(max_iter):
        new = _dot(hv, v)
        v = _scaled(hv, 1.0 / math.sqrt(_dot(hv, hv)))
        hv = hvp(v)
        if eig is not None and abs(new - eig) <= tol * abs(eig):
            eig = new
            break
        eig = new
    eig = _dot(hv, v)
    res = list(hv)
    _axpy(-eig, v, res)
    return eig, v, math.sqrt(_dot(res, res)) / max(abs(eig), 1e-30)


def hessian_eigs(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    init: Sequence[Mapping[str, Tensor]] | Mapping[str, Tensor] | None = None,
    method: str = "lanczos",
    seed: int = 0,
    params: Params = None,
    sync: bool | None = None,
) -> dict:
    """The k largest (algebraic) eigenvalues of the Hessian of the loss over all trainable
    parameters (or the block of those `params` selects: layer numbers, parameter names or module
    paths, see `parameter_names`), at the model's parameters on this batch (train mode, batch
    statistics).

    method "lanczos" (default): Lanczos with full reorthogonalization, stopped when every Ritz
    pair has relative residual ||H u - theta u|| / |theta| <= tol (the eigenvalue itself is then
    far more accurate: its error is about residual^2 / gap). `init` warm-starts it: the vectors
    of a previous call (parameter name -> tensor; their sum starts the Krylov space), else a
    Gaussian vector from `seed`. method "power": cold power iteration as PyHessian runs it (k=1
    only, largest |eigenvalue|), stopped when the estimate changes by <= tol relative.

    Returns eigenvalues (descending), vectors (one {name: tensor} per eigenvalue, unit norm over
    all parameters), hvps (Hessian-vector products spent) and residual (largest relative one).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power'; got {method!r}")
    if method == "power" and k != 1:
        raise ValueError("method 'power' finds one eigenvalue; use k=1")
    sync = _sync_default(sync)
    gen = torch.Generator().manual_seed(seed)
    names = parameter_names(model, inputs, params)
    with measuring(model) as state:
        params = [state.params[n] for n in names]
        hvp = _HVP(model, loss_fn, inputs, targets, params, sync)
        start = _random_vector(params, gen)
        if init:
            inits = [init] if isinstance(init, Mapping) else list(init)
            warm = [torch.zeros_like(t) for t in start]
            for vec in inits:
                _axpy(1.0, [_wide(vec[n].detach().to(t.device)) for n, t in zip(names, warm)],
                      warm)
            if _dot(warm, warm) > 0:
                start = warm
        if method == "lanczos":
            evals, vecs, residual = _lanczos(hvp, start, k, tol, max_iter, gen)
            evals = [float(e) for e in evals]
        else:
            e, v, residual = _power(hvp, start, tol, max_iter)
            evals, vecs = [e], [v]
        del hvp.grads  # free the double-backward graph before leaving
    return {"eigenvalues": evals,
            "vectors": [dict(zip(names, [t.detach() for t in v])) for v in vecs],
            "hvps": hvp.count, "residual": residual}


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    samples: int = 32,
    *,
    seed: int = 0,
    params: Params = None,
    sync: bool | None = None,
) -> dict:
    """Hutchinson's estimate of the Hessian trace (of the block `params` selects, as in
    hessian_eigs): the mean of z^T H z over `samples` Rademacher vectors z (a private generator
    from `seed`: the global RNG is untouched, every process draws the same z). Returns trace, se
    (its standard error: the sample std over sqrt(samples); 0 for a diagonal Hessian, where every
    z^T H z is the trace), samples and hvps."""
    if samples < 2:
        raise ValueError(f"samples must be >= 2 (for a standard error); got {samples}")
    sync = _sync_default(sync)
    gen = torch.Generator().manual_seed(seed)
    names = parameter_names(model, inputs, params)
    with measuring(model) as state:
        params = [state.params[n] for n in names]
        hvp = _HVP(model, loss_fn, inputs, targets, params, sync)
        values = []
        for _ in range(samples):
            z = _random_vector(params, gen, rademacher=True)
            values.append(_dot(z, hvp(z)))
        del hvp.grads
    v = np.asarray(values)
    return {"trace": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(samples)),
            "samples": samples, "hvps": hvp.count}


def hessian_dense(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor
                  ) -> tuple[Tensor, list[str]]:
    """The full Hessian in float64 over the flattened trainable parameters (in named_parameters
    order), by torch.autograd.functional.hessian on a float64 deep copy in train mode through
    torch.func.functional_call: the twin of hessian_eigs/hessian_trace for small models."""
    twin = copy.deepcopy(model).double().train()
    names = [n for n, p in twin.named_parameters() if p.requires_grad]
    shapes = [twin.get_parameter(n).shape for n in names]
    flat = torch.cat([twin.get_parameter(n).detach().reshape(-1) for n in names])
    buffers = {n: b.clone() for n, b in twin.named_buffers()}
    x = inputs.double() if inputs.is_floating_point() else inputs
    t = targets.double() if targets.is_floating_point() else targets

    def loss(w: Tensor) -> Tensor:
        params, i = {}, 0
        for n, shape in zip(names, shapes):
            size = math.prod(shape)
            params[n] = w[i:i + size].view(shape)
            i += size
        out = torch.func.functional_call(twin, {**params, **{n: b.clone() for n, b in
                                                             buffers.items()}}, (x,))
        return loss_fn(out, t)

    return torch.autograd.functional.hessian(loss, flat), names


# --------------------------------------------------------------------------------------------
# Theorem 4.1 on live training: BN's effect on the gradient w.r.t. its input
# --------------------------------------------------------------------------------------------
def bn_modules(model: nn.Module, inputs: Tensor) -> dict[str, nn.Module]:
    """{layer: the BatchNorm module that normalizes its output} for every Conv/Linear layer
    directly followed (in forward order, through other norm-like modules) by a BatchNorm."""
    with measuring(model):
        trace = _Trace(model, inputs)
    names = _module_names(model)
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
    sync = _sync_default(sync)
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
        sums = _all_mean(sums)
    out = {}
    for n, m, s in zip(chosen, sizes, sums):
        lhs, rp, rm, re, hp, hm = (float(v) for v in s)
        out[n] = {"m": m, "lhs": lhs, "rhs_printed": rp, "rhs_rederived": rm, "rhs_exact": re,
                  "ratio_printed": lhs / rp if rp != 0 else float("nan"),
                  "ratio_rederived": lhs / rm if rm != 0 else float("nan"),
                  "ratio_exact": lhs / re if re != 0 else float("nan"),
                  "holds_printed": hp, "holds_rederived": hm}
    return out


def __getattr__(name: str):
    # the density and the surfaces live in their own modules (spectrum.py imports Lightning for
    # its instrument): re-exported here, imported on first use
    where = {"hessian_density": "bnstudy.spectrum", "loss_surface": "bnstudy.surface"}
    if name in where:
        import importlib

        return getattr(importlib.import_module(where[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
