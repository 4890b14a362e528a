"""Finished runs as data for `report` and the claims: each run's settings (from its config.yaml or
its W&B config) and its logged series (from metrics.csv or W&B history).

The one reader of run directories (metrics.csv, config.yaml) for plot, report, the claims,
reproduce and findings. Light on purpose (no torch, no Lightning): `python -m bnstudy report`
starts fast.
"""
from __future__ import annotations

import csv
import glob
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml

Series = list[tuple[int, float]]
# what labels a run in legends and the runs table; seeds are left out so runs that differ only by
# seed are drawn as one line with a band
LABEL_KEYS = ("model", "norm", "lr", "optimizer", "momentum", "weight_decay", "init",
              "init_scale", "depth", "width")
SEED_KEYS = ("seed_everything", "data.seed")
# settings that say where things are, not what was run
NOT_SETTINGS = ("data.root", "data.download", "data.num_workers")


@dataclass
class Run:
    id: str
    config: dict  # the full resolved config (config.yaml, or the W&B run config)
    metrics: dict[str, Series] = field(default_factory=dict)
    path: Path | None = None
    # numbers measured once, at the end (as W&B's run summary), e.g. findings' full-set accuracy
    summary: dict = field(default_factory=dict)

    @cached_property
    def settings(self) -> dict:
        """Flat settings: `model` (vgg, dln, ...), the model's init args by name (norm, lr, ...),
        `data` and `data.<arg>`, `seed_everything`, `trainer.max_steps`."""
        cfg, out = self.config, {}
        for group in ("model", "data"):
            part = cfg.get(group) or {}
            if isinstance(part, dict) and part.get("class_path"):
                name = str(part["class_path"]).rsplit(".", 1)[-1]
                out[group] = name.lower().removesuffix("module") if group == "model" else name
            prefix = "" if group == "model" else "data."
            _flatten(part.get("init_args") or {} if isinstance(part, dict) else {}, prefix, out)
        out["seed_everything"] = cfg.get("seed_everything")
        out["trainer.max_steps"] = (cfg.get("trainer") or {}).get("max_steps")
        for key in NOT_SETTINGS:
            out.pop(key, None)
        return out

    def get(self, key: str, default=None):
        return self.settings.get(key, default)

    @property
    def model(self) -> str:
        """The model family: vgg, dln (the model class's name without "Module")."""
        return str(self.get("model", ""))

    @property
    def norm(self) -> str:
        return str(self.get("norm", "none"))

    @property
    def lr(self) -> float:
        return float(self.get("lr") or 0.0)

    def lr_is(self, *values: float) -> bool:
        return any(math.isclose(self.lr, v, rel_tol=1e-6) for v in values)

    @property
    def paper_optimizer(self) -> bool:
        """The paper's recipe: plain SGD, no momentum or weight decay, Glorot at scale 1."""
        return (self.get("optimizer", "sgd") == "sgd" and not self.get("momentum")
                and not self.get("weight_decay") and self.get("init", "glorot") == "glorot"
                and float(self.get("init_scale") or 1.0) == 1.0)

    def series(self, key: str) -> Series:
        return [(s, v) for s, v in self.metrics.get(key, [])]

    def finite(self, key: str) -> Series:
        return [(s, v) for s, v in self.metrics.get(key, []) if math.isfinite(v)]

    def last(self, key: str) -> float | None:
        values = self.metrics.get(key)
        return values[-1][1] if values else None

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.metrics)

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.metrics if k.startswith(prefix))

    @property
    def diverged(self) -> bool:
        return any(v > 0 for _, v in self.metrics.get("diverged", [])) or any(
            not math.isfinite(v) for _, v in self.metrics.get("train/loss", []))

    @property
    def steps(self) -> int:
        logged = self.metrics.get("train/loss") or [p for s in self.metrics.values() for p in s]
        return max((s for s, _ in logged), default=0)

    @property
    def wandb_project(self) -> tuple[str | None, str | None]:
        """(entity, project) of the run's W&B logger in its config."""
        loggers = (self.config.get("trainer") or {}).get("logger") or []
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger"):
                args = logger.get("init_args") or {}
                return args.get("entity"), args.get("project")
        return None, None


def _flatten(args: dict, prefix: str, out: dict) -> None:
    for key, value in args.items():
        if isinstance(value, dict) and "class_path" not in value:
            _flatten(value, f"{prefix}{key}.", out)
        elif not isinstance(value, (dict, list)):
            out[f"{prefix}{key}"] = value


def differing_keys(runs: list[Run], keys: tuple[str, ...] | None = None) -> list[str]:
    """The settings whose values are not the same in every run that has them, in order."""
    if keys is None:
        seen: dict[str, None] = {}
        for r in runs:
            seen.update(dict.fromkeys(r.settings))
        keys = tuple(seen)
    # a key only some runs have (a DLN option beside VGG runs) differs only if its values do:
    # its presence is already told by the model or data class
    return [k for k in keys if len({repr(r.settings[k]) for r in runs if k in r.settings}) > 1]


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} with the last value kept when a step was logged twice
    (a resumed run re-logs the steps after its last checkpoint)."""
    series: dict[str, dict[int, float]] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def read_config(run_dir: Path) -> dict:
    """A run directory's config.yaml as a dict ({} when it has none)."""
    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def find_run_dirs(args: list[str | Path]) -> list[Path]:
    """Run directories (config.yaml + metrics.csv) named by each argument: the directory itself,
    a glob, or any directory below which runs lie (at any depth). Raises ValueError naming an
    argument that holds none."""
    found: dict[Path, None] = {}
    for arg in args:
        text = str(arg)
        matches = sorted(glob.glob(text, recursive=True)) if glob.has_magic(text) else [text]
        dirs: list[Path] = []
        for match in map(Path, matches):
            if (match / "config.yaml").is_file() and (match / "metrics.csv").is_file():
                dirs.append(match)
            elif match.is_dir():
                dirs += sorted(p.parent for p in match.rglob("metrics.csv")
                               if (p.parent / "config.yaml").is_file())
        if not dirs:
            raise ValueError(f"no run directories (config.yaml + metrics.csv) in {text}")
        found.update(dict.fromkeys(d.resolve() for d in dirs))
    return list(found)


def load_run(run_dir: Path, run_id: str | None = None) -> Run:
    """One run directory as a Run (no series yet when it has no metrics.csv)."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir) if (run_dir / "metrics.csv").is_file() else {}
    return Run(id=run_id or run_dir.name, config=read_config(run_dir), metrics=metrics,
               path=run_dir)


def load_runs(args: list[str | Path]) -> list[Run]:
    dirs = find_run_dirs(args)
    root = Path(os.path.commonpath(dirs)) if len(dirs) > 1 else dirs[0].parent
    return [load_run(d, str(d.relative_to(root))) for d in dirs]


def load_wandb_runs(spec: str) -> list[Run]:
    """Runs of ENTITY/PROJECT (report runs left out) or of the sweep ENTITY/PROJECT/SWEEP_ID,
    read through W&B's public API: the config and the full history of each."""
    import wandb
    from rich.progress import track

    parts = spec.strip("/").split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"--wandb expects ENTITY/PROJECT or ENTITY/PROJECT/SWEEP_ID, got {spec}")
    api = wandb.Api()
    found = api.sweep(spec).runs if len(parts) == 3 else api.runs("/".join(parts))
    runs = []
    for r in track(list(found), description=f"reading runs of {spec}"):
        if getattr(r, "job_type", None) != "report":
            runs.append(run_from_history(r.name or r.id, dict(r.config), r.scan_history()))
    if not runs:
        raise ValueError(f"no runs in W&B {spec}")
    return runs


def run_from_history(run_id: str, config: dict, rows) -> Run:
    """A Run from a W&B run's config and history rows (dicts). Steps are the trainer's global
    step that Lightning logs with every row (W&B's own _step counts log calls); media such as
    histograms are left out."""
    rows = list(rows)
    step_key = "trainer/global_step" if any("trainer/global_step" in r for r in rows) else "_step"
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        step = row.get(step_key)
        if step is None:
            continue
        for key, value in row.items():
            if (not key.startswith("_") and key not in ("trainer/global_step", "epoch")
                    and isinstance(value, (int, float)) and not isinstance(value, bool)):
                series.setdefault(key, {})[int(step)] = float(value)
    return Run(id=run_id, config=config, metrics={k: sorted(v.items()) for k, v in series.items()})
