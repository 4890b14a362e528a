"""`python -m bnstudy report RUN_DIR_OR_GLOB... [--wandb ENTITY/PROJECT[/SWEEP_ID]] --out DIR`

Rebuilds the paper's figures and checks its claims from finished runs: one PNG per figure that
has runs, `index.html` with every figure, a table of the runs and the claims table
(bnstudy/analysis/claims.py). Arguments are run directories, globs, or directories holding run
directories at any depth (each run directory has config.yaml and metrics.csv). A figure without runs is skipped
with one line naming the config or sweep that feeds it. With a W&B mode active (WANDB_MODE
online/offline, or an API key) the same figures and tables go to one W&B run (job type report)
in the runs' project. `--wandb` reads the runs from W&B instead (online only).

The figures are a registry, FIGURES in bnstudy/analysis/figures.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bnstudy.analysis.drawing import pyplot
# the figure registry and the helpers to add a figure, importable from here as before
from bnstudy.analysis.figures import FIGURES, FigureSpec, Panel, curves, paper_runs  # noqa: F401
from bnstudy.analysis.html import write_index
from bnstudy.analysis.runs import Run, differing_keys, load_runs, load_wandb_runs
from bnstudy.analysis.wandb_report import has_wandb_key, log_to_wandb, wandb_active


@dataclass
class Report:
    out: Path
    figures: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> the line printed
    claims: list = field(default_factory=list)
    table: tuple[list[str], list[list]] = ([], [])
    index: Path | None = None
    wandb_dir: Path | None = None


def runs_table(runs: list[Run]) -> tuple[list[str], list[list]]:
    differ = [k for k in differing_keys(runs) if k not in ("trainer.max_steps",)]
    columns = ["run", *differ, "steps", "final train loss", "final train acc",
               "final test acc", "diverged"]
    rows = []
    for r in runs:
        rows.append([r.id, *[r.get(k) for k in differ], r.steps, r.last("train/loss"),
                     r.last("train/acc"), r.last("val/acc"), r.diverged])
    return columns, rows


def build_report(paths: list[str | Path], out_dir: str | Path, runs: list[Run] | None = None,
                 wandb: bool | None = None, figures: list[FigureSpec] | None = None,
                 echo: Callable[[str], None] = print) -> Report:
    """Figures, index.html and claims for the runs under `paths` (or the given `runs`), written
    to `out_dir`; logged to W&B when `wandb` (default: when a W&B mode is active)."""
    from bnstudy.analysis.claims import as_json, evaluate

    runs = load_runs(paths) if runs is None else runs
    report = Report(out=Path(out_dir))
    report.out.mkdir(parents=True, exist_ok=True)
    echo(f"{len(runs)} runs; writing the report to {report.out}")
    plt = pyplot()
    for spec in FIGURES if figures is None else figures:
        chosen = spec.runs(runs)
        if not chosen:
            line = f"skipped {spec.name}: no runs; fed by {spec.missing}"
            report.skipped[spec.name] = line
            echo(line)
            continue
        # a fixed title height: otherwise each title measures the tick labels below it to
        # place itself, the largest cost of saving these figures
        with plt.rc_context({"axes.titley": 1.01}):
            fig = spec.draw(chosen)
            path = report.out / f"{spec.name}.png"
            fig.savefig(path, dpi=100)
        plt.close(fig)
        report.figures[spec.name] = path
        echo(f"wrote {path} ({len(chosen)} runs)")
    report.claims = evaluate(runs)
    # the claims table for scripts and notebooks
    (report.out / "claims.json").write_text(json.dumps(as_json(report.claims), indent=1) + "\n")
    report.table = runs_table(runs)
    report.index = write_index(report, FIGURES if figures is None else figures)
    echo(f"wrote {report.index}")
    if wandb if wandb is not None else wandb_active():
        report.wandb_dir = log_to_wandb(report, runs)
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bnstudy report", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="run directories, globs, or folders of runs")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="output directory (default: report)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT[/SWEEP_ID]", default=None,
                        help="read the runs from W&B (online only)")
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb:
        parser.error("give run directories (or globs), or --wandb ENTITY/PROJECT[/SWEEP_ID]")
    try:
        runs = load_runs(args.paths) if args.paths else []
        if args.wandb:
            mode = os.environ.get("WANDB_MODE", "").lower()
            if mode in ("offline", "disabled", "dryrun", "false") or not has_wandb_key():
                why = f"WANDB_MODE={mode}" if mode in ("offline", "disabled", "dryrun",
                                                      "false") else "no W&B API key"
                raise ValueError(f"--wandb reads runs from the W&B server, which needs online "
                                 f"mode and an API key ({why}); pass run directories instead")
            runs += load_wandb_runs(args.wandb)
    except ValueError as err:
        print(f"bnstudy report: error: {err}", file=sys.stderr)
        return 2
    report = build_report([], args.out, runs=runs)
    verdicts = ", ".join(f"{c.number}: {c.verdict}" for c in report.claims)
    print(f"{len(report.figures)} figures, {len(report.skipped)} skipped; claims {verdicts}")
    return 0
