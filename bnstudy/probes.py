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
