"""`python -m bnstudy plot RUN_DIR [RUN_DIR ...] [--metrics KEY ...] [--out FILE.png]`

Curves of logged metrics over steps, one line per run, one panel per metric, from each run's
metrics.csv (so it works offline and without W&B). Runs are labelled by what differs between
their configs (norm, lr, optimizer, ...). Landscape bands (`landscape/loss_min` .. `loss_max`,
`landscape/grad_diff_min` .. `grad_diff_max`) are drawn as shaded bands when asked for by their
prefix, e.g. `--metrics landscape/loss landscape/grad_diff landscape/beta_eff`.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from bnstudy.analysis.runs import LABEL_KEYS, Run, differing_keys, read_config, read_metrics

DEFAULT_METRICS = ["train/loss", "train/acc", "val/acc"]


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Label each run by the settings that differ between the runs (runs.LABEL_KEYS)."""
    runs = [Run(id=d.name, config=read_config(d)) for d in run_dirs]
    differ = differing_keys(runs, LABEL_KEYS)
    if not differ:
        return [d.name for d in run_dirs]
    return [", ".join(f"{k}={r.get(k)}" for k in differ) for r in runs]


def plot(run_dirs: list[Path], metrics: list[str], out: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_metrics(d) for d in run_dirs]
    labels = run_labels(run_dirs)
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for series, label in zip(data, labels):
            lo, hi = series.get(f"{metric}_min"), series.get(f"{metric}_max")
            if lo and hi:  # a band: [min, max] over the probe's step sizes
                steps = [s for s, _ in lo]
                line = ax.plot(steps, [v for _, v in lo], lw=0.8, label=label)[0]
                ax.fill_between(steps, [v for _, v in lo], [v for _, v in hi],
                                color=line.get_color(), alpha=0.3)
            elif metric in series:
                steps, values = zip(*series[metric])
                ax.plot(steps, values, lw=1.2, label=label)
        ax.set_title(metric)
        ax.set_xlabel("step")
        if metric.startswith(("landscape/", "ics/l2", "train/loss")):
            if all(v > 0 for s in data for k, vals in s.items() if k.startswith(metric)
                   for _, v in vals):
                ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnstudy plot", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (with metrics.csv)")
    parser.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS)
    parser.add_argument("--out", type=Path, default=Path("plot.png"))
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "metrics.csv").exists()]
    if missing:
        parser.error(f"no metrics.csv in: {', '.join(missing)}")
    print(plot(args.run_dirs, args.metrics, args.out, args.title))
    return 0
