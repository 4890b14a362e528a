"""The paper's figures as a registry (FIGURES): a name, which runs feed it (a predicate on each
run), a draw function and the config or sweep that feeds it. Add one with
`FIGURES.append(FigureSpec(...))`; `python -m bnstudy report` draws every figure that has runs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from bnstudy.analysis.drawing import (Panel, draw_lines, finish, fixed_subplots, groups,
                                      layers_of, log_y, mean_band, null_formatter, panel_grid,
                                      styles)
from bnstudy.analysis.runs import SEED_KEYS, Run

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
        return (run.model == model and run.norm in norms and run.paper_optimizer
                and (lrs is None or run.lr_is(*lrs)))
    return select


def any_norm(*norms: str) -> Callable[[list[Run]], list[Run]]:
    """keep: all the runs when one of them has one of `norms`, else none."""
    return lambda runs: runs if any(r.norm in norms for r in runs) else []


def varied(setting: Callable[[Run], object]) -> Callable[[list[Run]], list[Run]]:
    """keep: all the runs when they take at least two values of `setting`, else none."""
    return lambda runs: runs if len({setting(r) for r in runs}) > 1 else []


# ---------------------------------------------------------------- the figures

PAPER_LAYERS = {"fig1": (3, 11), "fig2": (2, 9, 13), "fig3_vgg": (5, 10), "fig3_dln": (9, 17),
                "fig9": (1, 11, 24)}


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
        fig, axes = panel_grid(len(expanded), cols=len(per_layer) if per_layer and not plain else 3)
        grouped = groups(runs)
        for ax, p in zip(axes, expanded):
            draw_lines(ax, grouped, p)
            ax.set_title(p.key, fontsize=9)
        return finish(fig, title, axes)
    return draw


def with_layers(draw, layers: tuple[int, ...]):
    return lambda runs: draw(runs, layers)


def activations(layers: tuple[int, ...], title: str) -> Callable[[list[Run]], object]:
    """Distribution of one unit's activations over steps, per variant (rows) and layer
    (columns): 5-95% and 25-75% quantile bands and the median, as the paper's histograms."""
    def draw(runs: list[Run]) -> object:
        chosen = layers_of(runs, "act/{layer}/q50", layers)
        grouped = groups(runs)
        fig, axes = fixed_subplots(len(grouped), len(chosen), 4.4, 2.8, sharex=True)
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
    models = sorted({r.model for r in runs})
    fig, axes = panel_grid(len(models))
    for ax, model in zip(axes, models):
        for i, (label, rs) in enumerate(groups([r for r in runs if r.model == model])):
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
        log_y(ax)
        ax.set_xlabel("step size eta")
        ax.set_ylabel("||grad L(W) - grad L(W - eta g)||")
        ax.set_title(model.upper(), fontsize=9)
        ax.grid(alpha=0.3)
    return finish(fig, "Figure 11: gradient difference vs step size", axes)


def _final_metric(run: Run) -> tuple[str, float | None, bool]:
    """What a sweep plots per run: VGG final test accuracy, DLN final train loss."""
    if run.model == "dln":
        return "final train loss", (math.nan if run.diverged else run.last("train/loss")), True
    return "final test accuracy", (0.1 if run.diverged else run.last("val/acc")), False


def sweep_plot(panel_of: Callable[[Run], str], line_of: Callable[[Run], str],
               x_of: Callable[[Run], float], xlabel: str, title: str):
    """Final metric against a swept setting: one panel per panel_of, one line per line_of, the
    mean over seeds with a min-max error bar; diverged runs marked x."""
    def draw(runs: list[Run]) -> object:
        panels = sorted({panel_of(r) for r in runs})
        fig, axes = panel_grid(len(panels))
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
            ax.xaxis.set_minor_formatter(null_formatter())
            if log_y:
                log_y(ax)
            ax.set_xlabel(xlabel)
            ax.set_title(panel, fontsize=9)
            ax.grid(alpha=0.3)
        return finish(fig, title, axes)
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
               lambda r: (r.model == "vgg" and r.get("init", "glorot") == "glorot"
                          and float(r.get("init_scale") or 1.0) == 1.0),
               sweep_plot(_optimizer_label, lambda r: r.norm, lambda r: r.lr, "learning rate",
                          "Optimizer x norm x lr (VGG)"),
               "sweeps/q_optimizer.yaml and sweeps/q_momentum.yaml (VGG runs with at least two "
               "optimizers)", needs=("train/loss",),
               keep=varied(_optimizer_label)),
    FigureSpec("q_init", "Open question: initialization scheme and scale x norm",
               lambda r: r.get("optimizer", "sgd") == "sgd" and not r.get("momentum"),
               sweep_plot(lambda r: f"{r.model.upper()} lr {r.lr:g}",
                          lambda r: f"{r.get('init')}, {r.norm}",
                          lambda r: float(r.get("init_scale") or 1.0), "init scale",
                          "Initialization x norm"),
               "sweeps/q_init_vgg.yaml or sweeps/q_init_dln.yaml (runs with at least two init "
               "schemes or scales)", needs=("train/loss",),
               keep=varied(lambda r: (r.get("init"), r.get("init_scale")))),
    FigureSpec("q_seeds", "Seeds: mean and spread of the figure 1-2 runs",
               lambda r: r.model == "vgg",
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
    fig, axes = panel_grid(len(grouped))
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
            log_y(ax)
        ax.grid(alpha=0.3)
    return finish(fig, "Edge of stability: lambda_max, beta_eff and 2/lr", axes)


CURVATURE_FEED = ("runs with a Curvature probe (bnstudy.instruments.Curvature, as in "
                  "configs/dln.yaml and dln_bn.yaml; python -m bnstudy findings --only eos)")
FIGURES += [
    FigureSpec("q_eos_dln", "Edge of stability, DLN: lambda_max and beta_eff vs 2/lr",
               lambda r: r.model == "dln", edge_of_stability,
               "configs/dln.yaml and dln_bn.yaml at lr 1e-6 and 1e-7: " + CURVATURE_FEED,
               needs=("curv/lambda_max",)),
    FigureSpec("q_eos_vgg", "Edge of stability, VGG: lambda_max and beta_eff vs 2/lr",
               lambda r: r.model == "vgg", edge_of_stability,
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
