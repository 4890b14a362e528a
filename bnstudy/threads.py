"""How many CPU threads torch uses in a fit, chosen on purpose.

torch starts with one intra-op thread per physical core of the machine, whatever CPUs the process
may actually use (a Slurm allocation, `taskset`) and whatever the model's size. On a shared node,
or a laptop doing other work, a thread that loses its core stalls every parallel region of the
others: a tiny model (the DLN's 10x10 layers) then runs 10-20x slower than on one thread. So:

- the user's choice wins: `--threads N`, or OMP_NUM_THREADS / MKL_NUM_THREADS in the environment
  (torch already follows those), or torch.set_num_threads(n) called before the fit (never raised);
- else at most the CPUs this process may run on: os.sched_getaffinity, SLURM_CPUS_PER_TASK when
  under Slurm, and BNSTUDY_MAX_THREADS (the slurm/ templates set it to their CPU count);
- and, for a model on the CPU, one thread per `MACS_PER_THREAD` multiply-adds of a training
  step's forward pass: the study's tiny models (DLN, VGG-11 at 1/4 width on 8x8 digits) get one
  thread, which is their fastest setting on an idle machine too.
"""
from __future__ import annotations

import copy
import os

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

# Forward multiply-adds per step that make a second thread pay off on CPU. The quickstart's VGG-11
# (w 0.25, 8x8 digits, batch 64) does ~6e7 and the DLN (25 layers of 10x10, 1000 samples) 2.5e6:
# both run fastest on one thread; VGG-16 (w 0.25) on 32x32 CIFAR batches of 128 does ~2.6e9.
MACS_PER_THREAD = 2e8
USER_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by Slurm's CPUs per task and by
    BNSTUDY_MAX_THREADS."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    for key in ("SLURM_CPUS_PER_TASK", "BNSTUDY_MAX_THREADS"):
        value = os.environ.get(key, "").strip()
        if value.isdigit() and int(value) > 0:
            n = min(n, int(value))
    return max(1, n)


def user_threads() -> int | None:
    """Threads the user asked for through the environment, if any."""
    for key in USER_ENV:
        value = os.environ.get(key, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def forward_macs(net: nn.Module, inputs: torch.Tensor) -> int:
    """Multiply-adds of the Conv/Linear layers in one forward pass of the batch `inputs`, counted
    on its first two samples (one alone can be too few for a norm layer: GroupNorm over 1x1 maps
    refuses a single value per group) (on a copy of `net` in eval mode, so the model's buffers, noise and RNG
    streams are not touched) and scaled to the batch."""
    twin = copy.deepcopy(net).eval()
    total = 0

    def count(module, args, out):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += out.numel() * module.in_features
        else:  # Conv: every output element sums in_channels/groups x kernel inputs
            total += out.numel() * module.weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in twin.modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    sample = inputs[:2]
    state = torch.get_rng_state()
    try:
        with torch.no_grad():
            twin(sample)
    finally:
        torch.set_rng_state(state)
        for h in hooks:
            h.remove()
    return total * len(inputs) // len(sample)


def choose_threads(requested: int | None = None, macs: int | None = None) -> int:
    """The thread count for a fit: `requested` (or the environment's) if set, else the current
    torch setting capped by the available CPUs and, when `macs` is known, by the model's size."""
    explicit = requested or user_threads()
    if explicit:
        return explicit
    n = min(torch.get_num_threads(), available_cpus())
    if macs is not None:
        n = min(n, max(1, int(macs // MACS_PER_THREAD)))
    return max(1, n)


class ThreadsForFit(Callback):
    """Sets torch's intra-op threads when a fit is set up (CPUs available) and again before the
    first training step, once the batch shows how big a step of the model is. Both runs of a
    resumed pair make the same choice."""

    def __init__(self, threads: int | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1; got {threads}")
        self.threads = threads
        self.chosen: int | None = None
        self._sized = False

    def _set(self, n: int) -> None:
        self.chosen = n
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._sized = False
            self._before = torch.get_num_threads()
            self._set(choose_threads(self.threads))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # the count is process-wide: a later fit in this process (a notebook, the tests) chooses
        # from the CPUs again, not from what this fit's model needed
        if stage == "fit" and getattr(self, "_before", None):
            torch.set_num_threads(self._before)
            self._before = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._sized:
            return
        self._sized = True
        if self.threads or user_threads() or pl_module.device.type != "cpu":
            return  # explicit, or the model is on an accelerator: the CPU only feeds it
        net = getattr(pl_module, "net", pl_module)
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(inputs, torch.Tensor):
            self._set(choose_threads(macs=forward_macs(net, inputs)))
