"""`python -m bnstudy report RUN_DIR_OR_GLOB... [--wandb ENTITY/PROJECT[/SWEEP_ID]] --out DIR`

Rebuilds the paper's figures and checks its claims from finished runs: one PNG per figure that
has runs, `index.html` with every figure, a table of the runs and the claims table
(bnstudy.claims). Arguments are run directories, globs, or directories holding run directories at
any depth (each run directory has config.yaml and metrics.csv). A figure without runs is skipped
with one line naming the config or sweep that feeds it. With a W&B mode active (WANDB_MODE
online/offline, or an API key) the same figures and tables go to one W&B run (job type report)
in the runs' project. `--wandb` reads the runs from W&B instead (online only).

Figures are a registry (FIGURES): a name, which runs feed it (a predicate on each run), a draw
function and the config or sweep that feeds it. Add one with `FIGURES.append(FigureSpec(...))`.
"""
from __future__ import annotations

import argparse
import html
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bnstudy.runs import LABEL_KEYS, SEED_KEYS, Run, differing_keys, load_runs, load_wandb_runs

# ---------------------------------------------------------------- figure registry


@dataclass
class FigureSpec:
    name: str                             # file name (name.png) and W&B key
    title: str
    select: Callable[[Run], bool]         # does this run feed the figure?
    draw: Callable[[list[Run]], object]   # the selected runs -> a matplotlib Figure
    missing: str                          # the config or sweep that feeds it
    needs: tuple[str, ...] = ()           # metric prefixes a run must have logged
    # the selected runs -> those drawn ([] when too few for the figure)
    keep: Callable[[list[Run]], list[Run]] = lambda runs: runs

    def runs(self, runs: list[Run]) -> list[Run]:
        chosen = [r for r in runs if self.select(r) and all(r.has(p) for p in self.needs)]
        return self.keep(chosen) if chosen else []


def paper_runs(model: str, norms: tuple[str, ...], lrs: tuple[float, ...] | None = None):
    """Predicate: `model` runs with one of `norms`, at one of `lrs`, with the paper's optimizer."""
    def select(run: Run) -> bool:
        return (run.kind == model and run.norm in norms and run.paper_optimizer
                and (lrs is None or run.lr_is(*lrs)))
    return select


def any_norm(*norms: str) -> Callable[[list[Run]], list[Run]]:
    """keep: all the runs when one of them has one of `norms`, else none."""
    return lambda runs: runs if any(r.norm in norms for r in runs) else []


def varied(setting: Callable[[Run], object]) -> Callable[[list[Run]], list[Run]]:
    """keep: all the runs when they take at least two values of `setting`, else none."""
    return lambda runs: runs if len({setting(r) for r in runs}) > 1 else []


# ---------------------------------------------------------------- drawing helpers

PAPER_LAYERS = {"fig1": (3, 11), "fig2": (2, 9, 13), "fig3_vgg": (5, 10), "fig3_dln": (9, 17),
                "fig9": (1, 11, 24)}
MAX_LAYERS = 3


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _null_formatter():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _log_y(ax) -> None:
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if high > 10 * low:  # a decade or more: label decades only (minor labels are slow to draw)
        ax.yaxis.set_minor_formatter(_null_formatter())


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
        _log_y(ax)
    ax.grid(alpha=0.3)


def _subplots(rows: int, cols: int, w: float, h: float, **kw):
    """Subplots with fixed margins in inches: matplotlib's tight_layout measures every tick
    label and costs more than drawing the figure."""
    plt = _plt()
    width, height = w * cols, h * rows + 0.4
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, **kw)
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.2 / width, bottom=0.55 / height,
                        top=1 - 0.75 / height, wspace=0.4, hspace=0.55)
    return fig, axes


def _grid(n: int, cols: int = 3, w: float = 4.6, h: float = 3.4):
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = _subplots(rows, cols, w, h)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def _finish(fig, title: str, axes) -> object:
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        axes[0].legend(list(handles.values()), list(handles), fontsize=7)
    fig.suptitle(title)
    return fig


def curves(*panels: Panel, title: str = "") -> Callable[[list[Run]], object]:
    """Draw function: one panel per metric; keys with `{layer}` expand to the logged layers,
    one row per layer."""
    def draw(runs: list[Run], layers: tuple[int, ...] = ()) -> object:
        plain = [p for p in panels if "{layer}" not in p.key]
        per_layer = [p for p in panels if "{layer}" in p.key]
        expanded = list(plain)
        for layer in layers_of(runs, per_layer[0].key, layers) if per_layer else []:
            expanded += [Panel(p.key.replace("{layer}", layer), f"{p.ylabel} ({layer})", p.log,
                               p.band) for p in per_layer]
        fig, axes = _grid(len(expanded), cols=len(per_layer) if per_layer and not plain else 3)
        grouped = groups(runs)
        for ax, p in zip(axes, expanded):
            draw_lines(ax, grouped, p)
            ax.set_title(p.key, fontsize=9)
        return _finish(fig, title, axes)
    return draw


def with_layers(draw, layers: tuple[int, ...]):
    return lambda runs: draw(runs, layers)


def activations(layers: tuple[int, ...], title: str) -> Callable[[list[Run]], object]:
    """Distribution of one unit's activations over steps, per variant (rows) and layer
    (columns): 5-95% and 25-75% quantile bands and the median, as the paper's histograms."""
    def draw(runs: list[Run]) -> object:
        chosen = layers_of(runs, "act/{layer}/q50", layers)
        grouped = groups(runs)
        fig, axes = _subplots(len(grouped), len(chosen), 4.4, 2.8, sharex=True)
        for row, ((label, rs), (color, _)) in enumerate(zip(grouped, styles(grouped))):
            for col, layer in enumerate(chosen):
                ax = axes[row][col]
                key = f"act/{layer}"
                steps, q05, _, _ = mean_band(rs, f"{key}/q05")
                if not steps:
                    ax.axis("off")
                    continue
                q95 = mean_band(rs, f"{key}/q95")[1]
                q25, q75 = mean_band(rs, f"{key}/q25")[1], mean_band(rs, f"{key}/q75")[1]
                q50 = mean_band(rs, f"{key}/q50")[1]
                if len(q95) == len(steps):
                    ax.fill_between(steps, q05, q95, color=color, alpha=0.2, lw=0, label="5-95%")
                if len(q25) == len(q75) == len(steps):
                    ax.fill_between(steps, q25, q75, color=color, alpha=0.45, lw=0,
                                    label="25-75%")
                if len(q50) == len(steps):
                    ax.plot(steps, q50, color=color, lw=1, label="median")
                ax.set_title(f"{label}: {layer}", fontsize=9)
                ax.set_ylabel("activation")
                ax.grid(alpha=0.3)
                if row == len(grouped) - 1:
                    ax.set_xlabel("step")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title)
        return fig
    return draw


def grad_diff_vs_step_size(runs: list[Run]) -> object:
    """Figure 11: ||grad(W) - grad(W - eta g)|| against eta, early (solid) and last (dashed)
    probe step, one panel per model."""
    kinds = sorted({r.kind for r in runs})
    fig, axes = _grid(len(kinds))
    for ax, kind in zip(axes, kinds):
        for i, (label, rs) in enumerate(groups([r for r in runs if r.kind == kind])):
            r = rs[0]
            keys = [k for k in r.keys("landscape/grad_diff/x")]
            mults = sorted((float(k.rsplit("/x", 1)[1]), k) for k in keys)
            steps = sorted({s for _, k in mults for s, _ in r.finite(k)})
            picks = [s for s in steps if s > 0][:1] + steps[-1:]
            for style, step in zip(("-", "--"), dict.fromkeys(picks)):
                pts = [(m * r.lr, dict(r.finite(k)).get(step)) for m, k in mults]
                pts = [(x, y) for x, y in pts if y is not None and y > 0]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=f"C{i % 10}",
                            label=f"{label}, step {step}")
        ax.set_xscale("log")
        _log_y(ax)
        ax.set_xlabel("step size eta")
        ax.set_ylabel("||grad L(W) - grad L(W - eta g)||")
        ax.set_title(kind.upper(), fontsize=9)
        ax.grid(alpha=0.3)
    return _finish(fig, "Figure 11: gradient difference vs step size", axes)


def _final_metric(run: Run) -> tuple[str, float | None, bool]:
    """What a sweep plots per run: VGG final test accuracy, DLN final train loss."""
    if run.kind == "dln":
        return "final train loss", (math.nan if run.diverged else run.last("train/loss")), True
    return "final test accuracy", (0.1 if run.diverged else run.last("val/acc")), False


def sweep_plot(panel_of: Callable[[Run], str], line_of: Callable[[Run], str],
               x_of: Callable[[Run], float], xlabel: str, title: str):
    """Final metric against a swept setting: one panel per panel_of, one line per line_of, the
    mean over seeds with a min-max error bar; diverged runs marked x."""
    def draw(runs: list[Run]) -> object:
        panels = sorted({panel_of(r) for r in runs})
        fig, axes = _grid(len(panels))
        lines = sorted({line_of(r) for r in runs})
        for ax, panel in zip(axes, panels):
            log_y = False
            for i, line in enumerate(lines):
                rs = [r for r in runs if panel_of(r) == panel and line_of(r) == line]
                xs = sorted({x_of(r) for r in rs})
                pts = []
                for x in xs:
                    vals = [_final_metric(r) for r in rs if x_of(r) == x]
                    ylabel, log_y = vals[0][0], vals[0][2]
                    ys = [v for _, v, _ in vals if v is not None and math.isfinite(v)]
                    if ys:
                        pts.append((x, sum(ys) / len(ys), min(ys), max(ys)))
                    div = [r for r in rs if x_of(r) == x and r.diverged]
                    if div and not log_y:
                        ax.plot([x], [0.1], "x", color=f"C{i % 10}")
                if pts:
                    x, m, lo, hi = zip(*pts)
                    ax.errorbar(x, m, yerr=[[a - b for a, b in zip(m, lo)],
                                            [b - a for a, b in zip(m, hi)]],
                                marker="o", ms=3, capsize=2, color=f"C{i % 10}", label=line)
                    ax.set_ylabel(ylabel)
            ax.set_xscale("log")
            xs = sorted({x_of(r) for r in runs if panel_of(r) == panel})
            ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the swept values themselves
            ax.xaxis.set_minor_formatter(_null_formatter())
            if log_y:
                _log_y(ax)
            ax.set_xlabel(xlabel)
            ax.set_title(panel, fontsize=9)
            ax.grid(alpha=0.3)
        return _finish(fig, title, axes)
    return draw


def _optimizer_label(r: Run) -> str:
    label = str(r.get("optimizer", "sgd"))
    if r.get("momentum"):
        label += f" momentum {r.get('momentum')}"
    if r.get("weight_decay"):
        label += f" wd {r.get('weight_decay')}"
    return label


def _seed_groups(runs: list[Run]) -> list[Run]:
    """Runs whose settings (seeds aside) were run with at least two seeds."""
    by: dict[tuple, list[Run]] = {}
    for r in runs:
        key = tuple(sorted((k, repr(v)) for k, v in r.settings.items() if k not in SEED_KEYS))
        by.setdefault(key, []).append(r)
    return [r for rs in by.values() if len(rs) > 1 for r in rs]


LANDSCAPE = (Panel("landscape/loss", "loss along the gradient (band over step sizes)",
                   log=True, band=True),
             Panel("landscape/grad_diff", "||grad L(W) - grad L(W - eta g)||", log=True,
                   band=True),
             Panel("landscape/beta_eff", "effective beta-smoothness", log=True))
ACC = (Panel("train/acc", "train accuracy"), Panel("val/acc", "test accuracy"))
ICS = (Panel("ics/l2/{layer}", "||G - G'||", log=True), Panel("ics/cos/{layer}", "cos(G, G')"))
DRIFT = (Panel("act/{layer}/dmean", "|step-to-step change of mean|", log=True),
         Panel("act/{layer}/dvar", "|step-to-step change of variance|", log=True))
STD_BN = ("none", "batch")
LP = ("none", "batch", "l1", "l2", "linf")
VGG_LP_FEED = ("configs/vgg_l1.yaml, vgg_l2.yaml, vgg_linf.yaml beside vgg.yaml and vgg_bn.yaml "
               "at lr 0.1 (sweeps/fig5_lp_vgg.yaml)")
DLN_LP_FEED = ("configs/dln_l1.yaml, dln_l2.yaml, dln_linf.yaml beside dln.yaml and dln_bn.yaml "
               "at lr 1e-6 (sweeps/fig5_lp_dln.yaml)")

FIGURES: list[FigureSpec] = [
    FigureSpec("fig1_accuracy", "Figure 1: VGG with and without BN at lr 0.1 and 0.5",
               paper_runs("vgg", STD_BN, (0.1, 0.5)),
               curves(*ACC, title="Figure 1: VGG with and without BN"),
               "configs/vgg.yaml and configs/vgg_bn.yaml at lr 0.1 and 0.5 "
               "(sweeps/fig1_norm_lr.yaml)", needs=("train/acc",)),
    FigureSpec("fig1_activations", "Figure 1: activations of layers 3 and 11, with and without BN",
               paper_runs("vgg", STD_BN, (0.1, 0.5)),
               activations(PAPER_LAYERS["fig1"], "Figure 1: activation distributions"),
               "configs/vgg.yaml and configs/vgg_bn.yaml at lr 0.1 and 0.5 "
               "(sweeps/fig1_norm_lr.yaml)", needs=("act/",)),
    FigureSpec("fig2_noisy_bn", "Figure 2: standard vs BN vs noisy BN (and noise without BN)",
               paper_runs("vgg", ("none", "batch", "noisy_batch", "noise"), (0.1,)),
               curves(*ACC, Panel("train/loss", "train loss", log=True),
                      title="Figure 2: standard vs BN vs noisy BN"),
               "configs/vgg.yaml, vgg_bn.yaml, vgg_noisy_bn.yaml and --model.norm=noise at lr 0.1 "
               "(sweeps/fig2_noisy_bn.yaml)", needs=("train/acc",),
               keep=any_norm("noisy_batch", "noise")),
    FigureSpec("fig2_activations", "Figure 2: activations of layers 2, 9, 13 under noisy BN",
               paper_runs("vgg", ("none", "batch", "noisy_batch", "noise"), (0.1,)),
               activations(PAPER_LAYERS["fig2"], "Figure 2: activation distributions"),
               "configs/vgg.yaml, vgg_bn.yaml, vgg_noisy_bn.yaml at lr 0.1 "
               "(sweeps/fig2_noisy_bn.yaml)", needs=("act/",),
               keep=any_norm("noisy_batch", "noise")),
    FigureSpec("fig3_ics_vgg", "Figure 3: ICS of VGG at lr 0.1 and 0.01",
               paper_runs("vgg", STD_BN, (0.1, 0.01)),
               with_layers(curves(*ICS, title="Figure 3: ICS, VGG"), PAPER_LAYERS["fig3_vgg"]),
               "configs/vgg.yaml and configs/vgg_bn.yaml at lr 0.1 and 0.01 "
               "(sweeps/fig3_ics_vgg.yaml)", needs=("ics/",)),
    FigureSpec("fig3_ics_dln", "Figure 3: ICS of the DLN at lr 1e-6 and 1e-7",
               paper_runs("dln", STD_BN, (1e-6, 1e-7)),
               with_layers(curves(*ICS, title="Figure 3: ICS, DLN"), PAPER_LAYERS["fig3_dln"]),
               "configs/dln.yaml and configs/dln_bn.yaml at lr 1e-6 and 1e-7 "
               "(sweeps/fig3_ics_dln.yaml)", needs=("ics/",)),
    FigureSpec("fig4_landscape_vgg", "Figure 4: VGG loss landscape, BN vs standard",
               paper_runs("vgg", STD_BN, (0.1,)),
               curves(*LANDSCAPE, title="Figure 4: VGG landscape along the gradient"),
               "configs/vgg.yaml and configs/vgg_bn.yaml at lr 0.1 "
               "(sweeps/fig4_landscape_vgg.yaml)", needs=("landscape/beta_eff",)),
    FigureSpec("fig5_lp_vgg", "Figure 5: lp normalizations, VGG",
               paper_runs("vgg", LP, (0.1,)),
               curves(*ACC, Panel("train/loss", "train loss", log=True),
                      title="Figure 5: lp normalizations, VGG"),
               VGG_LP_FEED, needs=("train/acc",), keep=any_norm("l1", "l2", "linf")),
    FigureSpec("fig5_lp_dln", "Figure 5: lp normalizations, DLN",
               paper_runs("dln", LP, (1e-6,)),
               curves(Panel("train/loss", "train loss", log=True),
                      Panel("val/loss", "test loss", log=True),
                      title="Figure 5: lp normalizations, DLN"),
               DLN_LP_FEED, needs=("train/loss",), keep=any_norm("l1", "l2", "linf")),
    FigureSpec("fig6_activations_lp", "Figure 6: activations under each normalization (VGG)",
               paper_runs("vgg", LP, (0.1,)),
               activations(PAPER_LAYERS["fig1"], "Figure 6: activations under lp norms"),
               VGG_LP_FEED, needs=("act/",), keep=any_norm("l1", "l2", "linf")),
    FigureSpec("fig8_moment_drift", "Figure 8: step-to-step change of activation mean and var",
               paper_runs("vgg", LP + ("noisy_batch",), (0.1,)),
               with_layers(curves(*DRIFT, title="Figure 8: drift of activation moments"),
                           PAPER_LAYERS["fig2"]),
               "configs/vgg*.yaml at lr 0.1 with activation statistics "
               "(sweeps/fig2_noisy_bn.yaml, sweeps/fig5_lp_vgg.yaml)", needs=("act/",)),
    FigureSpec("fig9_activations_dln", "Figure 9: DLN activations (layers 1, 11, 24)",
               paper_runs("dln", LP, (1e-6,)),
               activations(PAPER_LAYERS["fig9"], "Figure 9: DLN activation distributions"),
               "configs/dln.yaml and configs/dln_bn.yaml at lr 1e-6 "
               "(sweeps/fig10_landscape_dln.yaml)", needs=("act/",)),
    FigureSpec("fig10_landscape_dln", "Figure 10: DLN loss landscape, BN vs standard",
               paper_runs("dln", STD_BN, (1e-6,)),
               curves(*LANDSCAPE, title="Figure 10: DLN landscape along the gradient"),
               "configs/dln.yaml and configs/dln_bn.yaml at lr 1e-6 "
               "(sweeps/fig10_landscape_dln.yaml)", needs=("landscape/beta_eff",)),
    FigureSpec("fig11_grad_diff_vs_step", "Figure 11: gradient difference vs step size",
               lambda r: paper_runs("vgg", STD_BN, (0.1,))(r) or paper_runs("dln", STD_BN,
                                                                            (1e-6,))(r),
               grad_diff_vs_step_size,
               "configs/vgg.yaml and vgg_bn.yaml at lr 0.1 or configs/dln.yaml and dln_bn.yaml "
               "at lr 1e-6 (sweeps/fig4_landscape_vgg.yaml, sweeps/fig10_landscape_dln.yaml)",
               needs=("landscape/grad_diff/x",)),
    FigureSpec("fig12_landscape_lp_vgg", "Figure 12: VGG landscape under lp normalizations",
               paper_runs("vgg", LP, (0.1,)),
               curves(*LANDSCAPE, title="Figure 12: VGG landscape under lp norms"),
               VGG_LP_FEED, needs=("landscape/beta_eff",), keep=any_norm("l1", "l2", "linf")),
    FigureSpec("fig13_landscape_lp_dln", "Figure 13: DLN landscape under lp normalizations",
               paper_runs("dln", LP, (1e-6,)),
               curves(*LANDSCAPE, title="Figure 13: DLN landscape under lp norms"),
               DLN_LP_FEED, needs=("landscape/beta_eff",), keep=any_norm("l1", "l2", "linf")),
    FigureSpec("q_optimizer", "Open question: BN's advantage across optimizers (final test "
                              "accuracy vs lr)",
               lambda r: (r.kind == "vgg" and r.get("init", "glorot") == "glorot"
                          and float(r.get("init_scale") or 1.0) == 1.0),
               sweep_plot(_optimizer_label, lambda r: r.norm, lambda r: r.lr, "learning rate",
                          "Optimizer x norm x lr (VGG)"),
               "sweeps/q_optimizer.yaml and sweeps/q_momentum.yaml (VGG runs with at least two "
               "optimizers)", needs=("train/loss",),
               keep=varied(_optimizer_label)),
    FigureSpec("q_init", "Open question: initialization scheme and scale x norm",
               lambda r: r.get("optimizer", "sgd") == "sgd" and not r.get("momentum"),
               sweep_plot(lambda r: f"{r.kind.upper()} lr {r.lr:g}",
                          lambda r: f"{r.get('init')}, {r.norm}",
                          lambda r: float(r.get("init_scale") or 1.0), "init scale",
                          "Initialization x norm"),
               "sweeps/q_init_vgg.yaml or sweeps/q_init_dln.yaml (runs with at least two init "
               "schemes or scales)", needs=("train/loss",),
               keep=varied(lambda r: (r.get("init"), r.get("init_scale")))),
    FigureSpec("q_seeds", "Seeds: mean and spread of the figure 1-2 runs",
               lambda r: r.kind == "vgg",
               curves(*ACC, Panel("train/loss", "train loss", log=True),
                      title="Seeds: mean and min-max band over seeds"),
               "sweeps/q_seeds.yaml (configurations run with at least two seeds)",
               needs=("train/acc",), keep=_seed_groups),
]


# ---------------------------------------------------------------- curvature (bnstudy.instruments.Curvature)

def edge_of_stability(runs: list[Run]) -> object:
    """One panel per configuration: the top Hessian eigenvalue (curv/lambda_max), the paper's
    effective beta (landscape/beta_eff, same step and batch) and the 2/lr line over steps."""
    grouped = groups(runs)
    fig, axes = _grid(len(grouped))
    for ax, (label, rs) in zip(axes, grouped):
        for key, color in (("curv/lambda_max", "C3"), ("landscape/beta_eff", "C0")):
            steps, mean, lo, hi = mean_band(rs, key)
            if steps:
                ax.plot(steps, mean, color=color, lw=1.2, marker=".", ms=3, label=key)
                if len(rs) > 1:
                    ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
        two = [v for r in rs for _, v in r.finite("curv/two_over_lr")]
        if two:
            ax.axhline(two[-1], color="k", ls="--", lw=1, label="2/lr")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        if ax.get_lines() and all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            _log_y(ax)
        ax.grid(alpha=0.3)
    return _finish(fig, "Edge of stability: lambda_max, beta_eff and 2/lr", axes)


CURVATURE_FEED = ("runs with a Curvature probe (bnstudy.instruments.Curvature, as in "
                  "configs/dln.yaml and dln_bn.yaml; python -m bnstudy findings --only eos)")
FIGURES += [
    FigureSpec("q_eos_dln", "Edge of stability, DLN: lambda_max and beta_eff vs 2/lr",
               lambda r: r.kind == "dln", edge_of_stability,
               "configs/dln.yaml and dln_bn.yaml at lr 1e-6 and 1e-7: " + CURVATURE_FEED,
               needs=("curv/lambda_max",)),
    FigureSpec("q_eos_vgg", "Edge of stability, VGG: lambda_max and beta_eff vs 2/lr",
               lambda r: r.kind == "vgg", edge_of_stability,
               "VGG runs at lr 0.1 and 0.5: " + CURVATURE_FEED, needs=("curv/lambda_max",)),
    FigureSpec("q_theorem41", "Theorem 4.1 on live training: lhs / rhs per BN layer",
               lambda r: r.norm == "batch",
               curves(Panel("thm41/ratio_printed/{layer}", "lhs / rhs, 1/sqrt(m) as printed",
                            log=True),
                      Panel("thm41/ratio_rederived/{layer}", "lhs / rhs, 1/m re-derived"),
                      title="Theorem 4.1: > 1 where the bound fails"),
               "BN runs with a BNGradientBound probe (bnstudy.instruments.BNGradientBound; "
               "python -m bnstudy findings --only eos)", needs=("thm41/",)),
]


# ---------------------------------------------------------------- the report

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


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_index(report: Report, specs: list[FigureSpec]) -> Path:
    esc = html.escape
    titles = {s.name: s.title for s in specs}
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>bnstudy report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
             "padding:3px 6px;text-align:left;vertical-align:top}img{max-width:100%}"
             ".shown{background:#d8f5d8}.not-shown{background:#f8d8d8}.no-runs{color:#888}"
             "</style></head><body><h1>bnstudy report</h1>",
             "<h2>Claims</h2><table><tr><th>#</th><th>claim</th><th>rule</th><th>numbers</th>"
             "<th>verdict</th></tr>"]
    for c in report.claims:
        parts.append(f"<tr><td>{c.number}</td><td>{esc(c.statement)}</td><td>{esc(c.rule)}</td>"
                     f"<td>{'<br>'.join(map(esc, c.numbers)) or '-'}</td>"
                     f"<td class='{c.verdict.replace(' ', '-')}'><b>{esc(c.verdict)}</b>"
                     f"{'<br>' + esc(c.note) if c.note else ''}</td></tr>")
    parts.append("</table><h2>Figures</h2>")
    for name, path in report.figures.items():
        parts.append(f"<h3 id='{esc(name)}'>{esc(titles.get(name, name))}</h3>"
                     f"<img src='{esc(path.name)}' alt='{esc(name)}'>")
    if report.skipped:
        parts.append("<h3>Skipped (no runs)</h3><ul>")
        parts += [f"<li>{esc(line)}</li>" for line in report.skipped.values()]
        parts.append("</ul>")
    columns, rows = report.table
    parts.append("<h2>Runs</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns)
                 + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row) + "</tr>")
    parts.append("</table></body></html>")
    path = report.out / "index.html"
    path.write_text("\n".join(parts))
    return path


def wandb_active() -> bool:
    """A W&B mode is active: WANDB_MODE online/offline, or (no WANDB_MODE) an API key."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode:
        return mode not in ("disabled", "false")
    return has_wandb_key()


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def log_to_wandb(report: Report, runs: list[Run]) -> Path:
    """One W&B run, job type report, in the runs' project: every figure and both tables."""
    import wandb

    projects = [r.wandb_project for r in runs]
    entity, project = max(set(projects), key=projects.count) if projects else (None, None)
    report.out.mkdir(parents=True, exist_ok=True)
    # the mode is read now: wandb keeps the settings of the first run of a process, which may
    # have been a fit with W&B disabled
    mode = os.environ.get("WANDB_MODE", "").lower()
    run = wandb.init(project=project or "bnstudy", entity=entity, job_type="report",
                     dir=str(report.out.resolve()), name=f"report-{report.out.name}",
                     mode=mode if mode in ("online", "offline") else None,
                     config={"runs": [r.id for r in runs], "figures": list(report.figures),
                             "skipped": list(report.skipped)}, reinit="create_new")
    try:
        columns, rows = report.table
        run.log({**{f"figures/{name}": wandb.Image(str(path))
                    for name, path in report.figures.items()},
                 "runs": wandb.Table(columns=columns, data=[[_cell(v) for v in row]
                                                            for row in rows]),
                 "claims": wandb.Table(columns=["claim", "statement", "rule", "numbers",
                                                "verdict", "note"],
                                       data=[[c.number, c.statement, c.rule, "\n".join(c.numbers),
                                              c.verdict, c.note] for c in report.claims])})
        for c in report.claims:
            run.summary[f"claim{c.number}"] = c.verdict
        return Path(run.dir).parent
    finally:
        run.finish()


def build_report(paths: list[str | Path], out_dir: str | Path, runs: list[Run] | None = None,
                 wandb: bool | None = None, figures: list[FigureSpec] | None = None,
                 echo: Callable[[str], None] = print) -> Report:
    """Figures, index.html and claims for the runs under `paths` (or the given `runs`), written
    to `out_dir`; logged to W&B when `wandb` (default: when a W&B mode is active)."""
    from bnstudy.claims import evaluate

    runs = load_runs(paths) if runs is None else runs
    report = Report(out=Path(out_dir))
    report.out.mkdir(parents=True, exist_ok=True)
    echo(f"{len(runs)} runs; writing the report to {report.out}")
    plt = _plt()
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
