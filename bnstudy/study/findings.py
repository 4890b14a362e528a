"""`python -m bnstudy findings [--out results/findings] [--budget mini|tiny] [--only PART ...]`

The questions the paper leaves open, answered at mini scale on CPU with the study's own code
(Lightning fits, the Instruments callback): one command reruns every run, writes the numbers to
OUT/findings.json and one figure per question to OUT/*.png. docs/FINDINGS.md discusses them.

Parts (--only picks some):
  eos         edge of stability: lambda_max (curv/lambda_max), beta_eff and 2/lr over training,
              DLN-25 (full batch 1000, the paper's 10,000 steps) at lr 1e-6 and 1e-7 +-BN, and a
              tiny VGG-11 on 8x8 digits at lr 0.1 and 0.5 +-BN (and at lr 0.1 with lambda_max of
              one fixed batch's loss); Theorem 4.1 ratios on the BN runs
  optimizer   SGD, SGD+momentum 0.9, Adam x {none, BN} (tiny VGG on digits)
  init        Glorot, Kaiming, orthogonal, torch default x {none, BN} (tiny VGG-16 on digits)
  generalization  train/test accuracy gap, {none, BN} x seeds (tiny VGG on digits)
  smoother    none, BN, LayerNorm, GroupNorm, l1, l2, linf: lambda_max and beta_eff at the first
              measurement where training accuracy reached the matched level
  lemma45     Lemma 4.5 on a small DLN over init schemes and scales, with the counter-argument
The `tiny` budget (tests) runs every part for a handful of steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from bnstudy.analysis.drawing import pyplot
from bnstudy.analysis.runs import Run
from bnstudy.data import DigitsData, GaussianRegressionData
from bnstudy.instruments import BNGradientBound, Curvature, Instruments, Landscape
from bnstudy.instruments.vectors import total_norm
from bnstudy.models import DeepLinear, init_weights
from bnstudy.modules import DLNModule, VGGModule
from bnstudy.threads import ThreadsForFit

PARTS = ("eos", "optimizer", "init", "generalization", "smoother", "lemma45")
# steps per model, and how often the curvature/landscape probes measure
# mini is sized for a shared 2-core CPU (the DLN runs take 2,000 of the paper's 10,000 steps,
# measured at 0, 1, 2, 4, ... and every 250 steps); paper: the DLN's full 10,000 steps
BUDGETS = {
    "mini": {"dln_steps": 2000, "dln_every": 250, "vgg_steps": 300, "vgg_every": 50,
             "seeds": 3, "lemma_steps": 1500, "matched_acc": 0.9, "max_iter": 30},
    "paper": {"dln_steps": 10_000, "dln_every": 500, "vgg_steps": 300, "vgg_every": 50,
              "seeds": 3, "lemma_steps": 1500, "matched_acc": 0.9, "max_iter": 30},
    "tiny": {"dln_steps": 2, "dln_every": 2, "vgg_steps": 2, "vgg_every": 2, "seeds": 2,
             "lemma_steps": 5, "matched_acc": 0.0, "max_iter": 3},
}
VGG_TINY = {"depth": 11, "width": 0.125}  # 8..64 channels
# The digits' side for the VGG parts. At 8x8 the deep convs run on 1x1 maps where Glorot's scale
# starves the signal and no network without a norm leaves chance (docs/RESULTS.md, "why 32x32");
# 32 upscales them to CIFAR's shape (three channels) at about 10x the CPU time.
VGG_IMAGE_SIZE = 8


class Record(Callback):
    """Training loss (and accuracy) of every step."""

    def __init__(self):
        self.loss: list[tuple[int, float]] = []
        self.acc: list[tuple[int, float]] = []
        self.input_shape: list[int] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.input_shape is None:
            self.input_shape = list(batch[0].shape)
        step = trainer.global_step - 1
        self.loss.append((step, float(outputs["loss"])))
        acc = trainer.callback_metrics.get("train/acc")
        if acc is not None:
            self.acc.append((step, float(acc)))


def fit(model: str, steps: int, every: int, seed: int = 0, thm: bool = False,
        log_spaced: bool = False, max_iter: int = 30, image_size: int = VGG_IMAGE_SIZE,
        fixed_batch: bool = False, **model_kw) -> dict:
    """One Lightning fit with Curvature and Landscape (and Theorem 4.1 on BN runs) every `every`
    steps (every=0: no probes), also at 0, 1, 2, 4, ... if `log_spaced`; Curvature on the first
    batch at every measurement if `fixed_batch`; returns the logged series and the final
    train/test accuracy (VGG) as a Run (its summary holds seconds, input_shape, train_acc and
    test_acc).

    A plain Trainer in this process, not `python -m bnstudy fit`: about 50 fits of seconds each
    would spend more time starting the CLI than training, and none needs a run directory."""
    L.seed_everything(seed, verbose=False)
    if model == "dln":
        module = DLNModule(depth=25, dim=10, **model_kw)
        data = GaussianRegressionData(dim=10, num_samples=1000, seed=0)
        land = Landscape(lr_logspace=(0.01, 30, 8), every=every, log_spaced=log_spaced)
    else:
        channels = 1 if image_size == 8 else 3  # upscaled digits: CIFAR's three channels
        data = DigitsData(batch_size=64, seed=seed, image_size=image_size, channels=channels)
        module = VGGModule(**{**VGG_TINY, **model_kw}, num_classes=10, in_channels=channels,
                           image_size=image_size)
        land = Landscape(lr_multiples=[0.5, 1, 2, 4], every=every, log_spaced=log_spaced)
    probes_ = [Curvature(every=every, log_spaced=log_spaced, tol=1e-3, max_iter=max_iter,
                         fixed_batch=fixed_batch), land]
    if thm and model_kw.get("norm") == "batch":
        probes_.append(BNGradientBound(every=every, log_spaced=log_spaced))
    if not every:
        probes_ = []
    inst, rec = Instruments(probes_), Record()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=[inst, rec, ThreadsForFit()],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    started = time.perf_counter()
    trainer.fit(module, data)
    metrics: dict[str, list[tuple[int, float]]] = {"train/loss": rec.loss, "train/acc": rec.acc}
    for s, m in inst.history:
        for k, v in m.items():
            if not k.startswith("time/"):
                metrics.setdefault(k, []).append((s, v))
    run = Run(id=model, config={"model": model, "steps": steps, "seed": seed, **model_kw},
              metrics=metrics,
              summary={"seconds": time.perf_counter() - started, "input_shape": rec.input_shape})
    if model == "vgg":
        data.setup()
        run.summary["train_acc"], run.summary["test_acc"] = (
            _accuracy(module.net, *data.train_set), _accuracy(module.net, *data.test_set))
    return run


@torch.no_grad()
def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    acc = float((net(x).argmax(1) == y).float().mean())
    net.train()
    return acc


def _finite(values):
    return [v for v in values if v is not None and math.isfinite(v)]


def summary(run: Run) -> dict:
    """The numbers a table needs: final loss, accuracies, median lambda_max and beta_eff over the
    measurements after the first, and their value at the end."""
    lam = [v for _, v in run.series("curv/lambda_max")]
    beta = [v for _, v in run.series("landscape/beta_eff")]
    later = lambda xs: _finite(xs[1:] or xs)  # noqa: E731
    out = {"final_loss": run.last("train/loss"),
           "lambda_max_median": statistics.median(later(lam)) if later(lam) else None,
           "lambda_max_last": lam[-1] if lam else None,
           "beta_eff_median": statistics.median(later(beta)) if later(beta) else None,
           "beta_eff_last": beta[-1] if beta else None, "seconds": run.summary["seconds"]}
    for k in ("train_acc", "test_acc"):
        if k in run.summary:
            out[k] = run.summary[k]
    return out


def _progress(i: int, n: int, name: str, started: float) -> None:
    print(f"[{i}/{n}] {name}  ({time.perf_counter() - started:.0f} s so far)", flush=True)


def _runs(plan: list[tuple[str, dict]], label: str, b: dict) -> dict[str, Run]:
    out, started = {}, time.perf_counter()
    for i, (name, kw) in enumerate(plan, 1):
        _progress(i, len(plan), f"{label}: {name}", started)
        if kw["model"] == "vgg":
            kw = {**kw, "image_size": b.get("vgg_image_size", VGG_IMAGE_SIZE)}
        out[name] = fit(**kw)
    return out


# ---- the parts ----------------------------------------------------------------------------------
def part_eos(b: dict) -> dict:
    plan = [(f"dln lr={lr:g} norm={norm}", dict(model="dln", steps=b["dln_steps"],
                                                 every=b["dln_every"], lr=lr, norm=norm, thm=True,
                                                 log_spaced=True, max_iter=b["max_iter"]))
            for lr in (1e-6, 1e-7) for norm in ("none", "batch")]
    plan += [(f"vgg lr={lr:g} norm={norm}", dict(model="vgg", steps=b["vgg_steps"],
                                                 every=b["vgg_every"], lr=lr, norm=norm, thm=True,
                                                 max_iter=b["max_iter"]))
             for lr in (0.1, 0.5) for norm in ("none", "batch")]
    # the same VGG at lr 0.1 with lambda_max of one fixed loss (the first batch's): is "above
    # 2/lr" on the step's minibatch batch-to-batch noise, or the sharpness of the loss?
    plan += [(f"vgg lr=0.1 norm={norm} fixed", dict(model="vgg", steps=b["vgg_steps"],
                                                    every=b["vgg_every"], lr=0.1, norm=norm,
                                                    fixed_batch=True, max_iter=b["max_iter"]))
             for norm in ("none", "batch")]
    return _runs(plan, "eos", b)


def part_optimizer(b: dict) -> dict:
    opts = {"sgd": dict(optimizer="sgd", lr=0.1), "sgd+momentum": dict(optimizer="sgd", lr=0.1,
                                                                       momentum=0.9),
            "adam": dict(optimizer="adam", lr=1e-3)}
    plan = [(f"{o} norm={norm}", dict(model="vgg", steps=b["vgg_steps"], every=b["vgg_every"],
                                      max_iter=b["max_iter"], norm=norm, **kw))
            for o, kw in opts.items() for norm in ("none", "batch")]
    return _runs(plan, "optimizer", b)


def part_init(b: dict) -> dict:
    plan = [(f"{init} norm={norm}", dict(model="vgg", steps=b["vgg_steps"], every=b["vgg_every"],
                                         max_iter=b["max_iter"], norm=norm, init=init, lr=0.1,
                                         depth=16))
            for init in ("glorot", "kaiming", "orthogonal", "default") for norm in ("none", "batch")]
    return _runs(plan, "init", b)


def part_generalization(b: dict) -> dict:
    plan = [(f"norm={norm} seed={s}", dict(model="vgg", steps=b["vgg_steps"], every=0,
                                           norm=norm, lr=0.1, seed=s))
            for norm in ("none", "batch") for s in range(b["seeds"])]
    return _runs(plan, "generalization", b)


def part_smoother(b: dict) -> dict:
    plan = [(f"norm={norm}", dict(model="vgg", steps=b["vgg_steps"],
                                  every=b["vgg_every"] // 2 or 1, max_iter=b["max_iter"],
                                  norm=norm, lr=0.1))
            for norm in ("none", "batch", "layer", "group", "l1", "l2", "linf")]
    return _runs(plan, "smoother", b)


def matched(run: Run, level: float) -> dict:
    """lambda_max and beta_eff at the first measurement where the running training accuracy (the
    mean of the last 20 steps) reached `level`."""
    acc = dict(run.series("train/acc"))
    beta = dict(run.series("landscape/beta_eff"))
    for s, lam in run.series("curv/lambda_max"):
        window = [acc[t] for t in range(max(0, s - 19), s + 1) if t in acc]
        if window and statistics.mean(window) >= level:
            return {"step": s, "lambda_max": lam, "beta_eff": beta.get(s)}
    return {"step": None, "lambda_max": None, "beta_eff": None}


def part_lemma45(b: dict) -> dict:
    """Lemma 4.5 on a DLN-6 (width 10, mean squared loss, Adam to near-optimum): for each layer
    followed by BN, W0 (init) and W* (where BN training ended: an optimum of the BN net, whose loss
    is invariant to rescaling that layer), the closest rescaled optimum c W*, c = <W0, W*> /
    ||W*||^2, and the lemma's right-hand side. And the counter-argument's check: is the optimum
    found without BN an optimum of the BN net (its BN-loss gradient norm)?"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 10, generator=g)
    y = x @ torch.randn(10, 10, generator=g).T
    loss_fn = lambda o, t: F.mse_loss(o, t, reduction="sum") / len(o)  # noqa: E731

    # a hand-written Adam loop, not a Trainer: a Trainer's per-step overhead would dwarf these
    # full-batch steps of a 6-layer 10x10 network, 18 fits of `lemma_steps` each
    def train(model):
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(b["lemma_steps"]):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    rows, started = [], time.perf_counter()
    cases = [(s, c) for s in ("glorot", "orthogonal", "kaiming") for c in (0.25, 1.0, 4.0)]
    for i, (scheme, scale) in enumerate(cases, 1):
        _progress(i, len(cases), f"lemma45: {scheme} x{scale}", started)
        torch.manual_seed(i)
        bn, plain = DeepLinear(6, 10, "batch"), DeepLinear(6, 10, "none")
        init_weights(bn, scheme, scale)
        with torch.no_grad():  # the same W0 for both
            for lb, lp in zip([m for m in bn.modules() if isinstance(m, torch.nn.Linear)],
                              [m for m in plain.modules() if isinstance(m, torch.nn.Linear)]):
                lp.weight.copy_(lb.weight)
        w0 = [m.weight.detach().clone() for m in bn.modules() if isinstance(m, torch.nn.Linear)]
        loss_bn, loss_plain = train(bn), train(plain)
        w_star = [m.weight.detach() for m in bn.modules() if isinstance(m, torch.nn.Linear)]
        layers = []
        for a, w in list(zip(w0, w_star))[:-1]:  # the last layer has no BN after it
            inner, ww = float((a * w).sum()), float((w * w).sum())
            dist = float((a - w).pow(2).sum())
            bound = dist - (ww - inner) ** 2 / ww
            closest = float((a - inner / ww * w).pow(2).sum())
            layers.append({"inner": inner, "dist": dist, "closest": closest, "bound": bound})
        # the counter-argument: the no-BN optimum W*, put into the BN net (gamma 1, beta 0)
        probe = DeepLinear(6, 10, "batch")
        with torch.no_grad():
            for lp, lb in zip([m for m in plain.modules() if isinstance(m, torch.nn.Linear)],
                              [m for m in probe.modules() if isinstance(m, torch.nn.Linear)]):
                lb.weight.copy_(lp.weight)
        lbn = loss_fn(probe.train()(x), y)
        grad = torch.autograd.grad(lbn, list(probe.parameters()))
        rows.append({"init": scheme, "scale": scale, "loss_bn": loss_bn, "loss_plain": loss_plain,
                     "layers": layers,
                     "closest_over_dist": sum(r["closest"] for r in layers)
                     / sum(r["dist"] for r in layers),
                     "positive_inner": sum(r["inner"] > 0 for r in layers),
                     "bn_loss_at_plain_optimum": float(lbn.detach()),
                     "bn_grad_norm_at_plain_optimum": total_norm(list(grad))})
    return {"rows": rows}


# ---- figures ------------------------------------------------------------------------------------
def figure_eos(runs: dict, out: Path) -> None:
    plt = pyplot()
    names = list(runs)
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(4 * ((len(names) + 1) // 2), 7),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        run = runs[name]
        for key, label in (("curv/lambda_max", "lambda_max"), ("landscape/beta_eff", "beta_eff")):
            pts = [(s, v) for s, v in run.series(key) if v > 0 and math.isfinite(v)]
            if pts:
                ax.plot([max(s, 1) for s, _ in pts], [v for _, v in pts], marker=".",
                        label=label)
        two = run.series("curv/two_over_lr")
        if two:
            ax.axhline(two[0][1], color="k", ls="--", lw=1, label="2/lr")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "eos.png", dpi=110)
    plt.close(fig)


def figure_thm41(runs: dict, out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        for key, ls in (("ratio_printed", "-"), ("ratio_rederived", ":")):
            vals: dict[int, list[float]] = {}
            for k in run.keys(f"thm41/{key}/"):
                for s, v in run.finite(k):
                    vals.setdefault(s, []).append(v)
            if vals:
                steps = sorted(vals)
                ax.plot([max(s, 1) for s in steps], [max(vals[s]) for s in steps], ls=ls,
                        marker=".", label=f"{name}: {key} (max over layers)")
    ax.axhline(1, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("lhs / rhs  (> 1: the bound fails)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "theorem41.png", dpi=110)
    plt.close(fig)


def figure_curves(runs: dict, out: Path, filename: str, title: str) -> None:
    """Training loss, lambda_max and beta_eff over steps, one line per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, run in runs.items():
        loss = run.series("train/loss")
        k = max(1, len(loss) // 100)
        axes[0].plot([s for s, _ in loss][::k], [v for _, v in loss][::k], label=name, lw=1)
        for ax, key in zip(axes[1:], ("curv/lambda_max", "landscape/beta_eff")):
            pts = [(s, v) for s, v in run.series(key) if math.isfinite(v) and v > 0]
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".", lw=1, label=name)
    for ax, t in zip(axes, ("train loss", "lambda_max", "beta_eff")):
        ax.set_title(t)
        ax.set_yscale("log")
        ax.set_xlabel("step")
    axes[0].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / filename, dpi=110)
    plt.close(fig)


def figure_generalization(table: dict, out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (norm, row) in enumerate(table.items()):
        for j, key in enumerate(("train_acc", "test_acc")):
            vals = row[key]
            ax.bar(i * 3 + j, statistics.mean(vals),
                   yerr=statistics.stdev(vals) if len(vals) > 1 else 0, capsize=3,
                   color="C0" if j == 0 else "C1", label=key if i == 0 else None)
    ax.set_xticks([i * 3 + 0.5 for i in range(len(table))], list(table))
    ax.set_ylim(0.8, 1.0)
    ax.set_ylabel("accuracy (mean, std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "generalization.png", dpi=110)
    plt.close(fig)


def figure_lemma45(rows: list[dict], out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    labels = [f"{r['init']} x{r['scale']:g}" for r in rows]
    dist = [sum(layer["dist"] for layer in r["layers"]) for r in rows]
    closest = [sum(layer["closest"] for layer in r["layers"]) for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], dist, 0.4, label="||W0 - W*||^2")
    ax.bar([x + 0.2 for x in xs], closest, 0.4, label="||W0 - W-hat*||^2 (= the lemma's bound)")
    ax.set_xticks(list(xs), labels, rotation=60, fontsize=7)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lemma45.png", dpi=110)
    plt.close(fig)


# ---- driver -------------------------------------------------------------------------------------
def _save(out: Path, found: dict) -> None:
    """Merge into OUT/findings.json (parts run separately, e.g. --only eos, add up)."""
    path = out / "findings.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **found}, indent=1))


def run(out: Path, budget: str = "mini", only: list[str] | None = None,
        vgg_image_size: int = VGG_IMAGE_SIZE) -> dict:
    b = {**BUDGETS[budget], "vgg_image_size": vgg_image_size}
    out.mkdir(parents=True, exist_ok=True)
    parts = list(only or PARTS)
    found: dict = {"budget": budget, "settings": b}
    if "eos" in parts:
        runs = part_eos(b)
        figure_eos(runs, out)
        figure_thm41({k: v for k, v in runs.items() if "batch" in k}, out)
        thm = {}
        for name, r in runs.items():
            if r.keys("thm41/ratio_"):
                pick = lambda key: [v for k in r.keys(f"thm41/{key}/")  # noqa: E731
                                    for _, v in r.finite(k)]
                thm[name] = {key: {"min": min(pick(key)), "max": max(pick(key))}
                             for key in ("ratio_printed", "ratio_rederived", "holds_printed",
                                         "holds_rederived")}
        found["eos"] = {"runs": {k: summary(v) for k, v in runs.items()},
                        "series": {k: {"lambda_max": v.series("curv/lambda_max"),
                                       "beta_eff": v.series("landscape/beta_eff"),
                                       "two_over_lr": (v.series("curv/two_over_lr") or
                                                       [(0, None)])[0][1]}
                                   for k, v in runs.items()},
                        "theorem41": thm}
        _save(out, found)
    for part, fn, title in (("optimizer", part_optimizer, "optimizer x norm (VGG-11 digits)"),
                            ("init", part_init, "init x norm (VGG-16 digits, lr 0.1)"),
                            ("smoother", part_smoother, "normalizations (VGG-11 digits, lr 0.1)")):
        if part in parts:
            runs = fn(b)
            figure_curves(runs, out, f"{part}.png", title)
            found[part] = {"runs": {k: summary(v) for k, v in runs.items()}}
            if part == "smoother":
                found[part]["matched"] = {k: matched(v, b["matched_acc"]) for k, v in runs.items()}
                found[part]["matched_acc"] = b["matched_acc"]
            _save(out, found)
    if "generalization" in parts:
        runs = part_generalization(b)
        table: dict[str, dict[str, list[float]]] = {}
        for name, r in runs.items():
            norm = name.split()[0].split("=")[1]
            row = table.setdefault(norm, {"train_acc": [], "test_acc": [], "gap": []})
            row["train_acc"].append(r.summary["train_acc"])
            row["test_acc"].append(r.summary["test_acc"])
            row["gap"].append(r.summary["train_acc"] - r.summary["test_acc"])
        figure_generalization(table, out)
        found["generalization"] = table
        _save(out, found)
    if "lemma45" in parts:
        res = part_lemma45(b)
        figure_lemma45(res["rows"], out)
        found["lemma45"] = res
    _save(out, found)
    return found


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def tables(found: dict) -> str:
    """Markdown tables of a findings.json (what docs/FINDINGS.md quotes)."""
    out = []
    cols = ("final_loss", "train_acc", "test_acc", "lambda_max_median", "lambda_max_last",
            "beta_eff_median", "beta_eff_last")
    for part in ("eos", "optimizer", "init", "smoother"):
        if part not in found:
            continue
        out.append(f"### {part}\n\n| run | " + " | ".join(cols) + " |\n|" + " --- |" * (len(cols) + 1))
        for name, row in found[part]["runs"].items():
            out.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        if part == "smoother":
            out.append(f"\nmatched at running train accuracy >= {found[part]['matched_acc']}:\n\n"
                       "| run | step | lambda_max | beta_eff |\n| --- | --- | --- | --- |")
            for name, m in sorted(found[part]["matched"].items(),
                                  key=lambda kv: (kv[1]["lambda_max"] is None,
                                                  kv[1]["lambda_max"] or 0)):
                out.append(f"| {name} | {_fmt(m['step'])} | {_fmt(m['lambda_max'])} | "
                           f"{_fmt(m['beta_eff'])} |")
        if part == "eos" and found[part].get("theorem41"):
            out.append("\nTheorem 4.1 (min / max over measured steps and BN layers):\n\n"
                       "| run | lhs/rhs printed | lhs/rhs 1/m | units holding, printed | "
                       "units holding, 1/m |\n| --- | --- | --- | --- | --- |")
            for name, t in found[part]["theorem41"].items():
                out.append(f"| {name} | " + " | ".join(
                    f"{_fmt(t[k]['min'])} / {_fmt(t[k]['max'])}" for k in
                    ("ratio_printed", "ratio_rederived", "holds_printed", "holds_rederived"))
                    + " |")
        out.append("")
    if "generalization" in found:
        out.append("### generalization\n\n| norm | train acc | test acc | gap (mean, std) |\n"
                   "| --- | --- | --- | --- |")
        for norm, row in found["generalization"].items():
            gap = row["gap"]
            sd = statistics.stdev(gap) if len(gap) > 1 else 0.0
            out.append(f"| {norm} | {statistics.mean(row['train_acc']):.4f} | "
                       f"{statistics.mean(row['test_acc']):.4f} | "
                       f"{statistics.mean(gap):.4f} +- {sd:.4f} (n={len(gap)}) |")
        out.append("")
    if "lemma45" in found:
        out.append("### lemma45\n\n| init | loss BN | loss plain | layers with <W0,W*> > 0 | "
                   "sum closest / sum dist | BN loss at the plain optimum | BN grad norm there |"
                   "\n| --- | --- | --- | --- | --- | --- | --- |")
        for r in found["lemma45"]["rows"]:
            out.append(f"| {r['init']} x{r['scale']:g} | {_fmt(r['loss_bn'])} | "
                       f"{_fmt(r['loss_plain'])} | {r['positive_inner']}/{len(r['layers'])} | "
                       f"{_fmt(r['closest_over_dist'])} | {_fmt(r['bn_loss_at_plain_optimum'])} |"
                       f" {_fmt(r['bn_grad_norm_at_plain_optimum'])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnstudy findings", description=__doc__.split("\n")[2])
    parser.add_argument("--out", default="results/findings", help="output folder")
    parser.add_argument("--budget", choices=list(BUDGETS), default="mini")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    parser.add_argument("--vgg-image-size", type=int, choices=(8, 32), default=VGG_IMAGE_SIZE,
                        help="side of the digits for the VGG parts: 8 (default, fast; no network "
                             "without a norm trains there) or 32 (CIFAR's shape, ~10x slower)")
    parser.add_argument("--tables", action="store_true",
                        help="print OUT/findings.json as markdown tables; run nothing")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables(json.loads((Path(args.out) / "findings.json").read_text())))
        return 0
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|srun).*")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    started = time.perf_counter()
    run(Path(args.out), args.budget, args.only, args.vgg_image_size)
    print(f"findings written to {args.out} in {time.perf_counter() - started:.0f} s")
    return 0
