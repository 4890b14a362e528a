"""What a forward pass does: the order in which modules run, the Conv/Linear layers in that order
(layer i is the i-th one, as in the paper's figures; docs/protocol.md section 3), whether the model
is a chain of leaf modules, and the plain gradient the brute-force twins start from."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from bnstudy.instruments.state import measuring
from bnstudy.norms import BatchNoise, LpNorm


LossFn = Callable[[Tensor, Tensor], Tensor]


WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


# Modules that may sit between a weight layer and its non-linearity: the activation of a layer
# (activation statistics) is taken after them, i.e. what the non-linearity receives.
NORM_LIKE = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, BatchNoise, LpNorm,
             nn.Identity)


class Trace:
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


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, m in model.named_modules():
        names.setdefault(m, name)
    return names


def layer_names(model: nn.Module, inputs: Tensor) -> list[str]:
    """Module paths of the Conv/Linear layers in forward order (layer i = entry i - 1)."""
    with measuring(model):
        trace = Trace(model, inputs)
    return layers_in_order(model, trace)


def layers_in_order(model: nn.Module, trace: Trace) -> list[str]:
    names = module_names(model)
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


def naive_grads(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor
                 ) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model(inputs), targets).backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters() if p.requires_grad}
