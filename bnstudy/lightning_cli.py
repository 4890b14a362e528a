"""`python -m bnstudy fit|validate|test ...`: the study's LightningCLI (bnstudy/cli.py dispatches
here, and imports this module only when a Lightning subcommand runs).

Beyond LightningCLI it adds:
- one run directory per run (`--run_dir`, default runs/<config>/<time>-<id>): config.yaml,
  checkpoints/, metrics.csv and wandb files all land there; re-running `fit` with the same
  run_dir resumes from its last checkpoint (or SLURM hpc checkpoint) under the same W&B run id;
- links from the data module to the model (image size/channels/classes, DLN dimension);
- the divergence guard and the checkpointing as configurable groups (--divergence.*,
  --checkpoint.*), throughput and learning-rate logging, a rich progress bar;
- W&B never hangs: with no WANDB_MODE and no API key it runs offline (sync later);
- a run directory that protects its run (bnstudy/rundir.py): a lock, no resume with a changed
  config, checkpoints checked before anything is written, nothing left by a run that fails before
  its first step; SIGTERM/SIGINT stop at the end of a step with a resumable checkpoint;
- a config.yaml that jsonargparse reads back as written (strings such as 1e5 quoted).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import string
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from jsonargparse import get_loader, set_dumper
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.profilers import PassThroughProfiler

import bnstudy.data  # noqa: F401  (registers the data classes: --data.help DigitsData works)
import bnstudy.modules  # noqa: F401  (registers the model classes: --model.help VGGModule works)
from bnstudy.callbacks import (
    AtomicCheckpointIO,
    BestCheckpoint,
    DivergenceGuard,
    FitSummary,
    LastCheckpoint,
    LoggerSaveConfigCallback,
    ResumeLogs,
    StartupTime,
    StepEndSignals,
    StepProgressBar,
    ThroughputAtLogSteps,
    TrajectoryCheckpoint,
)
from bnstudy.threads import ThreadsForFit
from bnstudy.rundir import (
    RunLock,
    UsageError,
    check_checkpoint_fits,
    check_writable,
    load_checkpoint_checked,
    refuse_changed_config,
    remove_new_run_dir,
)

RUN_DIR_ENV = "BNSTUDY_RUN_DIR"  # shared with child processes (DDP) so every rank agrees


class NoProfiler(PassThroughProfiler):
    """Lightning's default when no profiler is asked for (PassThroughProfiler: nothing measured),
    without its cost: Lightning wraps every hook call of every callback in `profiler.profile()`,
    a generator-based context manager, about 180 a training step, which cost the DLN (a ~1 ms
    step) 10-20% of its speed. A shared no-op context instead."""

    _NOTHING = contextlib.nullcontext()

    def profile(self, action_name: str):
        return self._NOTHING


STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward",
              "on_before_optimizer_step", "on_before_zero_grad", "on_train_batch_end")


def skip_empty_step_hooks(callbacks) -> None:
    """Hide the training-step hooks a callback does not define from Lightning.

    Lightning calls each of these hooks of every callback at every training step, even where it
    is Callback's own no-op: a fit's 13 callbacks made about 80 such calls a step, each a bound
    call, a profiler context and the formatting of the callback's state_key (about 1 us: 5% of a
    DLN step). Lightning skips a hook attribute that is not callable, so an instance attribute of
    None hides the inherited no-op; a hook any class of the callback defines is left alone."""
    for callback in callbacks:
        for name in STEP_HOOKS:
            if getattr(type(callback), name, None) is getattr(Callback, name) \
                    and name not in vars(callback):
                setattr(callback, name, None)


def _batch_size(batch) -> int:
    return batch[0].shape[0]


def _data_attribute(key: str):
    """data -> data.<key>, named so that `fit --help` shows where a linked value comes from.
    None when the data lacks it; jsonargparse then skips targets the model does not have."""
    def attribute(data):
        return getattr(data, key, None)

    attribute.__name__ = attribute.__qualname__ = f"{key}_of"
    return attribute


class _ConfigDumper(yaml.SafeDumper):
    """Writes config.yaml so that jsonargparse reads back what was written. jsonargparse reads
    '1e5' as a float (YAML 1.2) where PyYAML's YAML 1.1 writes it unquoted, as a string: the W&B
    id 323174e6 came back from a stored config.yaml as 323174000000.0 and the config no longer
    parsed. Resolving plain scalars as jsonargparse's reader does quotes such strings."""


# the floats jsonargparse reads that YAML 1.1 does not: an exponent without a sign or without a
# dot (1e5, 1.5e5, 2E+3); its other float and int forms are YAML 1.1's, which SafeDumper knows
_ConfigDumper.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _dump_config(data) -> str:
    return yaml.dump(data, Dumper=_ConfigDumper, default_flow_style=False, allow_unicode=True,
                     sort_keys=False)  # jsonargparse's own yaml settings


set_dumper("yaml", _dump_config)


def readable_config(path: Path) -> str:
    """What to give --config for a stored config.yaml: its path, or, for one written before its
    strings were quoted (a W&B id such as 323174e6 stored bare, which jsonargparse reads as a
    number), the same config written again so that jsonargparse reads what PyYAML wrote."""
    text = Path(path).read_text()
    meant = yaml.safe_load(text)
    if get_loader("yaml")(text) == meant:
        return str(path)
    return _dump_config(meant)


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
    """The W&B run id of this run directory, created once, so a resumed run continues it. It
    starts with a letter, so no YAML reader takes it for a number (8 hex digits were, 1 in 70)."""
    path = run_dir / "wandb_id"
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.choice(string.ascii_lowercase) + secrets.token_hex(4)[1:]
    if _is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def resume_path(run_dir: Path) -> str | None:
    """Re-running `fit` in a run directory resumes it from its newest checkpoint: last.ckpt or a
    SLURM hpc_ckpt_*.ckpt. Under SLURM, Lightning restores an hpc checkpoint itself (only when no
    ckpt_path is given), so None when that is the newest."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    hpc = list(run_dir.glob("hpc_ckpt_*.ckpt"))
    candidates = hpc + [p for p in [run_dir / "checkpoints" / "last.ckpt"] if p.exists()]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    if newest in hpc and SLURMEnvironment.detect():
        return None  # Lightning restores its newest hpc checkpoint itself
    # a last.ckpt newer than the hpc checkpoints: the run was stopped by SIGTERM after a requeue
    return str(newest)


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
        parser.add_argument("--threads", type=int | None, default=None,
                            help="torch CPU threads. Default: OMP_NUM_THREADS if set, else the "
                                 "CPUs this process may use, 1 for tiny models (bnstudy.threads).")
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.add_argument("--resume_allow", type=list[str], default=[],
                            help="Config keys (dotted, * wildcards) that may differ from the run "
                                 "directory's config.yaml when resuming, e.g. "
                                 "--resume_allow=[trainer.val_check_interval]. Always allowed: "
                                 "trainer.max_steps, max_epochs, max_time, enable_progress_bar, "
                                 "enable_model_summary, and how often last.ckpt is written.")
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")  # the best checkpoint
        parser.set_defaults({"checkpoint.save_last": False, "checkpoint.monitor": "val/loss",
                             "checkpoint.filename": "best-{step}"})
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")  # last.ckpt
        parser.add_lightning_class_args(TrajectoryCheckpoint, "trajectory")  # step-<N>.ckpt
        # The model's input/output shape comes from the data. A link whose target the chosen
        # model lacks is skipped (VGG has no `dim`, the DLN no `num_classes`).
        for key in ("num_classes", "in_channels", "image_size", "dim"):
            parser.link_arguments("data", f"model.init_args.{key}", apply_on="instantiate",
                                  compute_fn=_data_attribute(key))

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict is left out: the study's modules have no predict_step
        subcommands = dict(LightningCLI.subcommands())
        subcommands.pop("predict", None)
        return subcommands

    def _run_dir(self, cfg) -> Path:
        """This run's directory, decided once (a default one holds a timestamp)."""
        if getattr(self, "_chosen_run_dir", None) is None:
            run_dir = cfg.get("run_dir") or os.environ.get(RUN_DIR_ENV)
            self._chosen_run_dir = (Path(run_dir) if run_dir
                                    else default_run_dir(cfg.get("config") or []))
        return self._chosen_run_dir

    def _set_seed(self) -> None:
        # `seed_everything: true` (LightningCLI's default) draws a random seed and stores it in
        # config.yaml; a resume (or a Slurm requeue) must continue with that seed, not a new one
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        stored = self._run_dir(cfg) / "config.yaml"
        if self.subcommand == "fit" and cfg.get("seed_everything") is True and stored.is_file():
            seed = (yaml.safe_load(stored.read_text()) or {}).get("seed_everything")
            if isinstance(seed, int) and not isinstance(seed, bool):
                cfg.seed_everything = seed
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = self._run_dir(cfg)
        os.environ[RUN_DIR_ENV] = str(run_dir)
        cfg.run_dir = str(run_dir)
        cfg.trainer.default_root_dir = str(run_dir)
        for group in (cfg.checkpoint, cfg.last_checkpoint, cfg.trajectory):
            if group.dirpath is None:
                group.dirpath = str(run_dir / "checkpoints")
        if self.subcommand == "fit" and cfg.get("ckpt_path") is None:
            cfg.ckpt_path = resume_path(run_dir)
        self._lock_run_dir(run_dir)  # before anything below writes into it
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
        stored = run_dir / "config.yaml"
        if self.subcommand == "fit" and stored.is_file():  # a resume: same config, or refuse
            current = yaml.safe_load(self._parser(self.subcommand).dump(cfg, skip_none=False))
            previous = yaml.safe_load(stored.read_text()) or {}
            refuse_changed_config(run_dir, previous, current, cfg.get("resume_allow") or [])

    def _lock_run_dir(self, run_dir: Path) -> None:
        """One process per run directory (rank 0 holds the lock: the other DDP ranks are the same
        run). Remembers whether the directory is new, to remove it if the run never starts."""
        _ACTIVE.update(cli=self, run_dir=run_dir)
        if not _is_rank_zero():
            return
        check_writable(run_dir)
        created = run_dir  # the topmost directory this run creates (runs/<config>/ too if new)
        while not created.parent.exists() and created.parent != created.parent.parent:
            created = created.parent
        _ACTIVE["created"] = None if run_dir.exists() else created
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
        lock.acquire()
        _ACTIVE["lock"] = lock

    def _parse_ckpt_path(self) -> None:
        """A given --ckpt_path is checked at once (one line naming what is wrong with the file).
        Lightning would replace the model's config by the checkpoint's hyperparameters; here the
        config stays what the user wrote, and a checkpoint that does not fit it is refused."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            self._given_checkpoint = (ckpt_path, load_checkpoint_checked(ckpt_path))

    def _check_inputs(self, subcommand: str) -> None:
        """Checks that would otherwise fail only after the W&B run and the run files exist: the
        checkpoint to start from, and the data (loaded here once; setup is idempotent)."""
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            path, ckpt = getattr(self, "_given_checkpoint", (None, None))
            ckpt = ckpt if path == ckpt_path else load_checkpoint_checked(ckpt_path)
            check_checkpoint_fits(ckpt_path, ckpt, self.model)
            self._given_checkpoint = (None, None)
        single = all(os.environ.get(k, "1") == "1" for k in ("WORLD_SIZE", "SLURM_NTASKS"))
        if self.datamodule is not None and single and _is_rank_zero():
            self.datamodule.prepare_data()
            self.datamodule.setup(subcommand)

    def before_fit(self) -> None:
        self._check_inputs("fit")

    def before_validate(self) -> None:
        self._check_inputs("validate")

    def before_test(self) -> None:
        self._check_inputs("test")

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        extra = [LearningRateMonitor(logging_interval="step")]
        if self.subcommand == "fit":
            extra += [ThroughputAtLogSteps(batch_size_fn=_batch_size), StepEndSignals(),
                      ResumeLogs(), ThreadsForFit(cfg.get("threads")), FitSummary(),
                      StartupTime(_ACTIVE.get("began", (time.perf_counter(), time.process_time())))]
        if cfg.trainer.get("enable_progress_bar") is not False:
            extra.append(StepProgressBar())
        given = cfg.trainer.get("callbacks") or []  # a list, or one (--trainer.callbacks=X)
        callbacks = (list(given) if isinstance(given, (list, tuple)) else [given]) + extra
        if not cfg.trainer.get("plugins"):  # checkpoints written to a temp file, then renamed
            kwargs["plugins"] = [AtomicCheckpointIO()]
        if not cfg.trainer.get("profiler"):  # --trainer.profiler=simple etc. still work
            kwargs["profiler"] = NoProfiler()
        trainer = super().instantiate_trainer(callbacks=callbacks, **kwargs)
        skip_empty_step_hooks(trainer.callbacks)
        return trainer


class ParseOnlyCLI(StudyCLI):
    """The CLI up to and including parsing and validating the arguments; builds and writes
    nothing (for `fit --help` and for checking sweep commands before they are submitted)."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand) -> None:
        pass

    def _set_seed(self) -> None:
        pass


def parse_only(args: list[str]) -> ParseOnlyCLI:
    """Parse `fit|validate|test ...` arguments; raises jsonargparse's ArgumentError when they do
    not parse. The parser is then reusable: cli.parser.parse_args(other_args)."""
    saved, sys.argv = sys.argv, sys.argv[:1]  # args given: LightningCLI must not read sys.argv
    try:
        return ParseOnlyCLI(model_class=None, datamodule_class=None, subclass_mode_model=True,
                            subclass_mode_data=True, save_config_callback=None,
                            auto_configure_optimizers=False,
                            parser_kwargs={"exit_on_error": False, "prog": "bnstudy"},
                            args=args, run=True)
    finally:
        sys.argv = saved


# the run in progress in this process: its lock, and whether its directory is new (so that a
# failure before the first step removes it)
_ACTIVE: dict = {}

_NOISE = (r".*flops_per_batch.*", r".*isinstance\(treespec, LeafSpec\).*",
          r".*does not have many workers.*", r".*srun. command is available.*",
          r".*overridden `(on_after_batch_transfer|transfer_batch_to_device)`.*")


class _NoTips(logging.Filter):
    """Drops Lightning's promotional tips (litlogger, litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("\N{ELECTRIC LIGHT BULB} Tip")


def _quiet() -> None:
    for noise in _NOISE:
        warnings.filterwarnings("ignore", message=noise)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in log.filters):
            log.addFilter(_NoTips())


def cli_main(args: list[str] | None = None, run: bool = True) -> StudyCLI:
    torch.set_float32_matmul_precision("high")
    _quiet()
    previous_run_dir = os.environ.get(RUN_DIR_ENV)
    _ACTIVE.clear()
    _ACTIVE["began"] = (time.perf_counter(), time.process_time())  # wall, CPU
    ok = False
    try:
        cli = StudyCLI(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LoggerSaveConfigCallback,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False, "prog": "bnstudy"},  # errors reach main()
            args=args,
            run=run,
        )
        ok = True
        return cli
    finally:
        # the run directory is shared with this run's DDP children only, not with a later run
        # started in the same process
        if previous_run_dir is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous_run_dir
        if run and "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish(exit_code=0 if ok else 1)  # the next run gets its own
        trainer = getattr(_ACTIVE.get("cli"), "trainer", None)
        started = trainer is not None and trainer.global_step > 0
        if "lock" in _ACTIVE:
            _ACTIVE["lock"].release()
        if not ok and _ACTIVE.get("created") and not started:
            remove_new_run_dir(_ACTIVE["run_dir"], _ACTIVE["created"])  # a run that never started leaves nothing
        _ACTIVE.clear()
