"""Normalization layers compared in the study, and one factory that builds any of them.

Norms (model.norm; docs/protocol.md sections 4 and 5):
  none         identity
  batch        torch BatchNorm (batch statistics in train mode, running statistics in eval)
  noisy_batch  BatchNorm followed by BatchNoise (algorithm 1 of the paper)
  noise        BatchNoise alone: the same noise in a network without BN (claim 2's control)
  l1, l2, linf LpNorm: y_hat = (y - mean_B y) / (mean_B |y|^p)^(1/p)  (max_B |y| for p = inf)
  layer        LayerNorm over all features of a sample (GroupNorm with one group for conv maps)
  group        GroupNorm

"Batch" B is the batch for linear layers and batch x height x width for conv layers: statistics
are per unit (channel).
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

NORM_KINDS = ("none", "batch", "noisy_batch", "noise", "l1", "l2", "linf", "layer", "group")


@dataclass
class NoiseConfig:
    """Constants of noisy BN (paper appendix A.2.1, algorithm 1)."""

    n_mu: float = 0.5  # per-unit mean shift mu_j ~ U(-n_mu, n_mu)
    n_sigma: float = 1.25  # per-unit scale sigma_j ~ U(1, n_sigma)
    r_mu: float = 0.1  # per-sample shift m_ij ~ U(mu_j - r_mu, mu_j + r_mu)
    r_sigma: float = 0.1  # per-sample scale s_ij ~ N(sigma_j, r_sigma)
    in_eval: bool = False  # apply noise in eval mode too (paper: silent; default no)
    seed: int | None = None  # noise seed; None: the run's seed (seed_everything)


# checkpoints hold NoiseConfig in their hyperparameters; let torch.load(weights_only=True) read it
torch.serialization.add_safe_globals([NoiseConfig])


class BatchNoise(nn.Module):
    """a_ij <- s_ij * a_ij + m_ij, with fresh (s, m) drawn once per training step.

    The noise is drawn at the first forward after `resample()` (the training forward of the step)
    and then held fixed, so every probe of that step sees the noise the optimizer saw. It is drawn
    from the layer's own generator, so it never touches the global RNG; the generator state and
    the held noise travel in the module's state_dict (extra state), so a resumed run draws the
    same noise as one never stopped.
    """

    def __init__(self, cfg: NoiseConfig | None = None, layer_index: int = 0):
        super().__init__()
        self.cfg = cfg or NoiseConfig()
        self.layer_index = layer_index
        # seed None follows the run's seed, so runs with different seeds get different noise
        self.seed = self.cfg.seed if self.cfg.seed is not None else torch.initial_seed()
        self.generator: torch.Generator | None = None
        self.scale: torch.Tensor | None = None  # s, shape of the activation
        self.shift: torch.Tensor | None = None  # m, shape of the activation
        self.stale = True  # the next training forward draws new noise
        self._loaded_state: torch.Tensor | None = None
        self._eval_generator: torch.Generator | None = None
        self._eval_seed: int | None = None  # set by noise_in_eval
        self._seeded_eval: torch.Generator | None = None
        self._unit_affine: tuple | None = None  # (key, times, plus) of sample's per-unit op

    def resample(self) -> None:
        self.stale = True

    def _seeded(self, device: torch.device, stream: int) -> torch.Generator:
        # one stream per layer, DDP rank and use (0 training, 1 eval): a rank's samples get
        # their own noise, and evaluation never moves the training noise sequence
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = self.seed + 1_000_003 * self.layer_index + 998_244_353 * rank + 7_919 * stream
        return torch.Generator(device=device).manual_seed(seed % 2**63)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = self._seeded(device, stream=0)
            if self._loaded_state is not None:  # from a checkpoint: continue its sequence
                self.generator.set_state(self._loaded_state)
                self._loaded_state = None
        return self.generator

    def sample(self, like: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale s, shift m) shaped like the activation, per algorithm 1."""
        c = self.cfg
        units = like.shape[1]
        unit_shape = (1, units) + (1,) * (like.dim() - 2)
        opts = dict(device=like.device, dtype=torch.float32, generator=g)
        # per unit: mu_j ~ U(-n_mu, n_mu) and sigma_j ~ U(1, n_sigma), turned into mu_j - r_mu
        # and sigma_j by one op: on the DLN's 10 units an op costs about what it does on 10,000
        # values, and a noisy-BN DLN step spent a third of its time in sample. On the CPU one
        # draw of both rows takes the generator's values in the order two draws took them; a
        # CUDA generator gives each draw its own offset, so there the two draws stay two
        key = (like.device, c.n_mu, c.n_sigma, c.r_mu)
        if self._unit_affine is None or self._unit_affine[0] != key:
            const = dict(device=like.device, dtype=torch.float32)
            self._unit_affine = (key, torch.tensor([[2 * c.n_mu], [c.n_sigma - 1]], **const),
                                 torch.tensor([[-c.n_mu - c.r_mu], [1.0]], **const))
        _, times, plus = self._unit_affine
        if like.device.type == "cpu":
            u = torch.rand((2, units), **opts)
        else:
            u = torch.cat([torch.rand((1, units), **opts), torch.rand((1, units), **opts)])
        per_unit = torch.addcmul(plus, u, times)
        # m_ij = (mu_j - r_mu) + 2 r_mu U(0, 1) and s_ij = sigma_j + r_sigma N(0, 1), each one
        # pass written over its draw (these tensors are as large as the activation)
        shift = torch.rand(like.shape, **opts)
        shift = torch.add(per_unit[0].view(unit_shape), shift, alpha=2 * c.r_mu, out=shift)
        scale = torch.randn(like.shape, **opts)
        scale = torch.add(per_unit[1].view(unit_shape), scale, alpha=c.r_sigma, out=scale)
        return scale.to(like.dtype), shift.to(like.dtype)

    def draw(self, like: torch.Tensor) -> None:
        self.scale, self.shift = self.sample(like, self._generator(like.device))
        self.stale = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if self._eval_seed is not None:  # noise_in_eval: a stream of this evaluation's own
                if self._seeded_eval is None or self._seeded_eval.device != x.device:
                    self._seeded_eval = self._seeded(x.device, stream=2 + self._eval_seed)
                gen = self._seeded_eval
            elif self.cfg.in_eval:
                if self._eval_generator is None or self._eval_generator.device != x.device:
                    self._eval_generator = self._seeded(x.device, stream=1)
                gen = self._eval_generator
            else:
                return x
            scale, shift = self.sample(x, gen)  # fresh, not held
            return x * scale + shift
        if self.stale or self.scale is None or self.scale.shape != x.shape:
            self.draw(x)
        return x * self.scale + self.shift

    def get_extra_state(self):
        gen = self.generator.get_state() if self.generator is not None else None
        return {"generator": gen, "scale": self.scale, "shift": self.shift, "stale": self.stale}

    def set_extra_state(self, state) -> None:
        self.generator, self._loaded_state = None, state.get("generator")
        self.scale, self.shift, self.stale = state["scale"], state["shift"], state["stale"]

    def save_state(self) -> tuple:
        """What a forward may change: the held noise, whether it is stale, the training generator
        and its position. A measurement saves it and `restore_state` puts it back, so its forwards
        leave the noise sequence of the run as they found it."""
        gen = self.generator
        return (self.scale, self.shift, self.stale, gen,
                None if gen is None else gen.get_state(), self._loaded_state)

    def restore_state(self, state: tuple) -> None:
        self.scale, self.shift, self.stale, gen, gen_state, self._loaded_state = state
        self.generator = gen
        if gen is not None:
            gen.set_state(gen_state)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self.cfg).items()) + f", seed={self.seed}"


def _lp_stats(x: torch.Tensor, p: float, eps: float, dims: list[int]):
    """Per-unit (mean, stat, norm): stat is what the running average tracks, norm the divisor."""
    mean = x.mean(dim=dims)
    if p == math.inf:
        stat = x.abs().amax(dim=dims)
        return mean, stat, stat + eps
    if p == 1:
        stat = x.abs().mean(dim=dims).add(eps)
    else:
        stat = x.square().mean(dim=dims).add(eps).sqrt()
    return mean, stat, stat


def _normalize(x, weight, bias, mean, norm, shape):
    """(x - mean) / norm * weight + bias as one pass over x, with its per-unit scale: the scale
    and shift are vectors, and the DLN's tiny layers are bound by the number of ops."""
    scale = weight / norm
    return torch.addcmul((bias - mean * scale).view(shape), x, scale.view(shape)), scale


def _lp_reference(x, weight, bias, p, eps, dims, shape):
    """The definition as autograd differentiates it: what _LpNormFn computes, op by op."""
    mean, _, norm = _lp_stats(x, p, eps, dims)
    return _normalize(x, weight, bias, mean, norm, shape)[0]


class _LpNormFn(torch.autograd.Function):
    """LpNorm's training forward with its gradient written out: about half the ops autograd
    records for the definition (a DLN step with an lp norm is bound by the number of ops on its
    tiny layers, not by their arithmetic). A backward that itself needs a graph (create_graph:
    the Hessian-vector products of Curvature) goes through `_lp_reference` instead, so second
    derivatives are autograd's own."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, dims, shape):
        p, eps = layer.p, layer.eps
        mean, stat, norm = _lp_stats(x, p, eps, dims)
        y, scale = _normalize(x, weight, bias, mean, norm, shape)
        # the running averages here, where autograd records nothing: the statistics need not
        # leave the function as outputs (each output of an autograd.Function costs as much as
        # an op here, and a DLN step has 24 of these layers)
        layer.running_mean.lerp_(mean.to(layer.running_mean.dtype), layer.momentum)
        layer.running_norm.lerp_(stat.to(layer.running_norm.dtype), layer.momentum)
        ctx.save_for_backward(x, weight, bias, mean, stat, norm, scale)
        ctx.p, ctx.eps, ctx.dims, ctx.shape = p, eps, dims, shape
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, mean, stat, norm, scale = ctx.saved_tensors
        p, dims, shape = ctx.p, ctx.dims, ctx.shape
        if torch.is_grad_enabled():  # create_graph: differentiate the definition
            with torch.enable_grad():
                inputs = [t for t, need in zip((x, weight, bias), ctx.needs_input_grad) if need]
                grads = iter(torch.autograd.grad(
                    _lp_reference(x, weight, bias, p, ctx.eps, dims, shape), inputs, g,
                    create_graph=True))
            return (*(next(grads) if need else None for need in ctx.needs_input_grad[:3]),
                    None, None, None)
        n = x.numel() // x.shape[1]
        g_sum = g.sum(dim=dims)
        # dL/dscale = sum g (x - mean); y depends on norm only through scale = weight / norm
        d_scale = (g * x).sum(dim=dims) - mean * g_sum
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            d_norm = -d_scale * scale / norm  # dL/dnorm
            # y = scale x + bias - mean scale: through x directly and through mean
            grad_x = torch.addcmul((-scale * g_sum / n).view(shape), g, scale.view(shape))
            if p == 1:  # norm = mean |x| + eps
                grad_x.addcmul_(x.sign(), (d_norm / n).view(shape))
            elif p == 2:  # norm = sqrt(mean x^2 + eps)
                grad_x.addcmul_(x, (d_norm / (n * norm)).view(shape))
            else:  # norm = max |x| + eps: amax's gradient, shared evenly by ties as autograd does
                hit = x.abs() == stat.view(shape)
                ties = hit.sum(dim=dims, keepdim=True)
                grad_x.addcmul_(hit * x.sign(), d_norm.view(shape) / ties)
        if ctx.needs_input_grad[1]:
            grad_w = d_scale / norm
        grad_b = g_sum if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


@functools.cache
def _layout(rank: int) -> tuple[list[int], tuple[int, ...]]:
    """The dimensions statistics are taken over (all but the unit's) for an input of this rank,
    and the shape that broadcasts a per-unit vector over it."""
    return [0] + list(range(2, rank)), (1, -1) + (1,) * (rank - 2)


class LpNorm(nn.Module):
    """Fix the first moment as BN does, then divide by the lp norm of the raw activations.

        y_hat = (y - mean_B(y)) / (mean_B(|y|^p) + eps)^(1/p)      p = 1, 2
        y_hat = (y - mean_B(y)) / (max_B |y| + eps)                  p = inf
        z = gamma * y_hat + beta

    Statistics are per unit over B (batch, and height x width for conv maps), and the lp norm is
    taken "before the mean is shifted" (paper section 3.3), i.e. of y, not of y - mean. In eval
    mode running averages of the mean and the norm are used, as BN does.
    """

    def __init__(self, num_features: int, p: float, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if p not in (1, 2, math.inf):
            raise ValueError(f"LpNorm p must be 1, 2 or inf, got {p}")
        self.p, self.eps, self.momentum = p, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_norm", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims, shape = _layout(x.dim())
        if self.training:
            y = _LpNormFn.apply(x, self.weight, self.bias, self, dims, shape)
            self.num_batches_tracked.add_(1)
            return y
        norm = self.running_norm + self.eps if self.p == math.inf else self.running_norm
        return _normalize(x, self.weight, self.bias, self.running_mean, norm, shape)[0]

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, p={self.p}, eps={self.eps}"


class FeatureMajorBatchNorm1d(nn.BatchNorm1d):
    """torch's BatchNorm1d that normalizes a feature-major (batch, units) input (strides
    (1, batch), as the DLN's FeatureMajorLinear writes it) as the (1, units, batch) tensor it is
    in memory, and returns its output in the same layout.

    Why: given that layout, BatchNorm1d writes a row-major output, and the next layer's product
    then runs in the slow orientation (see FeatureMajorLinear); with every activation of the
    25-layer DLN kept one row per unit, a training step with BN ran about 1.3x faster (README,
    "The DLN's own step"). The statistics are the same ones (per unit, over the batch; the running
    variance's correction as before) up to float rounding: the sums run in another order. Any
    other input (row-major, (N, C, L)) goes to BatchNorm1d unchanged, bit for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.dim() == 2 and x.shape[0] > 1 and x.stride() == (1, x.shape[0])):
            return super().forward(x)
        if not (self.training and self.track_running_stats and self.momentum is not None):
            return super().forward(x.t().unsqueeze(0)).squeeze(0).t()
        # the training forward of BatchNorm1d's defaults, its call to torch.batch_norm written
        # out: the same kernel with the same arguments, so the same numbers bit for bit, without
        # _BatchNorm.forward's and F.batch_norm's Python checks (about 7 us of a 50 us layer)
        self.num_batches_tracked.add_(1)
        params, buffers = self._parameters, self._buffers
        return torch.batch_norm(
            x.t().unsqueeze(0), params["weight"], params["bias"], buffers["running_mean"],
            buffers["running_var"], True, self.momentum, self.eps,
            torch.backends.cudnn.enabled).squeeze(0).t()


def _groups(channels: int, wanted: int) -> int:
    """Largest divisor of `channels` that is at most `wanted` (width multipliers give odd sizes)."""
    return max(g for g in range(1, min(wanted, channels) + 1) if channels % g == 0)


def make_norm(
    norm: str,
    num_features: int,
    spatial: bool,
    noise: NoiseConfig | None = None,
    layer_index: int = 0,
    groups: int = 32,
) -> nn.Module:
    """The normalization layer `norm` (as the config key model.norm names it) for `num_features`
    units (channels when `spatial`)."""
    if norm == "none":
        return nn.Identity()
    if norm == "noise":
        return BatchNoise(noise, layer_index)
    if norm in ("batch", "noisy_batch"):
        bn = (nn.BatchNorm2d if spatial else FeatureMajorBatchNorm1d)(num_features)
        if norm == "batch":
            return bn
        return nn.Sequential(bn, BatchNoise(noise, layer_index))
    if norm in ("l1", "l2", "linf"):
        return LpNorm(num_features, {"l1": 1, "l2": 2, "linf": math.inf}[norm])
    if norm == "layer":
        return nn.GroupNorm(1, num_features) if spatial else nn.LayerNorm(num_features)
    if norm == "group":
        return nn.GroupNorm(_groups(num_features, groups), num_features)
    raise ValueError(f"norm must be one of {', '.join(NORM_KINDS)}; got {norm!r}")


@contextmanager
def noise_in_eval(model: nn.Module, seed: int):
    """Eval-mode forwards inside apply fresh noisy-BN noise (as `noise.in_eval=true` does), drawn
    from generators seeded by `seed` (with the layer and the DDP rank) instead of one running
    stream: the evaluation with the noise on is the same in every rerun and after a resume. The
    training noise is untouched."""
    layers = [m for m in model.modules() if isinstance(m, BatchNoise)]
    for m in layers:
        m._eval_seed, m._seeded_eval = int(seed), None
    try:
        yield
    finally:
        for m in layers:
            m._eval_seed, m._seeded_eval = None, None


def noise_off_in_eval(model: nn.Module) -> bool:
    """The model has noisy-BN layers whose noise is off in evaluation (the default)."""
    layers = [m for m in model.modules() if isinstance(m, BatchNoise)]
    return bool(layers) and not any(m.cfg.in_eval for m in layers)


def resample_noise(model: nn.Module) -> None:
    """Start a new training step: every noisy-BN layer draws new noise at its next forward."""
    for m in model.modules():
        if isinstance(m, BatchNoise):
            m.resample()
