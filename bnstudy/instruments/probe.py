"""What every instrument shares: the `Probe` base class (a schedule and up to three hooks of the
training step), the `Step` a probe sees, and the paper's layer keys (`layerNN`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import Tensor, nn

from bnstudy.instruments.trace import layer_names


Layers = Sequence[str | int] | None  # module paths, or 1-based layer numbers as in the paper


def layer_key(number: int, count: int) -> str:
    """'layer05' for layer 5: two digits (more if the model has 100 layers or more) so that
    keys sort in layer order."""
    return f"layer{number:0{max(2, len(str(count)))}d}"


def layer_keys(net: nn.Module, inputs: Tensor) -> dict[str, str]:
    """{module path: 'layerNN'} for every Conv/Linear layer of `net` (one measuring forward)."""
    names = layer_names(net, inputs)
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
