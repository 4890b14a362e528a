"""`python -m bnstudy fit|validate|test ...`: the study's LightningCLI.

Beyond LightningCLI it adds:
- one run directory per run (`--run_dir`, default runs/<config>/<time>-<id>): config.yaml,
  checkpoints/, metrics.csv and wandb files all land there; re-running `fit` with the same
  run_dir resumes from its last checkpoint (or SLURM hpc checkpoint) under the same W&B run id;
- links from the data module to the model (image size/channels/classes, DLN dimension);
- the divergence guard and the checkpointing as configurable groups (--divergence.*,
  --checkpoint.*), throughput and learning-rate logging, a rich progress bar;
- W&B never hangs: with no WANDB_MODE and no API key it runs offline (sync later).
"""
from __future__ import annotations

import os
import re
import secrets
import sys
import time
import warnings
from functools import partial
from pathlib import Path

from jsonargparse import ArgumentError

import torch
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    ThroughputMonitor,
)
from lightning.pytorch.cli import LightningCLI

from bnstudy.callbacks import (
    DivergenceGuard,
    LastCheckpoint,
    LoggerSaveConfigCallback,
    RequeueAtStepEnd,
)
from bnstudy.data import DataNotFoundError

RUN_DIR_ENV = "BNSTUDY_RUN_DIR"  # shared with child processes (DDP) so every rank agrees


def _batch_size(batch) -> int:
    return batch[0].shape[0]


def _data_attribute(key: str, data):
    # None when the data lacks it; jsonargparse then skips targets the model does not have
    return getattr(data, key, None)


def _is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


def default_run_dir(config_paths: list) -> Path:
    """runs/<config stems>/<id>: a SLURM job/array task id when under SLURM (every task of a
    multi-task job must agree and a requeued task must find its own directory again), else a
    timestamp plus a random suffix, so a re-run never collides with an earlier one."""
    stem = "+".join(Path(str(p)).stem for p in config_paths) or "run"
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        # started by `wandb agent`: one directory per sweep run, so a requeued agent worker that
        # is handed another run never resumes this one's checkpoint
        return Path("runs") / f"sweep-{os.environ['WANDB_SWEEP_ID']}" / os.environ["WANDB_RUN_ID"]
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        run_id = f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    elif "SLURM_JOB_ID" in os.environ:
        run_id = f"slurm-{os.environ['SLURM_JOB_ID']}"
    else:
        return Path("runs") / stem / stamp
    step = os.environ.get("SLURM_STEP_ID", "")
    if step.isdigit() and step != "0":  # a later srun step of the same job: another run
        run_id += f"-step{step}"
    elif (not step and (Path("runs") / stem / run_id).exists()
          and os.environ.get("SLURM_RESTART_COUNT", "0") == "0"):
        run_id += f"-{stamp}"  # another fit in the same batch script, not a requeue
    return Path("runs") / stem / run_id


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, created once, so a resumed run continues it."""
    path = run_dir / "wandb_id"
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    if _is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def resume_path(run_dir: Path) -> str | None:
    """Re-running `fit` in a run directory resumes it from its newest checkpoint: last.ckpt or a
    SLURM hpc_ckpt_*.ckpt. Under SLURM, Lightning restores an hpc checkpoint itself (only when no
    ckpt_path is given), so then None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    hpc = list(run_dir.glob("hpc_ckpt_*.ckpt"))
    if hpc and SLURMEnvironment.detect():
        return None
    candidates = hpc + [p for p in [run_dir / "checkpoints" / "last.ckpt"] if p.exists()]
    return str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None


def ensure_wandb_mode() -> None:
    """wandb with no key and no network would prompt or retry; default to offline instead."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"
    print("bnstudy: no W&B API key found, logging offline (sync later with `wandb sync`)",
          file=sys.stderr)


class StudyCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Directory for all outputs of this run; reusing it resumes. "
                                 "Default: runs/<config>/<time>-<id>.")
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # the best checkpoint
        parser.set_defaults({"checkpoint.save_last": False, "checkpoint.monitor": "val/loss",
                             "checkpoint.filename": "best-{step}"})
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")  # last.ckpt
        # The model's input/output shape comes from the data. A link whose target the chosen
        # model lacks is skipped (VGG has no `dim`, the DLN no `num_classes`).
        for key in ("num_classes", "in_channels", "image_size", "dim"):
            parser.link_arguments("data", f"model.init_args.{key}", apply_on="instantiate",
                                  compute_fn=partial(_data_attribute, key))

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = cfg.get("run_dir") or os.environ.get(RUN_DIR_ENV)
        run_dir = Path(run_dir) if run_dir else default_run_dir(cfg.get("config") or [])
        os.environ[RUN_DIR_ENV] = str(run_dir)
        cfg.run_dir = str(run_dir)
        cfg.trainer.default_root_dir = str(run_dir)
        for group in (cfg.checkpoint, cfg.last_checkpoint):
            if group.dirpath is None:
                group.dirpath = str(run_dir / "checkpoints")
        if self.subcommand == "fit" and cfg.get("ckpt_path") is None:
            cfg.ckpt_path = resume_path(run_dir)
        loggers = cfg.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if not hasattr(logger, "class_path"):
                continue
            args = logger.init_args
            args.save_dir = str(run_dir)
            if logger.class_path.endswith("CSVLogger"):
                args.name, args.version = "", ""  # metrics.csv directly in the run directory
            elif logger.class_path.endswith("WandbLogger"):
                ensure_wandb_mode()
                # absolute: W&B's service process resolves paths against its own cwd
                args.save_dir = args.dir = str(run_dir.resolve())
                args.id = args.id or os.environ.get("WANDB_RUN_ID") or wandb_run_id(run_dir)
                args.name = args.name or "/".join(run_dir.parts[-2:])
                args.resume = args.get("resume") or "allow"

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        extra = [LearningRateMonitor(logging_interval="step")]
        if self.subcommand == "fit":
            extra += [ThroughputMonitor(batch_size_fn=_batch_size), RequeueAtStepEnd()]
        if cfg.trainer.get("enable_progress_bar") is not False:
            extra.append(RichProgressBar())
        callbacks = list(cfg.trainer.get("callbacks") or []) + extra
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)


def cli_main(args: list[str] | None = None, run: bool = True) -> StudyCLI:
    torch.set_float32_matmul_precision("high")
    for noise in (r".*flops_per_batch.*", r".*isinstance\(treespec, LeafSpec\).*",
                  r".*does not have many workers.*", r".*srun. command is available.*"):
        warnings.filterwarnings("ignore", message=noise)
    previous_run_dir = os.environ.get(RUN_DIR_ENV)
    try:
        return StudyCLI(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LoggerSaveConfigCallback,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False},  # errors reach main(), which prints one line
            args=args,
            run=run,
        )
    finally:
        # the run directory is shared with this run's DDP children only, not with a later run
        # started in the same process
        if previous_run_dir is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous_run_dir
        if run and "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()  # the next run in this process gets its own W&B run


def summarize_config_error(message: str) -> str:
    """One line naming the key from jsonargparse's nested multi-line error report."""
    group = re.search(r"""(?:Parser key|Problem with given value for) ["'](\w+)["']""", message)
    if m := re.search(r"unrecognized arguments: (\S+)", message):
        return f"unknown key {m.group(1).lstrip('-').split('=')[0]}"
    if m := re.search(r"Option '([^']+)' is not accepted", message):
        cls = re.search(r"class_path '([^']+)'", message)
        prefix = (group.group(1) + ".") if group else ""
        return f"unknown key {prefix}{m.group(1)}" + (f" (not an argument of {cls.group(1)})"
                                                      if cls else "")
    if m := re.search(r"((?:model|data|trainer)\.[\w.]+ must [^\n]+)", message):
        return m.group(1)
    keys = re.findall(r"""Parser key ["']([\w.]+)["']:\s*\n?\s*([^\n]+)""", message)
    if keys:
        key, why = keys[-1]
        if group and group.group(1) != key and not key.startswith(group.group(1) + "."):
            key = f"{group.group(1)}.{key}"
        return f"bad value for {key}: {why.strip()}"
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    return lines[0] if lines else message


def main(argv: list[str] | None = None) -> int:
    args = argv  # None: LightningCLI reads sys.argv itself
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "grid":
        from bnstudy.grid import main as grid_main

        return grid_main(argv[1:])
    if argv and argv[0] == "plot":
        from bnstudy.plot import main as plot_main

        return plot_main(argv[1:])
    if argv and argv[0] == "findings":
        from bnstudy.findings import main as findings_main

        return findings_main(argv[1:])
    try:
        cli_main(args)
    except DataNotFoundError as err:  # raised in fit, once the data is looked for
        print(f"bnstudy: error: {err}", file=sys.stderr)
        return 2
    except (ArgumentError, ValueError, TypeError) as err:
        if os.environ.get("BNSTUDY_DEBUG") or not _is_config_error(err):
            raise
        print(f"bnstudy: error: {summarize_config_error(str(err))}", file=sys.stderr)
        return 2
    return 0


def _is_config_error(err: Exception) -> bool:
    # parse errors, and errors jsonargparse raises while instantiating classes from the config
    tb = err.__traceback__
    while tb is not None:
        if "jsonargparse" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return isinstance(err, ArgumentError)
