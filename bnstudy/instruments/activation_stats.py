"""Activations: what each layer's non-linearity receives (after its norm and noise), recorded in
the step's own forward. `activations` reads them on any model, `ActivationStats` logs their
moments, step-to-step drift, quantiles and histograms during training."""
from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import Tensor, nn

from bnstudy.instruments.distributed import gather_columns, unit_moments
from bnstudy.instruments.probe import Layers, Probe, Step, layer_keys
from bnstudy.instruments.state import measuring
from bnstudy.instruments.trace import NORM_LIKE, WEIGHT_LAYERS, Trace, module_names, select_layers


def activation_modules(model: nn.Module, inputs: Tensor, after_norm: bool = True
                       ) -> dict[str, nn.Module]:
    """{layer: module whose output is that layer's activation}: the layer itself, or with
    `after_norm` the last of the norm/noise modules that directly follow it in forward order
    (what the non-linearity receives: conv -> BN -> noise -> [ReLU])."""
    with measuring(model):
        trace = Trace(model, inputs)
    names = module_names(model)
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


class ActivationStats(Probe):
    """Activations of `units` fixed random units (channels) per layer, recorded in the step's own
    forward (no extra pass). A layer's activation is what its non-linearity receives (after its
    norm and noise; `after_norm=False`: the Conv/Linear output). A unit's distribution is over the
    batch, and height x width for conv layers.

    Logs act/layerNN/mean and var (averaged over the units; NN: the layer number), dmean and dvar
    (mean over units of |mean_t - mean_{t-1}| and |var_t - var_{t-1}|: the step-to-step change of
    figure 8; step t - 1 is recorded too), and q05..q95 of the first unit; histograms of the first
    `histogram_units` units go to W&B as act/layerNN/u<unit>. Under DDP all of them are over the
    global batch.
    """

    name = "act"
    QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

    def __init__(self, layers: Layers = None, units: int = 8, histogram_units: int = 1,
                 after_norm: bool = True, seed: int = 0, every: int = 50,
                 log_spaced: bool = True, start: int = 0, stop: int | None = None):
        super().__init__(every, log_spaced, start, stop)
        self.layers = None if layers is None else list(layers)
        self.units, self.histogram_units = units, histogram_units
        self.after_norm, self.seed = after_norm, seed
        self._hooks: list | None = None
        self._where: dict[str, nn.Module] | None = None  # module path -> module recorded
        self._keys: dict[str, str] = {}  # module path -> layerNN
        self._units: dict[str, Tensor] = {}  # by module path
        self._step: Step | None = None
        self._values: dict[str, Tensor] = {}
        self._previous: tuple[int, dict[str, tuple[Tensor, Tensor]]] | None = None

    def active(self, t: int) -> bool:
        return self.due(t) or self.due(t + 1)

    def _install(self, step: Step) -> None:
        self._keys = layer_keys(step.net, step.inputs)
        where = activation_modules(step.net, step.inputs, self.after_norm)
        # numbers and paths resolve against all Conv/Linear layers, as in ICS; activation_modules
        # finds leaf layers only (a layer with parametrizations has none to hook)
        chosen = [n for n in select_layers(list(self._keys), self.layers) if n in where]
        self._where = {name: where[name] for name in chosen}
        # a compiled training forward must never see these hooks (each would break its graph):
        # then they are attached only around the probe's own eager forward
        self._hooks = [] if step.compiled else self._attach()

    def _attach(self) -> list:
        return [m.register_forward_hook(self._hook(name)) for name, m in self._where.items()]

    def _hook(self, name: str):
        def record(module, args, out):
            step = self._step
            if step is None or not step.in_training_forward or not module.training \
                    or name in self._values:
                return
            started = time.perf_counter()
            if name not in self._units:  # fixed for the run, the same on every process
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self._units))
                chosen = torch.randperm(out.shape[1], generator=gen)[:self.units]
                self._units[name] = chosen.sort().values.to(out.device)
            units = self._units[name]
            values = out.detach().index_select(1, units).float().transpose(0, 1)
            self._values[name] = values.reshape(len(units), -1)  # (units, batch x positions)
            self.hook_seconds += time.perf_counter() - started
        return record

    def step_start(self, step: Step) -> None:
        if self._where is None:
            self._install(step)
        self._step, self._values = step, {}

    def before_optimizer_step(self, step: Step) -> None:
        if not step.compiled or self._step is None:
            return
        # The training forward ran compiled: record in an eager forward of the step's batch at
        # the same weights W^t (parameters, buffers, noise and RNGs restored afterwards).
        hooks = self._attach()
        try:
            with measuring(step.net), torch.no_grad():
                step.in_training_forward = True
                step.net(step.inputs)
        finally:
            step.in_training_forward = False
            for h in hooks:
                h.remove()

    def step_end(self, step: Step) -> dict[str, float] | None:
        self._step = None
        names = list(self._values)
        if not names:
            return None
        means, variances = unit_moments([self._values[n] for n in names], step.sync)
        current = {n: (m, v) for n, m, v in zip(names, means, variances)}
        previous = self._previous
        self._previous = (step.index, current)
        if not self.due(step.index):
            self._values = {}
            return None
        metrics: dict[str, float] = {}
        for n in names:
            key = f"act/{self._keys[n]}"
            mean, var = current[n]
            metrics[f"{key}/mean"] = float(mean.mean())
            metrics[f"{key}/var"] = float(var.mean())
            if previous is not None and previous[0] == step.index - 1 and n in previous[1]:
                mean0, var0 = previous[1][n]
                metrics[f"{key}/dmean"] = float((mean - mean0).abs().mean())
                metrics[f"{key}/dvar"] = float((var - var0).abs().mean())
            values = self._values[n][:max(1, self.histogram_units)]
            if step.sync:  # quantiles and histograms over the global batch too
                values = gather_columns(values)
            first = values[0]
            if first.numel() > 16_000_000:  # torch.quantile's limit
                first = first[torch.linspace(0, first.numel() - 1, 1_000_000).long()]
            qs = torch.quantile(first, torch.tensor(self.QUANTILES, device=first.device))
            for q, v in zip(self.QUANTILES, qs.tolist()):
                metrics[f"{key}/q{round(q * 100):02d}"] = v
            for k in range(min(self.histogram_units, values.shape[0])):
                step.histograms[f"{key}/u{int(self._units[n][k])}"] = values[k]
        self._values = {}
        return metrics

    def teardown(self) -> None:
        for h in self._hooks or []:
            h.remove()
        self._hooks, self._where, self._step = None, None, None
