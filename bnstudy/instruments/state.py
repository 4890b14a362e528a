"""Leaving the model as it was found: every measurement runs inside `measuring`, which puts back
parameters, buffers (BN running statistics, num_batches_tracked), the noisy-BN state, the
train/eval flags and every RNG bit for bit. Measurements move parameters in place (`assign`) and
read gradients with torch.autograd.grad, so .grad is never written."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bnstudy.norms import BatchNoise


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


class SavedParams:
    """The model's parameters (name -> Parameter) and a copy of their values on entry."""

    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters())
        self.saved = {n: p.detach().clone() for n, p in self.params.items()}

    def load(self, names: Sequence[str], values: Mapping[str, Tensor]) -> None:
        assign([self.params[n] for n in names], [values[n] for n in names])

    def reset(self, names: Sequence[str] | None = None) -> None:
        self.load(list(self.params) if names is None else names, self.saved)


def assign(params: list[Tensor], values: list[Tensor]) -> None:
    """Write `values` into `params` in place (optimizer state keeps pointing at them)."""
    if params:
        with torch.no_grad():
            torch._foreach_copy_(params, values)
    # autocast caches low-precision copies of parameters for the rest of its region: drop them
    torch.clear_autocast_cache()


@contextmanager
def measuring(model: nn.Module) -> Iterator[SavedParams]:
    """Train mode for the duration, then the parameters, every buffer, the noisy-BN state, the
    train/eval flags and the RNGs exactly as before (bit for bit). Yields the saved parameters:
    probes move parameters in place (far cheaper than swapping them per call with
    torch.func.functional_call) and read gradients with torch.autograd.grad (.grad untouched)."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    buffers = [(m, name, b, b.clone()) for m in modules
               for name, b in m._buffers.items() if b is not None]
    noise = [(m, m.save_state()) for m in modules if isinstance(m, BatchNoise)]
    rng = _rng_state()
    state = SavedParams(model)
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
        for m, saved in noise:
            m.restore_state(saved)
        for m, mode in zip(modules, modes):
            m.training = mode
        _set_rng_state(rng)
