"""The study's instruments during training: one Lightning callback, `Instruments`, drives any
number of probes, each a small class with a schedule (`ICS`, `Landscape`, `RandomLandscape`,
`ActivationStats`, `Curvature`, `BNGradientBound`).

Where each probe measures, in the training step t (automatic optimization):
  on_train_batch_start      the step's batch is known; activation hooks are armed
  (training_step forward)   ActivationStats records the armed layers' activations
  on_before_optimizer_step  parameters are W^t and .grad is the step's gradient g (DDP-averaged,
                            unclipped): Landscape/RandomLandscape measure here, reusing g;
                            Curvature and BNGradientBound measure here too (same W^t, batch);
                            ICS snapshots W^t and G
  on_train_batch_end        parameters are W^{t+1}, whatever the optimizer did (momentum, Adam,
                            weight decay): ICS loads W^t, calls probes.ics with W^{t+1}, puts
                            W^{t+1} back bit for bit
Probes run under the trainer's precision context (autocast for "bf16-mixed"), so they evaluate the
loss the optimizer saw and the reused gradient is consistent with the ones they compute.
Every probe leaves parameters, .grad, buffers, noise and RNGs as found: a run with the callback
follows the same trajectory as one without it, bit for bit.

Values go straight to the trainer's loggers (CSV, W&B) at step t, whatever `log_every_n_steps`
is, with keys ics/l2/layerNN, ics/cos/layerNN, landscape/..., landscape_random/...,
act/layerNN/..., curv/..., thm41/<key>/layerNN and time/<probe> (seconds the probe took in
that step). Histograms go only to a WandbLogger, when one is attached. layerNN is the paper's 1-based layer number (the NN-th
Conv/Linear module in forward order, `probes.layer_names`), zero-padded to two digits so keys sort:
module paths can differ between norm variants of one architecture (DLN layer 9 is layers.16 with
BN, layers.8 without), layer numbers do not, so BN and no-BN curves of one layer share a key.

The LightningModule must expose `net` (the nn.Module), `loss_fn(outputs, targets)` (the training
loss: training_step's loss must equal loss_fn(net(x), y)), and batches must be (inputs, targets).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from bnstudy import probes

Layers = Sequence[str | int] | None  # module paths, or 1-based layer numbers as in the paper


def layer_key(number: int, count: int) -> str:
    """'layer05' for layer 5: two digits (more if the model has 100 layers or more) so that
    keys sort in layer order."""
    return f"layer{number:0{max(2, len(str(count)))}d}"


def layer_keys(net: nn.Module, inputs: Tensor) -> dict[str, str]:
    """{module path: 'layerNN'} for every Conv/Linear layer of `net` (one measuring forward)."""
    names = probes.layer_names(net, inputs)
    return {name: layer_key(i + 1, len(names)) for i, name in enumerate(names)}


@dataclass
class Step:
    """What the probes of one training step get to see."""

    index: int  # t: optimizer steps taken before this one
    net: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    inputs: Tensor
    targets: Tensor
    sync: bool  # average over DDP processes
    lr: float | None = None  # the optimizer's current lr, known from on_before_optimizer_step
    grads: dict[str, Tensor] | None = None  # the step's .grad, only in on_before_optimizer_step
    in_training_forward: bool = True  # until on_before_optimizer_step
    # the training forward runs through torch.compile (model.compile): it calls no hooks, so
    # probes that record activations make their own eager forward instead
    compiled: bool = False
    histograms: dict[str, Tensor] = field(default_factory=dict)


class Probe:
    """One instrument: a schedule and up to three hooks, each returning metrics to log.

    Schedule: due at step t if (`every` > 0 and (t - start) % every == 0) or (`log_spaced` and t
    is 0 or a power of two), within [start, stop).
    """

    name = "probe"

    def __init__(self, every: int = 100, log_spaced: bool = True, start: int = 0,
                 stop: int | None = None):
        if every < 0:
            raise ValueError(f"every must be >= 0; got {every}")
        self.every, self.log_spaced, self.start, self.stop = every, log_spaced, start, stop
        self.hook_seconds = 0.0  # time spent inside the step's own forward (activation hooks)

    def due(self, t: int) -> bool:
        if t < self.start or (self.stop is not None and t >= self.stop):
            return False
        if self.every > 0 and (t - self.start) % self.every == 0:
            return True
        return self.log_spaced and (t == 0 or t & (t - 1) == 0)

    def active(self, t: int) -> bool:
        """Whether the probe's hooks run at step t (more steps than `due`, e.g. t - 1)."""
        return self.due(t)

    def step_start(self, step: Step) -> dict[str, float] | None:
        return None

    def before_optimizer_step(self, step: Step) -> dict[str, float] | None:
        return None

    def step_end(self, step: Step) -> dict[str, float] | None:
        return None

    def teardown(self) -> None:
        pass

    def state_dict(self) -> dict:
        """What the probe carries from one measurement to the next, saved in checkpoints so that
        a resumed run measures as one never stopped (most probes carry nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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
            result = probes.ics(step.net, step.loss_fn, step.inputs, step.targets, after,
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
        return probes.landscape(step.net, step.loss_fn, step.inputs, step.targets, sizes,
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
        return probes.random_landscape(step.net, step.loss_fn, step.inputs, step.targets, sizes,
                                       seed=self.seed * 1_000_003 + step.index, grads=grads,
                                       sync=step.sync)


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
        where = probes.activation_modules(step.net, step.inputs, self.after_norm)
        # numbers and paths resolve against all Conv/Linear layers, as in ICS; activation_modules
        # finds leaf layers only (a layer with parametrizations has none to hook)
        chosen = [n for n in probes.select_layers(list(self._keys), self.layers) if n in where]
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
            with probes.measuring(step.net), torch.no_grad():
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
        means, variances = _unit_moments([self._values[n] for n in names], step.sync)
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
                mean0, var0 = (t.to(mean.device) for t in previous[1][n])
                metrics[f"{key}/dmean"] = float((mean - mean0).abs().mean())
                metrics[f"{key}/dvar"] = float((var - var0).abs().mean())
            values = self._values[n][:max(1, self.histogram_units)]
            if step.sync:  # quantiles and histograms over the global batch too
                values = _gather_columns(values)
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

    def state_dict(self) -> dict:
        # the moments of step t - 1, recorded for dmean/dvar at a due step t: a run stopped
        # between the two (its checkpoint is of step t - 1) logs them when it resumes
        if self._previous is None:
            return {}
        index, moments = self._previous
        return {"previous_step": index,
                "previous": {n: [mean, var] for n, (mean, var) in moments.items()}}

    def load_state_dict(self, state: dict) -> None:
        if "previous" in state:
            self._previous = (state["previous_step"],
                              {n: (mean, var) for n, (mean, var) in state["previous"].items()})


class Curvature(Probe):
    """The true curvature beside landscape/beta_eff: the top Hessian eigenvalue(s) of the
    training loss over all trainable parameters, at W^t on the step's batch (where and when
    Landscape measures, so the two compare), by Lanczos on Hessian-vector products warm-started
    from the previous measurement's vectors (`probes.hessian_eigs`).

    Logs curv/lambda_max, curv/lambda_2 .. curv/lambda_k (k > 1), curv/residual (the largest
    relative residual ||H u - lambda u|| / |lambda|), curv/hvps (products spent), curv/two_over_lr
    (2 / lr: full-batch gradient descent on a quadratic diverges once lambda_max exceeds it, the
    "edge of stability" of Cohen et al. 2021; for momentum or Adam the threshold differs), and
    with `trace_samples` > 0 the Hutchinson estimate curv/trace and its standard error
    curv/trace_se.

    `fixed_batch=True` measures every time on the batch of the first measured step instead (each
    DDP process keeps its own, so the loss is that of the first global batch; saved in
    checkpoints): the sharpness of one fixed loss along the trajectory, as Cohen et al. track it
    on a fixed subset, free of batch-to-batch noise. The warm start then follows one surface and
    costs about half the products of the step's batch on VGG (bench/bench_curvature.py)."""

    name = "curv"

    def __init__(self, k: int = 1, tol: float = 1e-3, max_iter: int = 50,
                 trace_samples: int = 0, seed: int = 0, fixed_batch: bool = False,
                 every: int = 100, log_spaced: bool = True, start: int = 0,
                 stop: int | None = None):
        super().__init__(every, log_spaced, start, stop)
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        if trace_samples == 1 or trace_samples < 0:
            raise ValueError(f"trace_samples must be 0 (off) or >= 2; got {trace_samples}")
        self.k, self.tol, self.max_iter = k, tol, max_iter
        self.trace_samples, self.seed, self.fixed_batch = trace_samples, seed, fixed_batch
        self._vectors: list[dict[str, Tensor]] | None = None  # warm start
        # fixed_batch: every process's (inputs, targets), on the CPU, indexed by rank; all of
        # them so that the checkpoint (written by rank 0) resumes every rank on its own batch
        self._batches: list[tuple[Tensor, Tensor]] | None = None

    def _batch(self, step: Step) -> tuple[Tensor, Tensor]:
        if not self.fixed_batch:
            return step.inputs, step.targets
        world = torch.distributed.get_world_size() if step.sync else 1
        rank = torch.distributed.get_rank() if step.sync else 0
        if self._batches is not None and len(self._batches) != world:
            rank_zero_warn(f"Curvature(fixed_batch=True): the saved batches are of "
                           f"{len(self._batches)} processes, this run has {world}; measuring "
                           f"from now on on this step's batch as the new fixed one")
            self._batches = None
        if self._batches is None:
            mine = (step.inputs.detach().cpu().clone(), step.targets.detach().cpu().clone())
            if step.sync:
                self._batches = [None] * world
                torch.distributed.all_gather_object(self._batches, mine)
            else:
                self._batches = [mine]
        x, y = self._batches[rank]
        return x.to(step.inputs.device), y.to(step.targets.device)

    def before_optimizer_step(self, step: Step) -> dict[str, float]:
        seed = self.seed * 1_000_003 + step.index  # the same on every DDP process
        inputs, targets = self._batch(step)
        result = probes.hessian_eigs(step.net, step.loss_fn, inputs, targets, self.k,
                                     tol=self.tol, max_iter=self.max_iter, init=self._vectors,
                                     seed=seed, sync=step.sync)
        self._vectors = [{n: t.clone() for n, t in v.items()} for v in result["vectors"]]
        values = result["eigenvalues"]
        metrics = {"curv/lambda_max": values[0], "curv/residual": result["residual"],
                   "curv/hvps": float(result["hvps"]), "curv/two_over_lr": 2.0 / step.lr}
        for i, v in enumerate(values[1:], start=2):
            metrics[f"curv/lambda_{i}"] = v
        if self.trace_samples:
            trace = probes.hessian_trace(step.net, step.loss_fn, inputs, targets,
                                         self.trace_samples, seed=seed, sync=step.sync)
            metrics.update({"curv/trace": trace["trace"], "curv/trace_se": trace["se"]})
        return metrics

    def teardown(self) -> None:
        self._vectors = self._batches = None  # the next fit may train another model

    def state_dict(self) -> dict:
        # the warm start (and the fixed batch) survive a resume
        return {"vectors": self._vectors, "batches": self._batches}

    def load_state_dict(self, state: dict) -> None:
        self._vectors = state.get("vectors")
        self._batches = state.get("batches") if self.fixed_batch else None


class BNGradientBound(Probe):
    """Theorem 4.1 on live training (`probes.bn_gradient_bound`), for the BatchNorm after each
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
        result = probes.bn_gradient_bound(step.net, step.loss_fn, step.inputs, step.targets,
                                          self.layers, sync=step.sync)
        if self._keys is None:
            self._keys = layer_keys(step.net, step.inputs)
        return {f"thm41/{k}/{self._keys[n]}": v[k] for n, v in result.items() for k in self.KEYS}

    def teardown(self) -> None:
        self._keys = None


def _unit_moments(values: list[Tensor], sync: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Mean and (biased) variance of each row, over all processes' rows when `sync`."""
    if not sync:
        pairs = [torch.var_mean(v, dim=1, unbiased=False) for v in values]
        return [m for _, m in pairs], [v for v, _ in pairs]
    import torch.distributed as dist

    counts = torch.tensor([float(v.shape[1]) for v in values], device=values[0].device)
    sums = torch.cat([counts] + [v.double().sum(1) for v in values])
    dist.all_reduce(sums)
    n, offset = sums[:len(values)], len(values)
    means = []
    for i, v in enumerate(values):
        means.append(sums[offset:offset + v.shape[0]] / n[i])
        offset += v.shape[0]
    squares = torch.cat([(v.double() - m[:, None]).pow(2).sum(1) for v, m in zip(values, means)])
    dist.all_reduce(squares)
    variances, offset = [], 0
    for i, v in enumerate(values):
        variances.append((squares[offset:offset + v.shape[0]] / n[i]).float())
        offset += v.shape[0]
    return [m.float() for m in means], variances


def _gather_columns(values: Tensor) -> Tensor:
    """(units, n_rank) on each process -> (units, sum of n_rank), concatenated in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size()
    size = torch.tensor([values.shape[1]], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = torch.zeros(values.shape[0], longest, dtype=values.dtype, device=values.device)
    padded[:, :values.shape[1]] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:, :int(n)] for part, n in zip(parts, sizes)], dim=1)


class Instruments(Callback):
    """Runs `probes` during training on their schedules and logs what they measure (see the
    module docstring). `history` keeps (step, metrics) of every step that logged something."""

    def __init__(self, probes: list[Probe], keep_history: bool = True):
        super().__init__()
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ValueError(f"one probe of each kind per Instruments callback; got {names}")
        self.probes = list(probes)
        self.keep_history = keep_history
        self.history: list[tuple[int, dict[str, float]]] = []
        self._step: Step | None = None
        self._active: list[Probe] = []
        self._metrics: dict[str, float] = {}
        self._seconds: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.accumulate_grad_batches != 1:
            raise ValueError("Instruments measure one batch per optimizer step; "
                             "accumulate_grad_batches must be 1")
        for attr in ("net", "loss_fn"):
            if not hasattr(pl_module, attr):
                raise AttributeError(f"Instruments need pl_module.{attr}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for p in self.probes:
            p.teardown()

    def state_dict(self) -> dict:
        return {p.name: state for p in self.probes if (state := p.state_dict())}

    def load_state_dict(self, state_dict: dict) -> None:
        for p in self.probes:
            if p.name in state_dict:
                p.load_state_dict(state_dict[p.name])

    def _run(self, trainer: L.Trainer, probe: Probe, hook: str) -> None:
        started = time.perf_counter()
        with trainer.precision_plugin.forward_context():
            out = getattr(probe, hook)(self._step)
        self._seconds[probe.name] = self._seconds.get(probe.name, 0.0) + (
            time.perf_counter() - started)
        if out:
            self._metrics.update(out)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        t = trainer.global_step
        self._active = [p for p in self.probes if p.active(t)]
        self._step = None
        if not self._active:
            return
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError("Instruments expect batches of (inputs, targets)")
        self._step = Step(index=t, net=pl_module.net, loss_fn=pl_module.loss_fn,
                          inputs=batch[0], targets=batch[1], sync=trainer.world_size > 1,
                          compiled=bool(getattr(pl_module, "compiles_training_forward", False)))
        self._metrics, self._seconds = {}, {}
        for p in self._active:
            p.hook_seconds = 0.0
            self._run(trainer, p, "step_start")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = self._step
        if step is None:
            return
        step.in_training_forward = False
        step.lr = optimizer.param_groups[0]["lr"]
        step.grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
                      for n, p in step.net.named_parameters() if p.requires_grad}
        try:
            for p in self._active:
                self._run(trainer, p, "before_optimizer_step")
        finally:
            step.grads = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        step = self._step
        if step is None:
            return
        for p in self._active:
            self._run(trainer, p, "step_end")
        metrics = dict(self._metrics)
        for p in self._active:
            if p.due(step.index):
                metrics[f"time/{p.name}"] = self._seconds.get(p.name, 0.0) + p.hook_seconds
        self._log(trainer, step, metrics)
        self._step, self._active = None, []

    def _log(self, trainer: L.Trainer, step: Step, metrics: dict[str, float]) -> None:
        if self.keep_history and metrics:
            self.history.append((step.index, metrics))
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step.index)
        if step.histograms and trainer.is_global_zero:
            from lightning.pytorch.loggers import WandbLogger

            wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
            if wandb_loggers:
                import wandb

                # a diverging run has inf/nan activations: histogram the finite ones, if any
                finite = {k: v[torch.isfinite(v)] for k, v in step.histograms.items()}
                hists = {k: wandb.Histogram(v.cpu().numpy(), num_bins=64)
                         for k, v in finite.items() if v.numel()}
                for logger in wandb_loggers:
                    logger.log_metrics(hists, step=step.index)


__all__ = ["Instruments", "Probe", "ICS", "Landscape", "RandomLandscape", "ActivationStats",
           "Curvature", "BNGradientBound", "Step", "layer_key", "layer_keys"]
