"""What keeps a run directory safe: one process at a time (a lock naming its holder), no resume
with a changed config, checkpoints checked before anything is written, and nothing left behind by
a run that fails before its first step. Light imports only: this runs before Lightning starts."""
from __future__ import annotations

import fnmatch
import os
import shutil
import socket
import zipfile
from pathlib import Path

LOCK_NAME = ".lock"
# keys that may change when a run is resumed: they change how far it goes or what it prints, not
# what it computes (`--resume_allow` adds more)
SAFE_RESUME_CHANGES = ("trainer.max_steps", "trainer.max_epochs", "trainer.max_time",
                       "trainer.enable_progress_bar", "trainer.enable_model_summary",
                       "last_checkpoint.every_n_train_steps", "last_checkpoint.every_minutes",
                       "last_checkpoint.check_every", "trajectory.every_n_train_steps",
                       "trajectory.log_spaced", "resume_allow")
# classes renamed or replaced by bnstudy's own with the same results: a run written with the old
# name resumes with the new one (StudyWandbLogger only changes how many W&B calls a step makes)
SAME_CLASSES = {"lightning.pytorch.loggers.WandbLogger": "bnstudy.loggers.StudyWandbLogger",
                "lightning.pytorch.loggers.wandb.WandbLogger": "bnstudy.loggers.StudyWandbLogger"}
# set by the CLI from the run directory itself, or naming the files of the config (not settings)
_NOT_SETTINGS = ("config", "ckpt_path", "__path__")
# where the run directory is (absolute or relative, moved, another cwd) is not a setting either
_RUN_DIR_PATHS = ("run_dir", "trainer.default_root_dir", "checkpoint.dirpath",
                  "last_checkpoint.dirpath", "trajectory.dirpath",
                  "trainer.logger.*.init_args.save_dir",
                  "trainer.logger.init_args.save_dir", "trainer.logger.*.init_args.dir",
                  "trainer.logger.init_args.dir", "trainer.logger.*.init_args.name",
                  "trainer.logger.init_args.name")


class UsageError(ValueError):
    """Bad input the user can fix: printed as one line, exit code 2."""


class RunLock:
    """An exclusive lock on a run directory, held for the life of the process that trains in it.

    flock on <run dir>/.lock: the kernel drops it when its holder dies however it dies, so a lock
    left by a killed process is taken over without guessing whether its pid is still alive (which
    could not be told for a process on another host sharing the file system). The file holds
    "pid host" of the holder, for the error message of the next process that tries."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "another process"
            raise UsageError(f"run directory {self.path.parent} is in use by {who}; wait for it "
                             "to end, or pass another --run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, naming the last holder
            self._fd = None


def check_writable(run_dir: Path) -> None:
    """The run directory, or the first existing directory above it, must be writable."""
    probe = Path(run_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"run directory {run_dir}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"run directory {run_dir} is not writable ({probe} is read-only for "
                         "this user); pass a --run_dir you can write to")


def flatten(config, prefix: str = "") -> dict:
    """{"a.b.c": value} from nested dicts; lists of dicts (loggers, callbacks) by index."""
    if isinstance(config, list) and config and all(isinstance(v, dict) for v in config):
        config = {str(i): v for i, v in enumerate(config)}
    if not isinstance(config, dict):
        return {prefix: config}
    out = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name))
    return out


def config_differences(stored: dict, current: dict, allowed: list[str]) -> list[str]:
    """Dotted keys whose values differ between the stored and the current config, other than
    the allowed ones (fnmatch patterns, e.g. trainer.max_steps or 'model.*'). A key the stored
    config does not have at all is an option added by a later bnstudy: a run made before it can
    still be resumed."""
    a, b = flatten(stored), flatten(current)
    patterns = list(SAFE_RESUME_CHANGES) + list(_RUN_DIR_PATHS) + list(allowed or [])
    differing = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in _NOT_SETTINGS or any(fnmatch.fnmatch(key, p) for p in patterns):
            continue
        old, new = a.get(key), b.get(key)
        if key.endswith("class_path"):
            old, new = SAME_CLASSES.get(old, old), SAME_CLASSES.get(new, new)
        if key in a and old != new:
            differing.append(key)
    return differing


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def refuse_changed_config(run_dir: Path, stored: dict, current: dict, allowed: list[str]) -> None:
    keys = config_differences(stored, current, allowed)
    if not keys:
        return
    a, b = flatten(stored), flatten(current)
    shown = ", ".join(f"{k} ({_short(a.get(k))} -> {_short(b.get(k))})" for k in keys[:6])
    more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
    raise UsageError(f"run directory {run_dir} holds a run with another config: {shown}{more}; "
                     "pass a new --run_dir for a new run, or --resume_allow=[KEY,...] to resume "
                     "with these keys changed")


def load_checkpoint_checked(path: str | Path) -> dict:
    """A checkpoint's contents, or a UsageError naming what is wrong with the file. Loaded with
    weights_only=True: bnstudy's checkpoints hold only tensors and plain values."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise UsageError(f"checkpoint {path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise UsageError(f"checkpoint {path} is empty")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        kind = "truncated or damaged" if head == b"PK\x03\x04" else "not a PyTorch checkpoint"
        raise UsageError(f"checkpoint {path} is {kind} (no readable zip archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, zipfile.BadZipFile,
            IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first.split(" Please file an issue")[0].split(" (1) In PyTorch")[0]
        raise UsageError(f"checkpoint {path} cannot be read safely ({first[:160]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise UsageError(f"checkpoint {path} is not a Lightning training checkpoint "
                         "(no state_dict/global_step)")
    return ckpt


def check_checkpoint_fits(path, ckpt: dict, model) -> None:
    """The checkpoint's weights must be the model's: same class, same parameter names and shapes.
    Names the hyperparameters that differ (norm, depth, ...) when they explain it."""
    hp = ckpt.get("hyper_parameters") or {}
    mine = dict(getattr(model, "hparams", {}) or {})
    theirs_class = hp.get("_class_path")
    my_class = f"{type(model).__module__}.{type(model).__qualname__}"
    state, expected = ckpt["state_dict"], model.state_dict()
    shape = lambda t: tuple(getattr(t, "shape", ()))  # noqa: E731 (noisy BN keeps dicts too)
    mismatch = (set(state) != set(expected)
                or any(shape(state[k]) != shape(expected[k]) for k in state if k in expected))
    if theirs_class and theirs_class != my_class:
        raise UsageError(f"checkpoint {path} is from a {theirs_class.rsplit('.', 1)[-1]}, not a "
                         f"{my_class.rsplit('.', 1)[-1]}; pass the config it was trained with")
    if mismatch:
        diff = [f"{k}={hp[k]!r} (this config: {mine[k]!r})" for k in sorted(hp)
                if not k.startswith("_") and k in mine and hp[k] != mine[k]]
        why = ", ".join(diff[:4]) if diff else "different parameter names or shapes"
        raise UsageError(f"checkpoint {path} does not fit this model: it was trained with {why}")


def remove_new_run_dir(run_dir: Path, created: Path) -> None:
    """Undo a run directory this process created, after a failure before the first step: the run
    directory itself, then its parents up to `created` (the topmost one this run made) while they
    are empty, so that runs started beside it at the same time are never touched."""
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = Path(run_dir).parent
    top = Path(created)
    while parent != top.parent and parent != parent.parent:
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
        parent = parent.parent
