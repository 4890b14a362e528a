"""Under torch.distributed (DDP) every gradient and loss a measurement computes is averaged over the
processes, as DDP averages the training gradient, so all ranks get the same numbers: `sync=None`
means "when a process group of more than one process is initialized". Activation statistics are
taken over the global batch (`unit_moments`, `gather_columns`)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bnstudy.instruments.vectors import wide


def sync_default(sync: bool | None) -> bool:
    if sync is not None:
        return sync
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_mean(tensors: list[Tensor]) -> list[Tensor]:
    """The mean over processes of each tensor, in one all_reduce."""
    flat = torch.cat([wide(t.detach()).reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return out


def unit_moments(values: list[Tensor], sync: bool) -> tuple[list[Tensor], list[Tensor]]:
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


def gather_columns(values: Tensor) -> Tensor:
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
