"""Loss surfaces: the loss on a 1-D or 2-D grid around the model's parameters W,
L(W + a d1 + b d2), along filter-normalized random directions (Li et al. 2018, "Visualizing the
loss landscape of neural nets"), the top Hessian eigenvectors, PCA directions of a trajectory, or
the segment to another checkpoint (1-D interpolation); `loss_surface_bruteforce` is its twin (a
deep copy of the model per point).

Measured on the loss the optimizer sees by default: train mode, BN with the batch's statistics,
the step's noisy-BN noise (`mode="eval"`: running statistics, as loss-landscape and PyHessian
evaluate). The model is left bit for bit as found (`measuring`); every point is computed
from W afresh (W + a d1 + b d2, never by accumulating steps), so a grid split into parts (Slurm
array tasks: `part=(i, n)`; DDP ranks: `distribute=True`) and merged equals the unsplit grid
exactly.

Filter normalization (Li et al. section 4): a Gaussian direction d, and for every parameter with
two or more dimensions (Conv/Linear weights) each filter d_f (a slice along the output dimension)
rescaled to the norm of the weights' filter: d_f <- d_f ||W_f|| / ||d_f||. Parameters of one
dimension (biases, BN's gamma and beta) are zeroed by default (`bias_bn="zero"`, loss-landscape's
`--xignore biasbn`, which every figure of the paper uses): one entry per unit, so a "filter" is
a scalar and its normalization would move each gamma by +-|gamma|, switching units off; a conv
bias before BN does nothing at all. `bias_bn="keep"` is loss-landscape's other option: the
direction there is the parameter itself.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnstudy.instruments.distributed import all_mean, sync_default
from bnstudy.instruments.state import assign, measuring
from bnstudy.instruments.trace import LossFn, Params, parameter_names
from bnstudy.instruments.vectors import wide

Direction = Mapping[str, Tensor]  # parameter name -> tensor shaped like it
NORMS = ("filter", "layer", "none")
BIAS_BN = ("zero", "keep")
MODES = ("train", "eval")


def filter_normalized_direction(model: nn.Module, seed: int = 0, *, norm: str = "filter",
                                bias_bn: str = "zero", names: Sequence[str] | None = None
                                ) -> dict[str, Tensor]:
    """A Gaussian direction over the trainable parameters (or `names`), from a private generator
    (the global RNG untouched; the same seed gives the same direction on every process), with
    `norm`: "filter" (each filter scaled to the weights' filter norm, see the module docstring),
    "layer" (each parameter tensor to the parameter's norm) or "none"; `bias_bn`: one-dimensional
    parameters "zero" (default) or "keep" (the parameter itself, as loss-landscape does)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    if bias_bn not in BIAS_BN:
        raise ValueError(f"bias_bn must be one of {', '.join(BIAS_BN)}; got {bias_bn!r}")
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad] if names is None else list(names)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        w = params[name].detach()
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        if w.dim() <= 1:
            d = torch.zeros_like(d) if bias_bn == "zero" else w.double().clone()
        elif norm == "filter":
            filters, w_filters = d.reshape(len(d), -1), w.double().reshape(len(w), -1)
            d = (filters * (w_filters.norm(dim=1) / (filters.norm(dim=1) + 1e-10))[:, None]
                 ).reshape(w.shape)
        elif norm == "layer":
            d = d * (w.double().norm() / d.norm())
        out[name] = d.to(w.device, w.dtype)
    return out


def difference(a: Direction, b: Direction) -> dict[str, Tensor]:
    """b - a: the direction from parameters a to parameters b (1-D interpolation)."""
    return {n: (b[n].detach() - a[n].detach()) for n in a}


def pca_directions(points: Sequence[Direction], center: Direction, k: int = 2,
                   bias_bn: str = "zero") -> tuple[list[dict[str, Tensor]], np.ndarray]:
    """The top-k principal directions (unit norm) of the trajectory `points` seen from `center`
    (the rows W_t - W_center, centred on their mean, as loss-landscape's PCA), over center's
    parameters, one-dimensional ones left out with bias_bn="zero". Returns the directions and
    their explained variance ratios."""
    if len(points) < k + 1:
        raise ValueError(f"PCA directions need at least {k + 1} points of the trajectory; "
                         f"got {len(points)}")
    names = [n for n in center if bias_bn == "keep" or center[n].dim() > 1]
    rows = torch.stack([torch.cat([(p[n].detach().double() - center[n].detach().double())
                                   .reshape(-1).cpu() for n in names]) for p in points])
    rows = rows - rows.mean(0)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    variance = (s ** 2).numpy()
    ratios = variance[:k] / max(variance.sum(), 1e-300)
    directions = []
    for v in vh[:k]:
        d, i = {}, 0
        for n, t in center.items():
            if n in names:
                d[n] = v[i:i + t.numel()].view(t.shape).to(t.device, t.dtype)
                i += t.numel()
            else:
                d[n] = torch.zeros_like(t)
        directions.append(d)
    return directions, ratios


def project(points: Sequence[Direction], center: Direction, directions: Sequence[Direction]
            ) -> np.ndarray:
    """Coordinates (len(points) x len(directions)) of W_t - W_center in the directions' span,
    by least squares (random directions are not exactly orthogonal)."""
    names = list(directions[0])

    def flat(v: Direction) -> Tensor:
        return torch.cat([v[n].detach().double().reshape(-1).cpu() for n in names])

    basis = torch.stack([flat(d) for d in directions], dim=1)
    c = flat(center)
    rows = torch.stack([flat(p) - c for p in points], dim=1)
    return torch.linalg.lstsq(basis, rows).solution.T.numpy()


def grid_points(coords: Sequence[np.ndarray], part: tuple[int, int] | None) -> list[tuple]:
    """(flat index, coefficients) of the grid points part i of n evaluates: every n-th point
    from i in C order (spread over the grid, so the parts take alike time)."""
    shape = tuple(len(c) for c in coords)
    i, n = part or (0, 1)
    return [(k, tuple(float(c[j]) for c, j in zip(coords, np.unravel_index(k, shape))))
            for k in range(i, math.prod(shape), n)]


def loss_surface(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    directions: Sequence[Direction] | None = None,
    coords: Sequence[Sequence[float]] | None = None,
    *,
    grid: int = 41,
    span: float = 1.0,
    seed: int = 0,
    norm: str = "filter",
    bias_bn: str = "zero",
    params: Params = None,
    mode: str = "train",
    part: tuple[int, int] | None = None,
    distribute: bool = False,
    sync: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """The loss at W + sum_i c_i d_i on a grid: `directions` (one: a 1-D curve, two: a surface;
    default two filter-normalized random directions from seeds `seed` and `seed` + 1, over the
    parameters `params` selects), `coords` per direction (default `grid` points in
    [-span, span]).

    mode "train" (default): BN normalizes with the batch's statistics (the loss the optimizer
    sees); "eval": with the running statistics. part=(i, n): only every n-th point from i (Slurm
    array tasks; merge the parts with `merge_surfaces`). distribute=True (under DDP): the ranks
    split the grid among them and all get the whole of it (every rank must pass the same batch).
    Otherwise, under DDP (`sync`, the default when a process group is initialized) every rank
    evaluates every point on its own batch and the losses are averaged, as the other probes do.
    `progress(1)` is called after every point.

    Returns coords, loss (shape: the coords' lengths; NaN at points of other parts), done (which
    points this call computed), mode, part and evaluations."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if part is not None and not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise ValueError(f"part must be (i, n) with 0 <= i < n; got {part}")
    if distribute and part is not None:
        raise ValueError("give part (Slurm tasks) or distribute (DDP ranks), not both")
    sync = sync_default(sync)
    if directions is None:
        names = parameter_names(model, inputs, params)
        directions = [filter_normalized_direction(model, seed + i, norm=norm, bias_bn=bias_bn,
                                                  names=names) for i in range(2)]
    if not 1 <= len(directions) <= 2:
        raise ValueError(f"give one or two directions; got {len(directions)}")
    if coords is None:
        coords = [np.linspace(-span, span, grid) for _ in directions]
    coords = [np.asarray(c, dtype=float) for c in coords]
    if len(coords) != len(directions):
        raise ValueError(f"one coords array per direction; got {len(coords)} for "
                         f"{len(directions)} directions")
    if distribute and sync:
        part = (dist.get_rank(), dist.get_world_size())
    loss = np.full(tuple(len(c) for c in coords), np.nan)
    done = np.zeros(loss.shape, dtype=bool)
    names = list(directions[0])
    if any(sorted(d) != sorted(names) for d in directions):
        raise ValueError("the directions must be over the same parameters")
    points = grid_points(coords, part)
    with measuring(model) as state:
        if mode == "eval":
            model.eval()
        params = [state.params[n] for n in names]
        base = [state.saved[n] for n in names]
        steps = [[d[n].to(p.device, p.dtype) for n, p in zip(names, params)]
                 for d in directions]
        with torch.no_grad():
            for k, cs in points:
                values = [w.clone() for w in base]
                for c, d in zip(cs, steps):
                    torch._foreach_add_(values, d, alpha=c)
                assign(params, values)
                value = wide(loss_fn(model(inputs), targets).detach()).reshape(1)
                if sync and not distribute:
                    value = all_mean([value])[0]
                loss.flat[k], done.flat[k] = float(value), True
                if progress is not None:
                    progress(1)
    if distribute and sync:
        loss, done = _gather_parts(loss, done)
    return {"coords": coords, "loss": loss, "done": done, "mode": mode,
            "part": part or (0, 1), "evaluations": len(points)}


def loss_surface_bruteforce(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                            directions: Sequence[Direction], coords: Sequence[Sequence[float]],
                            mode: str = "train") -> np.ndarray:
    """The twin of loss_surface, from the definition: a deep copy of the model per grid point, its
    parameters set to W + sum_i c_i d_i, one forward in `mode`."""
    coords = [np.asarray(c, dtype=float) for c in coords]
    out = np.zeros(tuple(len(c) for c in coords))
    for index in np.ndindex(*out.shape):
        twin = copy.deepcopy(model).train(mode == "train")
        with torch.no_grad():
            for name, p in twin.named_parameters():
                if name in directions[0]:
                    p.add_(sum(float(c[i]) * d[name] for c, i, d in zip(coords, index,
                                                                        directions)))
            out[index] = float(loss_fn(twin(inputs), targets))
    return out


def _gather_parts(loss: np.ndarray, done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's points, on every rank: each point is computed by exactly one rank, so the sum
    of (value or 0) over ranks is that value, bit for bit."""
    both = torch.tensor(np.stack([np.where(done, loss, 0.0), done.astype(float)]),
                        dtype=torch.float64)
    dist.all_reduce(both)
    merged, count = both[0].numpy(), both[1].numpy()
    return np.where(count > 0, merged, np.nan), count > 0


def merge_surfaces(parts: Sequence[dict]) -> dict:
    """One surface from the parts of a split grid (loss_surface with part=(i, n), i = 0..n-1):
    refuses parts of different grids, points computed twice, and points no part computed."""
    if not parts:
        raise ValueError("no parts to merge")
    first = parts[0]
    loss = np.full(first["loss"].shape, np.nan)
    done = np.zeros(loss.shape, dtype=bool)
    for p in parts:
        if p["loss"].shape != loss.shape or any(
                not np.array_equal(a, b) for a, b in zip(p["coords"], first["coords"])):
            raise ValueError("parts of different grids: the coords differ")
        if p["mode"] != first["mode"]:
            raise ValueError(f"parts in different modes: {p['mode']} and {first['mode']}")
        if (done & p["done"]).any():
            raise ValueError(f"part {p['part']} computes points another part computed")
        loss[p["done"]] = p["loss"][p["done"]]
        done |= p["done"]
    if not done.all():
        raise ValueError(f"{int((~done).sum())} of {done.size} points missing: not every part "
                         "was given")
    return {**first, "loss": loss, "done": done, "part": (0, 1),
            "evaluations": sum(p["evaluations"] for p in parts)}


def interpolate(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                target: Direction, alphas: Sequence[float] | None = None, **kw) -> dict:
    """The loss along the line from the model's parameters W (alpha 0) to `target` (alpha 1, e.g.
    another checkpoint's parameters): L(W + alpha (target - W)), 1-D `loss_surface` (default
    alphas: 41 points in [-0.5, 1.5], as loss-landscape's 1-D interpolation)."""
    params = dict(model.named_parameters())
    direction = difference({n: params[n] for n in target}, target)
    alphas = np.linspace(-0.5, 1.5, 41) if alphas is None else alphas
    return loss_surface(model, loss_fn, inputs, targets, [direction], [alphas], **kw)
