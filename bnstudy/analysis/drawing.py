"""Matplotlib helpers of the report's figures: runs grouped by what differs (seeds drawn as one
line with a band), one color per normalization, panels on a fixed-margin grid."""
from __future__ import annotations

import math
from dataclasses import dataclass

from bnstudy.analysis.runs import LABEL_KEYS, Run, differing_keys

MAX_LAYERS = 3


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def null_formatter():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def log_y(ax) -> None:
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if high > 10 * low:  # a decade or more: label decades only (minor labels are slow to draw)
        ax.yaxis.set_minor_formatter(null_formatter())


def groups(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Runs grouped by their settings without seeds, labelled by the settings that differ."""
    keys = differing_keys(runs, LABEL_KEYS) or ["norm"]
    out: dict[str, list[Run]] = {}
    for r in runs:
        label = ", ".join(f"{k}={r.get(k)}" if len(keys) > 1 or k != "norm" else str(r.get(k))
                          for k in keys)
        out.setdefault(label, []).append(r)
    return list(out.items())


def mean_band(runs: list[Run], key: str):
    """steps, mean, min, max over the runs (seeds) at the steps all of them logged."""
    per = [dict(r.finite(key)) for r in runs]
    per = [p for p in per if p] or [{}]
    common = sorted(set.intersection(*(set(p) for p in per))) or sorted(per[0])
    per = [p for p in per if all(s in p for s in common)]
    cols = [[p[s] for p in per] for s in common]
    return (common, [sum(c) / len(c) for c in cols], [min(c) for c in cols],
            [max(c) for c in cols])


def layers_of(runs: list[Run], pattern: str, preferred: tuple[int, ...] = ()) -> list[str]:
    """layerNN names logged under `pattern` (with {layer}), the paper's preferred ones first."""
    prefix, suffix = pattern.split("{layer}")
    found = sorted({k[len(prefix):len(k) - len(suffix)] for r in runs for k in r.keys(prefix)
                    if k.endswith(suffix)})
    wanted = [f"layer{n:02d}" for n in preferred if f"layer{n:02d}" in found]
    return (wanted + [layer for layer in found if layer not in wanted])[:MAX_LAYERS]


@dataclass
class Panel:
    key: str            # a metric, or a band prefix (key_min / key_max logged)
    ylabel: str
    log: bool = False
    band: bool = False


# one color per normalization in every figure; a norm's groups (other lr, ...) differ by line style
NORM_COLORS = {"none": "C1", "batch": "C0", "noisy_batch": "C2", "noise": "C3", "l1": "C4",
               "l2": "C5", "linf": "C6", "layer": "C7", "group": "C8"}


LINE_STYLES = ("-", "--", ":", "-.")


def styles(grouped: list[tuple[str, list[Run]]]) -> list[tuple[str, str]]:
    """(color, line style) per group: color by norm where the groups' norms differ."""
    if len({rs[0].norm for _, rs in grouped}) < 2:
        return [(f"C{i % 10}", "-") for i in range(len(grouped))]
    seen: dict[str, int] = {}
    out = []
    for _, rs in grouped:
        norm = rs[0].norm
        out.append((NORM_COLORS.get(norm, "C9"), LINE_STYLES[seen.get(norm, 0) % 4]))
        seen[norm] = seen.get(norm, 0) + 1
    return out


def draw_lines(ax, grouped, panel: Panel) -> None:
    for (label, rs), (color, style) in zip(grouped, styles(grouped)):
        label += f" ({len(rs)} seeds)" if len(rs) > 1 else ""
        if panel.band:
            steps, lo, _, _ = mean_band(rs, f"{panel.key}_min")
            steps_hi, hi, _, _ = mean_band(rs, f"{panel.key}_max")
            if not steps or steps != steps_hi:
                continue
            ax.fill_between(steps, lo, hi, color=color, alpha=0.35, lw=0, label=label)
            ax.plot(steps, lo, color=color, lw=0.6, ls=style)
            ax.plot(steps, hi, color=color, lw=0.6, ls=style)
            continue
        steps, mean, lo, hi = mean_band(rs, panel.key)
        if not steps:
            continue
        ax.plot(steps, mean, color=color, lw=1.2, ls=style, label=label)
        if len(rs) > 1:
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    if panel.log and all(y > 0 for line in ax.get_lines() for y in line.get_ydata()) \
            and ax.get_lines():
        log_y(ax)
    ax.grid(alpha=0.3)


def fixed_subplots(rows: int, cols: int, w: float, h: float, **kw):
    """Subplots with fixed margins in inches: matplotlib's tight_layout measures every tick
    label and costs more than drawing the figure."""
    plt = pyplot()
    width, height = w * cols, h * rows + 0.4
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, **kw)
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.2 / width, bottom=0.55 / height,
                        top=1 - 0.75 / height, wspace=0.4, hspace=0.55)
    return fig, axes


def panel_grid(n: int, cols: int = 3, w: float = 4.6, h: float = 3.4):
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = fixed_subplots(rows, cols, w, h)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def finish(fig, title: str, axes) -> object:
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        axes[0].legend(list(handles.values()), list(handles), fontsize=7)
    fig.suptitle(title)
    return fig
