"""Lightning modules: one per architecture family, the variant (norm, init, optimizer) is config.

Every module exposes what the instruments need:
  self.net       the plain nn.Module (no Lightning), the thing probes are pointed at
  self.loss_fn   loss_fn(outputs, targets) -> scalar, the loss the optimizer sees
  self.lr        the learning rate (probe step sizes are multiples of it)
"""
from __future__ import annotations

import inspect
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from bnstudy.loggers import StudyCSVLogger, StudyWandbLogger
from bnstudy.models import VGG, DeepLinear, init_weights
from bnstudy.norms import BatchNoise, NoiseConfig, noise_in_eval, noise_off_in_eval

Norm = Literal["none", "batch", "noisy_batch", "noise", "l1", "l2", "linf", "layer", "group"]
Init = Literal["glorot", "kaiming", "orthogonal", "default"]
Optimizer = Literal["sgd", "adam", "adamw", "rmsprop"]
Schedule = Literal["none", "cosine", "step"]
CompileMode = Literal["auto", "default", "reduce-overhead", "max-autotune",
                      "max-autotune-no-cudagraphs"]
# The optimizers' multi-tensor step (one call updates every parameter tensor): torch picks it
# on a GPU, but on a CPU it loops over the tensors in Python, which costs a DLN 1-2% of its step
# (25-73 tiny tensors). The numbers are the same bit for bit (tests/test_speed.py).
FOREACH = True


class StudyModule(L.LightningModule):
    """Shared training logic: optimizer from config, noisy-BN step boundaries, metrics, RNG state
    in checkpoints. Subclasses build `self.net` and define `loss_fn`."""

    def __init__(
        self,
        lr: float,
        optimizer: Optimizer = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: Schedule = "none",
        init: Init = "glorot",
        init_scale: float = 1.0,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: CompileMode = "auto",
    ):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0; got {lr}")
        self.lr = lr
        self.net: nn.Module
        self._compiled = None  # torch.compile(self.net), built at the first training step
        self._compiled_rows = 0  # the batch size the compiled forward serves (the loader's)
        self._step_outputs = None  # (loss, outputs, targets) of the step in progress
        self._noise_layers: list[BatchNoise] | None = None

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets _current_fx_name around every hook it calls, about 36 times a training
        # step; nn.Module.__setattr__ searches its parameter, buffer and module dicts each time
        # (1.75 us against 0.15 for a plain attribute here: about 2% of a DLN step)
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- fast paths (configs/fast.yaml) ----------------------------------------------------------
    # The net stays the plain nn.Module: probes, checkpoints and DDP see it; only the training
    # step's forward goes through the compiled wrapper, which shares its parameters and buffers.
    @property
    def compiles_training_forward(self) -> bool:
        """The training step's forward runs through torch.compile (instruments read this)."""
        return bool(self.hparams.get("compile"))

    def _fast_net(self, rows: int) -> nn.Module:
        """The module that runs the training forward of a batch of `rows` samples."""
        if not self.hparams.get("compile"):
            return self.net
        # The compiled forward serves the loader's full batches; a smaller one (an epoch's short
        # last batch: 50,000 % 128 = 80 on CIFAR-10) runs eagerly on the same module. Compiled,
        # a new shape recompiles and captures new CUDA graphs: 20 s on an H200 (bench/bench_gpu.py
        # over an epoch's end, 2026-12-04), where the eager step costs 10 ms. The full size is
        # the loader's, not the first batch's, so that a run resumed at a short batch runs it
        # eagerly too, as the run that never stopped did (the same bits).
        if not self._compiled_rows:
            loader = self._trainer.train_dataloader if self._trainer is not None else None
            size = getattr(loader, "batch_size", None)
            self._compiled_rows = size if isinstance(size, int) else rows
        if rows < self._compiled_rows:
            return self.net
        if rows > self._compiled_rows:  # a loader of unknown batch size: the largest batch seen
            self._compiled_rows = rows
        if self._compiled is None:
            mode = self.hparams.get("compile_mode", "auto")
            if mode == "auto":  # CUDA graphs on a GPU: no per-kernel launch cost at all
                mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            # kept out of the module tree (object.__setattr__): no second copy in state_dict
            object.__setattr__(self, "_compiled", torch.compile(self.net, mode=mode))
        return self._compiled

    def _memory_format(self) -> None:
        if self.hparams.get("channels_last"):  # NHWC convolutions (tensor cores, bf16)
            self.net.to(memory_format=torch.channels_last)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        # a batch of tensors already on the device (the CPU's loaders, the data held on the
        # GPU) as it is: Lightning's walk through the collection costs 30 us a step, 2% of a DLN
        # step, to return the same tensors
        if isinstance(batch, (tuple, list)) and all(
                isinstance(t, torch.Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # here, not in training_step: the instruments then see the very inputs the step sees
        if self.hparams.get("channels_last") and isinstance(batch, (tuple, list)) \
                and isinstance(batch[0], torch.Tensor) and batch[0].dim() == 4:
            batch = (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
        return batch

    # -- optimization -------------------------------------------------------------------------
    def configure_optimizers(self):
        hp, params = self.hparams, self.parameters()
        common = dict(lr=self.lr, weight_decay=hp.weight_decay, foreach=FOREACH)
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, momentum=hp.momentum, **common)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, betas=hp.betas, **common)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, betas=hp.betas, **common)
        else:
            opt = torch.optim.RMSprop(params, momentum=hp.momentum, **common)
        if hp.schedule == "none":
            return opt
        total = self.trainer.estimated_stepping_batches
        if hp.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total)))
        else:  # step: divide by 10 at 50% and 75% of training
            sched = torch.optim.lr_scheduler.MultiStepLR(
                opt, milestones=[int(total * 0.5), int(total * 0.75)], gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _init_net(self) -> None:
        init_weights(self.net, self.hparams.init, self.hparams.init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- steps ----------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # noisy BN: one draw per training step, held for its probes (the noise layers are found
        # once: walking the whole net every step cost ~1% of a DLN step)
        if self._noise_layers is None:
            self._noise_layers = [m for m in self.net.modules() if isinstance(m, BatchNoise)]
        for layer in self._noise_layers:
            layer.resample()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self._fast_net(x.shape[0])(x)
        loss = self.loss_fn(out, y)
        self._step_outputs = (loss.detach(), out.detach(), y)
        # a logging step logs now, before the callbacks' on_train_batch_end (a signal may end
        # the run there, with its checkpoint); any other step in on_train_batch_end, only if a
        # callback (the divergence guard, a signal) made it the last one
        self.on_train_batch_end(None, batch, batch_idx)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The training metrics are logged only at the steps whose logs the loggers write
        # (log_every_n_steps, and the step a run stops at), the same values at the same steps:
        # a value logged at another step is overwritten before anything reads it, and one
        # self.log costs more than a whole DLN step.
        if self._step_outputs is None:
            return
        trainer = self.trainer
        if not (trainer._logger_connector.should_update_logs or trainer.fast_dev_run):
            return
        (loss, out, y), self._step_outputs = self._step_outputs, None
        values = {"train/loss": loss, **self._train_metrics(out, y)}
        # the progress bar's and callbacks' copies, where self.log(prog_bar=True, logger=False)
        # puts them at the step's end (tensors in callback_metrics, numbers in the bar's), put
        # there directly: self.log's walk through Lightning's result collection cost 0.4 ms a
        # logging step, 2% of a DLN step
        connector = trainer._logger_connector
        connector._callback_metrics.update(values)
        connector._progress_bar_metrics.update({k: v.item() for k, v in values.items()})
        # straight to the loggers, not through self.log (which reaches them only after every
        # on_train_batch_end): a checkpoint saved at this step's end (last.ckpt, a signal's)
        # then finds this step's row complete, so a run killed right after it and resumed
        # from it has the row an uninterrupted run has
        trainer._logger_connector.log_metrics(values)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def _eval_step(self, stage: str, batch, batch_idx: int = 0) -> None:
        x, y = batch
        out = self.net(x)
        self.log(f"{stage}/loss", self.loss_fn(out, y), prog_bar=stage == "val", sync_dist=True)
        self._update_metrics(stage, out, y)
        if noise_off_in_eval(self.net):
            # noisy BN evaluated both ways (the paper does not say which it used): the logged
            # val/acc without the noise, val/acc_noise with fresh noise, seeded by the step and
            # batch so that a resumed run evaluates as one never stopped
            with noise_in_eval(self.net, seed=self.global_step * 10_007 + batch_idx):
                noisy = self.net(x)
            self.log(f"{stage}/loss_noise", self.loss_fn(noisy, y), sync_dist=True)
            self._update_metrics(stage, noisy, y, suffix="_noise")

    def _update_metrics(self, stage: str, out: torch.Tensor, y: torch.Tensor,
                        suffix: str = "") -> None:
        pass

    def _train_metrics(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training metrics beside the loss, of this batch."""
        return {}

    # -- checkpoints: every RNG, so a resumed run repeats an uninterrupted one ------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The CLI's data->model links (dim, num_classes, ...) are recorded in the hyperparameters
        # even for a model without that argument; drop those so --ckpt_path can rebuild the model.
        params = inspect.signature(type(self).__init__).parameters
        hparams = checkpoint.get("hyper_parameters", {})
        for key in [k for k in hparams if not k.startswith("_") and k not in params]:
            del hparams[key]
        checkpoint["bnstudy_rng"] = {"torch": torch.get_rng_state()}
        # metrics.csv and W&B's waiting rows before the checkpoint file (see
        # StudyCSVLogger.write_rows): a run killed right after the file resumes past those rows
        for logger in self.trainer.loggers if self._trainer is not None else ():
            if isinstance(logger, (StudyCSVLogger, StudyWandbLogger)):
                logger.write_rows()
        if torch.cuda.is_available():
            checkpoint["bnstudy_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("bnstudy_rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


# Lightning reads the step methods' signatures at every step (does training_step take batch_idx?
# dataloader_iter?), through inspect, about 14 us a call: a function's __signature__ is what
# inspect returns first, so it is computed once here
for _step in (StudyModule.training_step, StudyModule.validation_step, StudyModule.test_step):
    _step.__signature__ = inspect.signature(_step)


class VGGModule(StudyModule):
    """VGG on images (CIFAR-10, digits), cross-entropy. `num_classes`, `in_channels` and
    `image_size` come from the data module (linked in the CLI)."""

    def __init__(
        self,
        depth: Literal[11, 13, 16, 19] = 16,
        width: float = 1.0,
        norm: Norm = "batch",
        noise: NoiseConfig = NoiseConfig(),
        groups: int = 32,
        conv_bias: bool = True,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        lr: float = 0.1,
        optimizer: Optimizer = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: Schedule = "none",
        init: Init = "glorot",
        init_scale: float = 1.0,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: CompileMode = "auto",
    ):
        super().__init__(lr, optimizer, momentum, weight_decay, betas, schedule, init, init_scale,
                         channels_last, compile, compile_mode)
        self.save_hyperparameters()
        self.net = VGG(depth, width, norm, num_classes, in_channels, image_size, noise, groups,
                       conv_bias)
        self._init_net()
        # one input: the model summary at the start of a fit shows real FLOPs and sizes
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)
        self._memory_format()
        # keys are not bare stage names: ModuleDict["train"] would shadow Module.train()
        self.accuracy = nn.ModuleDict({
            # validate_args=False: the per-step input checks cost ~4% of a small CPU step
            f"{stage}_acc": torchmetrics.classification.MulticlassAccuracy(
                num_classes, average="micro", validate_args=False)
            for stage in ("train", "val", "test", "val_noise", "test_noise")
        })

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def _update_metrics(self, stage: str, out: torch.Tensor, y: torch.Tensor,
                        suffix: str = "") -> None:
        metric = self.accuracy[f"{stage}{suffix}_acc"]
        metric(out.detach(), y)
        self.log(f"{stage}/acc{suffix}", metric, prog_bar=not suffix)

    def _train_metrics(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"train/acc": self.accuracy["train_acc"](out, y)}  # this batch's accuracy


class DLNModule(StudyModule):
    """Deep linear network on Gaussian regression, squared l2 loss summed over samples (paper's
    plotted losses of 1e3-1e4 imply a sum) or averaged. `dim` (the layer width) comes from the
    data (linked)."""

    def __init__(
        self,
        depth: int = 25,
        dim: int = 10,
        norm: Norm = "none",
        noise: NoiseConfig = NoiseConfig(),
        bias: bool = False,
        reduction: Literal["sum", "mean"] = "sum",
        groups: int = 32,
        lr: float = 1e-6,
        optimizer: Optimizer = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: Schedule = "none",
        init: Init = "glorot",
        init_scale: float = 1.0,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: CompileMode = "auto",
        feature_major: bool = True,
    ):
        super().__init__(lr, optimizer, momentum, weight_decay, betas, schedule, init, init_scale,
                         channels_last, compile, compile_mode)
        self.save_hyperparameters()
        self.net = DeepLinear(depth, dim, norm, noise, bias, groups, feature_major)
        self._init_net()
        self.example_input_array = torch.zeros(1, dim)  # the model summary's FLOPs and sizes

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # squared l2 norm of the residual per sample, summed (or averaged) over samples
        loss = F.mse_loss(outputs, targets, reduction="sum")
        if self.hparams.reduction == "mean":
            return loss / outputs.shape[0]
        # DDP averages gradients over ranks: scale each rank's partial sum so the average is the
        # full-batch sum's gradient, as in one process
        world = self._trainer.world_size if self._trainer is not None else 1
        return loss * world
