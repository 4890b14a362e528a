"""Vectors as lists of tensors shaped like the parameters: norms, dot products, in-place updates
and random vectors from a private generator. Low-precision tensors are widened to float32
(float64 stays: the quadratic oracles run in it)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def total_norm(tensors: Sequence[Tensor]) -> float:
    """Euclidean norm of the tensors taken as one vector."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
        widen(tensors))).double()))


def wide(t: Tensor) -> Tensor:
    """float32, or float64 when it is already (the quadratic oracles run in float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def widen(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    if all(t.dtype in (torch.float32, torch.float64) for t in tensors):
        return tensors
    return [wide(t) for t in tensors]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """In float64, over the tensors taken as one vector (one product, not one a tensor)."""
    if not a:
        return 0.0
    return float(torch.dot(torch.cat([x.reshape(-1) for x in a]).double(),
                           torch.cat([y.reshape(-1) for y in b]).double()))


def axpy(alpha: float, x: Sequence[Tensor], y: list[Tensor]) -> None:
    """y += alpha x, in place."""
    torch._foreach_add_(y, list(x), alpha=alpha)


def scaled(x: Sequence[Tensor], alpha: float) -> list[Tensor]:
    return list(torch._foreach_mul(list(x), alpha))


def random_vector(params: Sequence[Tensor], gen: torch.Generator, rademacher: bool = False
                   ) -> list[Tensor]:
    """Gaussian (or Rademacher +-1) entries from a private CPU generator: the global RNG is
    untouched and every process draws the same vector."""
    out = []
    for p in params:
        if rademacher:
            t = torch.randint(0, 2, p.shape, generator=gen).mul_(2).sub_(1)
        else:
            t = torch.randn(p.shape, generator=gen)
        out.append(wide(t.to(p.device, p.dtype)))
    return out
