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
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from bnstudy.instruments.probe import Probe, Step


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
