"""The true curvature of the loss over all trainable parameters: the top Hessian eigenvalues
(`hessian_eigs`, warm-started Lanczos), the trace (`hessian_trace`, Hutchinson) and, for small
models, the dense float64 Hessian (`hessian_dense`, their twin). `Curvature` logs them during
training beside landscape/beta_eff and the 2/lr line."""
from __future__ import annotations

import copy
import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bnstudy.instruments.distributed import sync_default
from bnstudy.instruments.hvp import HVP, lanczos, power_iteration
from bnstudy.instruments.probe import Probe, Step
from bnstudy.instruments.state import measuring
from bnstudy.instruments.trace import LossFn
from bnstudy.instruments.vectors import axpy, dot, random_vector, wide


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
    sync: bool | None = None,
) -> dict:
    """The k largest (algebraic) eigenvalues of the Hessian of the loss over all trainable
    parameters, at the model's parameters on this batch (train mode, batch statistics).

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
    sync = sync_default(sync)
    gen = torch.Generator().manual_seed(seed)
    with measuring(model) as state:
        names = [n for n, p in state.params.items() if p.requires_grad]
        params = [state.params[n] for n in names]
        hvp = HVP(model, loss_fn, inputs, targets, params, sync)
        start = random_vector(params, gen)
        if init:
            inits = [init] if isinstance(init, Mapping) else list(init)
            warm = [torch.zeros_like(t) for t in start]
            for vec in inits:
                axpy(1.0, [wide(vec[n].detach().to(t.device)) for n, t in zip(names, warm)],
                      warm)
            if dot(warm, warm) > 0:
                start = warm
        if method == "lanczos":
            evals, vecs, residual = lanczos(hvp, start, k, tol, max_iter, gen)
            evals = [float(e) for e in evals]
        else:
            e, v, residual = power_iteration(hvp, start, tol, max_iter)
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
    sync: bool | None = None,
) -> dict:
    """Hutchinson's estimate of the Hessian trace: the mean of z^T H z over `samples` Rademacher
    vectors z (a private generator from `seed`: the global RNG is untouched, every process draws
    the same z). Returns trace, se (its standard error: the sample std over sqrt(samples); 0 for
    a diagonal Hessian, where every z^T H z is the trace), samples and hvps."""
    if samples < 2:
        raise ValueError(f"samples must be >= 2 (for a standard error); got {samples}")
    sync = sync_default(sync)
    gen = torch.Generator().manual_seed(seed)
    with measuring(model) as state:
        params = [p for p in state.params.values() if p.requires_grad]
        hvp = HVP(model, loss_fn, inputs, targets, params, sync)
        values = []
        for _ in range(samples):
            z = random_vector(params, gen, rademacher=True)
            values.append(dot(z, hvp(z)))
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


class Curvature(Probe):
    """The true curvature beside landscape/beta_eff: the top Hessian eigenvalue(s) of the
    training loss over all trainable parameters, at W^t on the step's batch (where and when
    Landscape measures, so the two compare), by Lanczos on Hessian-vector products warm-started
    from the previous measurement's vectors (`hessian_eigs`).

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
            from lightning.pytorch.utilities import rank_zero_warn  # the rest needs no Lightning

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
        result = hessian_eigs(step.net, step.loss_fn, inputs, targets, self.k,
                                     tol=self.tol, max_iter=self.max_iter, init=self._vectors,
                                     seed=seed, sync=step.sync)
        self._vectors = [{n: t.clone() for n, t in v.items()} for v in result["vectors"]]
        values = result["eigenvalues"]
        metrics = {"curv/lambda_max": values[0], "curv/residual": result["residual"],
                   "curv/hvps": float(result["hvps"]), "curv/two_over_lr": 2.0 / step.lr}
        for i, v in enumerate(values[1:], start=2):
            metrics[f"curv/lambda_{i}"] = v
        if self.trace_samples:
            trace = hessian_trace(step.net, step.loss_fn, inputs, targets,
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
