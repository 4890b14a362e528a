"""Figures of `python -m bnstudy spectrum` and `surface`, drawn from the data they save beside
the PNGs (RUN_DIR/landscape/spectrum.npz, surface-step<N>.npz, line-<A>-<B>.npz), so that the
report redraws them from the files alone. Light on purpose: numpy and matplotlib, no torch.

Each draw function takes [(label, norm, data)] (data: the npz as a dict) and returns a matplotlib
Figure; the colour of a run is its normalization's, as in every figure of the report.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

Entry = tuple[str, str, dict]  # (label, norm, data)
FLOOR = 1e-6  # densities are drawn on a log axis down to FLOOR x their peak


def load(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _color(norm: str, i: int) -> str:
    from bnstudy.report import NORM_COLORS

    return NORM_COLORS.get(norm, f"C{i % 10}")


def _axes(n: int, cols: int = 3, w: float = 4.6, h: float = 3.4):
    from bnstudy.report import _grid

    return _grid(n, cols, w, h)


def _finish(fig, title: str, axes):
    from bnstudy.report import _finish as finish

    return finish(fig, title, axes)


def spectrum_figure(entries: list[Entry]) -> object:
    """The runs side by side: the density at each run's last checkpoint (with its error band),
    then over the checkpoints lambda_max and lambda_min, the trace, the negative mass (each with
    its standard error), and the per-layer lambda_max at the last checkpoint when measured."""
    layered = [e for e in entries if "layer_lambda_max" in e[2]]
    fig, axes = _axes(5 if layered else 4)
    ax = axes[0]
    floor = FLOOR * max(float(np.nanmax(d["density"][-1])) for _, _, d in entries)
    for i, (label, norm, d) in enumerate(entries):
        color = _color(norm, i)
        grid, density, se = d["grid"][-1], d["density"][-1], d["density_se"][-1]
        ax.plot(grid, np.maximum(density, floor), color=color, lw=1.2,
                label=f"{label} (step {int(d['steps'][-1])})")
        ax.fill_between(grid, np.maximum(density - 2 * se, floor),
                        np.maximum(density + 2 * se, floor), color=color, alpha=0.25, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (+-2 se)")
    ax.set_title("Hessian spectrum, last checkpoint", fontsize=9)
    panels = [("lambda_max", "lambda_min", "top and bottom Ritz value"),
              ("trace", None, "trace (+-2 se)"), ("neg_mass", None, "fraction negative (+-2 se)")]
    for ax, (key, low, ylabel) in zip(axes[1:], panels):
        for i, (label, norm, d) in enumerate(entries):
            color = _color(norm, i)
            steps = d["steps"]
            if f"{key}_se" in d:
                ax.errorbar(steps, d[key], yerr=2 * d[f"{key}_se"], color=color, marker=".",
                            ms=4, lw=1.2, capsize=2)
            else:
                ax.plot(steps, d[key], color=color, marker=".", ms=4, lw=1.2)
            if low:
                ax.plot(steps, d[low], color=color, marker=".", ms=3, lw=0.8, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if steps.min() >= 0 and len(steps) > 2 and steps.max() > 10 * max(1, np.sort(steps)[1]):
            ax.set_xscale("symlog", linthresh=1)
    if layered:
        ax = axes[4]
        for i, (label, norm, d) in enumerate(layered):
            values = d["layer_lambda_max"][-1]
            ax.plot(np.arange(1, len(values) + 1), values, color=_color(norm, i), marker="o",
                    ms=3, lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("lambda_max of the layer's block")
        ax.set_title("per layer, last checkpoint", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    return _finish(fig, "Hessian spectrum (stochastic Lanczos quadrature, train mode)", axes)


def spectrum_over_training(label: str, d: dict) -> object:
    """One run: the density at every checkpoint, coloured from early (light) to late (dark)."""
    import matplotlib

    fig, axes = _axes(1, w=6.5, h=4.2)
    ax = axes[0]
    cmap = matplotlib.colormaps["viridis"]
    steps = d["steps"]
    floor = FLOOR * float(np.nanmax(d["density"]))
    for k, step in enumerate(steps):
        color = cmap(0.9 - 0.8 * k / max(1, len(steps) - 1))
        ax.plot(d["grid"][k], np.maximum(d["density"][k], floor), color=color, lw=1.0,
                label=f"step {int(step)}")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    return _finish(fig, f"Hessian spectrum over training: {label}", axes)


def surface_figure(entries: list[Entry]) -> object:
    """One panel per run: the loss on the grid (filled contours, log-spaced levels), the center
    (the checkpoint the grid is around) and the run's trajectory projected onto the plane."""
    from bnstudy.report import _plt

    cols = min(3, len(entries))
    rows = -(-len(entries) // cols)
    # constrained layout: room for each panel's colour bar (a handful of panels, cheap)
    fig, grid = _plt().subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False,
                                layout="constrained")
    axes = list(grid.flat)
    for ax in axes[len(entries):]:
        ax.axis("off")
    for ax, (label, norm, d) in zip(axes, entries):
        x, y = d["coords0"], d["coords1"]
        loss = np.asarray(d["loss"], dtype=float)
        finite = loss[np.isfinite(loss)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (1.0, 1.0)
        log = finite.size and hi > 10 * lo > 0  # a decade or more: log-spaced levels
        levels = np.geomspace(lo, hi, 25) if log else np.linspace(lo, hi + 1e-12 * abs(hi), 25)
        shown = np.where(np.isfinite(loss), loss, hi)  # a diverged point: drawn as the highest
        filled = ax.contourf(x, y, shown.T, levels=levels, cmap="viridis",
                             norm=_log_norm(levels) if log else None)
        ax.contour(x, y, shown.T, levels=levels[::3], colors="w", linewidths=0.4)
        fig.colorbar(filled, ax=ax, label="loss")
        if "trajectory" in d and len(d["trajectory"]):
            t = d["trajectory"]
            ax.plot(t[:, 0], t[:, 1], color="r", lw=1.0, marker=".", ms=4)
            steps = d.get("trajectory_steps", np.arange(len(t)))
            for k in {0, len(t) - 1}:
                ax.annotate(f"{int(steps[k])}", t[k], fontsize=7, color="r",
                            textcoords="offset points", xytext=(3, 3))
        ax.plot([0], [0], marker="*", color="w", ms=9, mec="k")
        kind = str(d.get("directions", ""))
        ax.set_title(f"{label}, step {int(d['center_step'])}\n{kind} directions, "
                     f"{d.get('mode', 'train')} mode", fontsize=8)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    fig.suptitle("Loss surface around a checkpoint, with the trajectory")
    return fig


def _log_norm(levels):
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=levels[0], vmax=levels[-1])


def line_figure(entries: list[Entry]) -> object:
    """1-D interpolation between two checkpoints of each run: loss against alpha."""
    fig, axes = _axes(1, w=6.0, h=4.0)
    ax = axes[0]
    for i, (label, norm, d) in enumerate(entries):
        a, b = int(d["from_step"]), int(d["to_step"])
        ax.plot(d["coords0"], d["loss"], color=_color(norm, i), lw=1.2,
                label=f"{label}: step {a} (0) to {b} (1)")
    ax.axvline(0, color="k", lw=0.6, ls=":")
    ax.axvline(1, color="k", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    return _finish(fig, "Loss along the line between two checkpoints", axes)
