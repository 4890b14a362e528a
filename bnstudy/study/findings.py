"""`python -m bnstudy findings [--out results/findings] [--budget mini|tiny] [--only PART ...]
[--seeds N] [--vgg-setup faithful|fast]`

The questions the paper leaves open, answered at mini scale on CPU with the study's own code
(Lightning fits, the Instruments callback): one command reruns every run, writes the numbers to
OUT/findings.json and one figure per question to OUT/*.png. docs/FINDINGS.md discusses them.

The VGG parts run the network of `reproduce mini` (`--vgg-setup faithful`, the default: VGG-11 at
1/8 width on the digits upscaled to 32x32x3, batch 128, channels_last, 600 steps), each arm over
--seeds seeds (the seed draws the init, the data order and the train/test split), and report
mean +- sd over them; `--vgg-setup fast` is the earlier 8x8 one-channel net (300 steps, batch 64)
on which no network without a norm trains.

Parts (--only picks some):
  eos         edge of stability: lambda_max (curv/lambda_max), beta_eff and 2/lr over training,
              DLN-25 (full batch 1000, the paper's 10,000 steps) at lr 1e-6 and 1e-7 +-BN, and the
              VGG at lr 0.1 and 0.5 +-BN (and at lr 0.1 with lambda_max of one fixed batch's
              loss); Theorem 4.1 ratios on the BN runs (one seed)
  optimizer   SGD, SGD+momentum 0.9 (lr 0.1 and 0.01), Adam x {none, BN}: steps to the matched
              training accuracy, final accuracies (no probes)
  init        Glorot, Kaiming, orthogonal, torch default x {none, BN}, SGD lr 0.1 (the same)
  generalization  {none, BN}: test accuracy at matched full-training-set loss, and at the end
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

from bnstudy.analysis import claims
from bnstudy.analysis.drawing import pyplot
from bnstudy.analysis.runs import Run
from bnstudy.data import DigitsData, GaussianRegressionData
from bnstudy.instruments import BNGradientBound, Curvature, Instruments, Landscape
from bnstudy.instruments.vectors import total_norm
from bnstudy.models import DeepLinear, function_preserving_bn, init_weights
from bnstudy.modules import DLNModule, VGGModule
from bnstudy.study.reproduce import VGG_BATCH, VGG_DEPTH, VGG_STEPS, VGG_WIDTH
from bnstudy.threads import ThreadsForFit

PARTS = ("eos", "optimizer", "init", "generalization", "smoother", "lemma45")
# steps per model, and how often the curvature/landscape probes measure
# mini is sized for a shared 2-core CPU (the DLN runs take 2,000 of the paper's 10,000 steps,
# measured at 0, 1, 2, 4, ... and every 250 steps); paper: the DLN's full 10,000 steps
BUDGETS = {
    "mini": {"dln_steps": 2000, "dln_every": 250, "vgg_every": 50,
             "seeds": 3, "lemma_steps": 1500, "matched_acc": 0.9, "max_iter": 30},
    "paper": {"dln_steps": 10_000, "dln_every": 500, "vgg_every": 50,
              "seeds": 3, "lemma_steps": 1500, "matched_acc": 0.9, "max_iter": 30},
    "tiny": {"dln_steps": 2, "dln_every": 2, "vgg_steps": 2, "vgg_every": 2, "seeds": 2,
             "lemma_steps": 5, "matched_acc": 0.0, "max_iter": 3},
}
VGG_TINY = {"depth": VGG_DEPTH, "width": VGG_WIDTH}  # VGG-11, 8..64 channels
# The VGG setups. faithful: `reproduce mini`'s (digits upscaled to CIFAR's shape; without a norm
# the net trains at lr 0.1, slower than with BN, in every seed searched). fast: 8x8 digits, where
# the deep convs run on 1x1 maps, Glorot's scale starves the signal and no network without a
# norm leaves chance (docs/RESULTS.md, "why 32x32"), at about 1/10 of the CPU time.
VGG_SETUPS = {
    "faithful": {"image_size": 32, "batch_size": VGG_BATCH, "channels_last": True,
                 "steps": VGG_STEPS},
    "fast": {"image_size": 8, "batch_size": 64, "channels_last": False, "steps": 300},
}
VGG_IMAGE_SIZE = 8  # fit()'s default: the fast setup
MATCHED_LOSSES = (0.3, 0.1, 0.03)  # full-training-set loss levels the generalization part reads


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


class WholeSets(Callback):
    """Loss and accuracy on the whole training and test sets (eval mode: BN's running
    statistics) at step 0, every `every` steps and at the end: eval/{train,test}_{loss,acc}."""

    def __init__(self, data, every: int):
        self.data, self.every = data, every
        self.history: list[tuple[int, dict]] = []

    def _measure(self, trainer, module) -> None:
        step = trainer.global_step
        if self.history and self.history[-1][0] == step:
            return
        row = {}
        for name, (x, y) in (("train", self.data.train_set), ("test", self.data.test_set)):
            loss, acc = _loss_acc(module.net, x, y)
            row[f"eval/{name}_loss"], row[f"eval/{name}_acc"] = loss, acc
        self.history.append((step, row))

    def on_train_start(self, trainer, module) -> None:
        self._measure(trainer, module)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if trainer.global_step % self.every == 0 or trainer.global_step == trainer.max_steps:
            self._measure(trainer, module)


def fit(model: str, steps: int, every: int, seed: int = 0, thm: bool = False,
        log_spaced: bool = False, max_iter: int = 30, image_size: int = VGG_IMAGE_SIZE,
        fixed_batch: bool = False, batch_size: int = 64, eval_every: int = 0,
        **model_kw) -> dict:
    """One Lightning fit with Curvature and Landscape (and Theorem 4.1 on BN runs) every `every`
    steps (every=0: no probes), also at 0, 1, 2, 4, ... if `log_spaced`; Curvature on the first
    batch at every measurement if `fixed_batch`; the loss and accuracy on the whole training and
    test sets every `eval_every` steps (eval/*; VGG); returns the logged series and the final
    train/test accuracy (VGG) as a Run (its summary holds seconds, input_shape, train_acc and
    test_acc). The seed draws the init, and for the VGG the data order and train/test split.

    A plain Trainer in this process, not `python -m bnstudy fit`: about 50 fits of seconds each
    would spend more time starting the CLI than training, and none needs a run directory."""
    L.seed_everything(seed, verbose=False)
    if model == "dln":
        module = DLNModule(depth=25, dim=10, **model_kw)
        data = GaussianRegressionData(dim=10, num_samples=1000, seed=0)
        land = Landscape(lr_logspace=(0.01, 30, 8), every=every, log_spaced=log_spaced)
    else:
        channels = 1 if image_size == 8 else 3  # upscaled digits: CIFAR's three channels
        data = DigitsData(batch_size=batch_size, seed=seed, image_size=image_size,
                          channels=channels)
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
    whole = WholeSets(data, eval_every) if eval_every and model == "vgg" else None
    callbacks = [inst, rec, ThreadsForFit()] + ([whole] if whole else [])
    # log_every_n_steps=1: the training accuracy of every step (the matched-accuracy rule reads
    # a 20-step window of it)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        log_every_n_steps=1)
    started = time.perf_counter()
    trainer.fit(module, data)
    metrics: dict[str, list[tuple[int, float]]] = {"train/loss": rec.loss, "train/acc": rec.acc}
    for s, m in inst.history + (whole.history if whole else []):
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
def _loss_acc(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              chunk: int = 512) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `net` (in eval mode) on (x, y)."""
    was_training = net.training
    net.eval()
    loss = correct = 0.0
    for i in range(0, len(x), chunk):
        out = net(x[i:i + chunk])
        loss += float(F.cross_entropy(out, y[i:i + chunk], reduction="sum"))
        correct += float((out.argmax(1) == y[i:i + chunk]).sum())
    net.train(was_training)
    return loss / len(x), correct / len(x)


def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return _loss_acc(net, x, y)[1]


def _finite(values):
    return [v for v in values if v is not None and math.isfinite(v)]


def steps_to(run: Run, level: float, window: int = 20) -> int | None:
    """The first step at which the mean training accuracy of the last `window` steps reached
    `level` (None: never); the claims' rule with findings' every-step accuracy."""
    step = claims.steps_to(run, level, smooth=window)
    return int(step) if math.isfinite(step) else None


def summary(run: Run, matched_acc: float = 0.9) -> dict:
    """The numbers a table needs: final loss, accuracies, the steps to `matched_acc` training
    accuracy, median lambda_max and beta_eff over the measurements after the first, and their
    value at the end."""
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
    if run.series("train/acc"):
        out["steps_to_acc"] = steps_to(run, matched_acc)
    return out


def arm_of(name: str) -> str:
    """A run's arm: its name without the seed ("adam norm=batch seed=2" -> "adam norm=batch")."""
    return name.rsplit(" seed=", 1)[0]


def over_seeds(rows: dict[str, dict]) -> dict[str, dict]:
    """Per arm and key of the per-run rows: mean, sd and n over the seeds with a finite value,
    and n_all (a step count that is None never reached its level; a nan loss diverged)."""
    arms: dict[str, list[dict]] = {}
    for name, row in rows.items():
        arms.setdefault(arm_of(name), []).append(row)
    out = {}
    for arm, group in arms.items():
        keys = [k for k in group[0] if k != "seconds"]
        out[arm] = {}
        for k in keys:
            vals = [r.get(k) for r in group]
            ok = [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
            out[arm][k] = {"mean": statistics.mean(ok) if ok else None,
                           "sd": statistics.stdev(ok) if len(ok) > 1 else 0.0 if ok else None,
                           "n": len(ok), "n_all": len(vals)}
    return out


def _progress(i: int, n: int, name: str, started: float) -> None:
    print(f"[{i}/{n}] {name}  ({time.perf_counter() - started:.0f} s so far)", flush=True)


def _runs(plan: list[tuple[str, dict]], label: str, b: dict) -> dict[str, Run]:
    out, started = {}, time.perf_counter()
    for i, (name, kw) in enumerate(plan, 1):
        _progress(i, len(plan), f"{label}: {name}", started)
        if kw["model"] == "vgg":
            setup = b["vgg"]
            kw = {"steps": b["vgg_steps"], "image_size": setup["image_size"],
                  "batch_size": setup["batch_size"], "channels_last": setup["channels_last"],
                  **kw}
        out[name] = fit(**kw)
    return out


def _seeded(plan: list[tuple[str, dict]], b: dict) -> list[tuple[str, dict]]:
    return [(f"{name} seed={seed}", {**kw, "seed": seed}) for seed in range(b["seeds"])
            for name, kw in plan]


# ---- the parts ----------------------------------------------------------------------------------
def part_eos(b: dict) -> dict:
    plan = [(f"dln lr={lr:g} norm={norm}", dict(model="dln", steps=b["dln_steps"],
                                                 every=b["dln_every"], lr=lr, norm=norm, thm=True,
                                                 log_spaced=True, max_iter=b["max_iter"]))
            for lr in (1e-6, 1e-7) for norm in ("none", "batch")]
    plan += [(f"vgg lr={lr:g} norm={norm}", dict(model="vgg", every=b["vgg_every"], lr=lr,
                                                 norm=norm, thm=True, max_iter=b["max_iter"]))
             for lr in (0.1, 0.5) for norm in ("none", "batch")]
    # the same VGG at lr 0.1 with lambda_max of one fixed loss (the first batch's): is "above
    # 2/lr" on the step's minibatch batch-to-batch noise, or the sharpness of the loss?
    plan += [(f"vgg lr=0.1 norm={norm} fixed", dict(model="vgg", every=b["vgg_every"], lr=0.1,
                                                    norm=norm, fixed_batch=True,
                                                    max_iter=b["max_iter"]))
             for norm in ("none", "batch")]
    return _runs(plan, "eos", b)


OPTIMIZERS = {"sgd": dict(optimizer="sgd", lr=0.1),
              # momentum 0.9 at the same lr takes 10x longer steps; at lr 0.01 the same ones
              "sgd+momentum lr=0.1": dict(optimizer="sgd", lr=0.1, momentum=0.9),
              "sgd+momentum lr=0.01": dict(optimizer="sgd", lr=0.01, momentum=0.9),
              "adam": dict(optimizer="adam", lr=1e-3)}


def part_optimizer(b: dict) -> dict:
    # no probes: the question is how fast and how far each trains (and a probe costs ~2 s)
    plan = [(f"{o} norm={norm}", dict(model="vgg", every=0, norm=norm, **kw))
            for o, kw in OPTIMIZERS.items() for norm in ("none", "batch")]
    return _runs(_seeded(plan, b), "optimizer", b)


def part_init(b: dict) -> dict:
    plan = [(f"{init} norm={norm}", dict(model="vgg", every=0, norm=norm, init=init, lr=0.1))
            for init in ("glorot", "kaiming", "orthogonal", "default") for norm in ("none", "batch")]
    return _runs(_seeded(plan, b), "init", b)


def part_generalization(b: dict) -> dict:
    plan = [(f"norm={norm}", dict(model="vgg", every=0, eval_every=max(1, b["vgg_every"] // 2),
                                  norm=norm, lr=0.1))
            for norm in ("none", "batch")]
    return _runs(_seeded(plan, b), "generalization", b)


def at_matched_loss(run: Run, level: float) -> dict:
    """Whole-set accuracies at the first evaluation where the whole training set's loss was at
    most `level` (None: never)."""
    test = dict(run.series("eval/test_acc"))
    train = dict(run.series("eval/train_acc"))
    for s, loss in run.series("eval/train_loss"):
        if math.isfinite(loss) and loss <= level:
            return {"step": s, "train_acc": train[s], "test_acc": test[s],
                    "gap": train[s] - test[s]}
    return {"step": None, "train_acc": None, "test_acc": None, "gap": None}


def part_smoother(b: dict) -> dict:
    # log-spaced too: BN reaches the matched accuracy within ~30 steps, the plain net in ~250
    plan = [(f"norm={norm}", dict(model="vgg", every=b["vgg_every"], log_spaced=True,
                                  max_iter=b["max_iter"], norm=norm, lr=0.1))
            for norm in ("none", "batch", "layer", "group", "l1", "l2", "linf")]
    return _runs(_seeded(plan, b), "smoother", b)


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
    ||W*||^2, and the lemma's right-hand side. And the counter-argument's check: the optimum found
    without BN, mapped into the BN net so that it computes the same function
    (models.function_preserving_bn), has the same loss there; its BN-loss gradient norm says
    whether it is a stationary point of the BN net too."""
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
        # the counter-argument: the no-BN optimum put into the BN net by the mapping that keeps
        # its function (gamma_j = the unit's batch std, beta_j = its batch mean): the BN net
        # reaches the plain optimum's loss there; is that point stationary for the BN net too?
        mapped = function_preserving_bn(plain, DeepLinear(6, 10, "batch"), x).train()
        lbn = loss_fn(mapped(x), y)
        grad = torch.autograd.grad(lbn, list(mapped.parameters()))
        plain_grad = torch.autograd.grad(loss_fn(plain.train()(x), y), list(plain.parameters()))
        rows.append({"init": scheme, "scale": scale, "loss_bn": loss_bn, "loss_plain": loss_plain,
                     "layers": layers,
                     "closest_over_dist": sum(r["closest"] for r in layers)
                     / sum(r["dist"] for r in layers),
                     "positive_inner": sum(r["inner"] > 0 for r in layers),
                     "bn_loss_at_plain_optimum": float(lbn.detach()),
                     "bn_grad_norm_at_plain_optimum": total_norm(list(grad)),
                     "plain_grad_norm_at_plain_optimum": total_norm(list(plain_grad))})
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
    """Training loss, lambda_max and beta_eff over steps: one colour per arm, one line per seed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours: dict[str, str] = {}
    for name, run in runs.items():
        arm = arm_of(name)
        first = arm not in colours
        colour = colours.setdefault(arm, f"C{len(colours) % 10}")
        label = arm if first else None
        loss = run.series("train/loss")
        k = max(1, len(loss) // 100)
        axes[0].plot([s for s, _ in loss][::k], [v for _, v in loss][::k], label=label, lw=0.8,
                     color=colour, alpha=0.8)
        for ax, key in zip(axes[1:], ("curv/lambda_max", "landscape/beta_eff")):
            pts = [(s, v) for s, v in run.series(key) if math.isfinite(v) and v > 0]
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".", lw=0.8, color=colour,
                    alpha=0.8, label=label)
    for ax, t in zip(axes, ("train loss", "lambda_max", "beta_eff")):
        ax.set_title(t)
        ax.set_yscale("log")
        ax.set_xlabel("step")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{title} (one line per seed)")
    fig.tight_layout()
    fig.savefig(out / filename, dpi=110)
    plt.close(fig)


def figure_generalization(runs: dict, out: Path) -> None:
    """Whole-set test accuracy against whole-set training loss over training, one line per run:
    at the same training loss, which net generalizes better?"""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    colours: dict[str, str] = {}
    for name, run in runs.items():
        arm = arm_of(name)
        first = arm not in colours
        colour = colours.setdefault(arm, f"C{len(colours) % 10}")
        loss, test = dict(run.series("eval/train_loss")), dict(run.series("eval/test_acc"))
        pts = [(loss[s], test[s]) for s in sorted(loss) if s in test and math.isfinite(loss[s])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=0.8, color=colour,
                label=arm if first else None)
    for level in MATCHED_LOSSES:
        ax.axvline(level, color="k", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.invert_xaxis()  # training goes left to right
    ax.set_xlabel("loss on the whole training set")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
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
        vgg_setup: str = "faithful", seeds: int | None = None) -> dict:
    setup = VGG_SETUPS[vgg_setup]
    b = {"vgg_steps": setup["steps"], **BUDGETS[budget], "vgg_setup": vgg_setup, "vgg": setup}
    if seeds is not None:
        b["seeds"] = seeds
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
    net = f"VGG-11 w1/8, digits {setup['image_size']}x{setup['image_size']}"
    for part, fn, title in (("optimizer", part_optimizer, f"optimizer x norm ({net})"),
                            ("init", part_init, f"init x norm ({net}, lr 0.1)"),
                            ("smoother", part_smoother, f"normalizations ({net}, lr 0.1)")):
        if part in parts:
            runs = fn(b)
            figure_curves(runs, out, f"{part}.png", title)
            rows = {k: summary(v, b["matched_acc"]) for k, v in runs.items()}
            found[part] = {"runs": rows, "arms": over_seeds(rows), "matched_acc": b["matched_acc"]}
            if part == "smoother":
                m = {k: matched(v, b["matched_acc"]) for k, v in runs.items()}
                found[part]["matched"] = m
                found[part]["matched_arms"] = over_seeds(m)
            _save(out, found)
    if "generalization" in parts:
        runs = part_generalization(b)
        figure_generalization(runs, out)
        rows = {}
        for name, r in runs.items():
            row = {"final_train_acc": r.summary["train_acc"], "final_test_acc": r.summary["test_acc"],
                   "final_gap": r.summary["train_acc"] - r.summary["test_acc"]}
            for level in MATCHED_LOSSES:
                for k, v in at_matched_loss(r, level).items():
                    row[f"loss<={level:g} {k}"] = v
            rows[name] = row
        found["generalization"] = {"runs": rows, "arms": over_seeds(rows),
                                   "matched_losses": list(MATCHED_LOSSES),
                                   "series": {k: {key: v.series(key) for key in
                                                  ("eval/train_loss", "eval/test_acc")}
                                              for k, v in runs.items()}}
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


def _ms(cell: dict | None) -> str:
    """mean +- sd (n/N) of an over_seeds cell."""
    if not cell or cell["mean"] is None:
        return "-" if not cell else f"- (0/{cell['n_all']})"
    n = "" if cell["n"] == cell["n_all"] == 1 else f" ({cell['n']}/{cell['n_all']})"
    return f"{_fmt(cell['mean'])} +- {_fmt(cell['sd'])}{n}"


def tables(found: dict) -> str:
    """Markdown tables of a findings.json (what docs/FINDINGS.md quotes). Seeded parts: mean +- sd
    over the seeds with a value (n of N: a step count missing never reached its level, a loss
    missing diverged)."""
    out = []
    cols = ("final_loss", "train_acc", "test_acc", "lambda_max_median", "lambda_max_last",
            "beta_eff_median", "beta_eff_last")
    if "eos" in found:
        out.append("### eos\n\n| run | " + " | ".join(cols) + " |\n|" + " --- |" * (len(cols) + 1))
        for name, row in found["eos"]["runs"].items():
            out.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        if found["eos"].get("theorem41"):
            out.append("\nTheorem 4.1 (min / max over measured steps and BN layers):\n\n"
                       "| run | lhs/rhs printed | lhs/rhs 1/m | units holding, printed | "
                       "units holding, 1/m |\n| --- | --- | --- | --- | --- |")
            for name, t in found["eos"]["theorem41"].items():
                out.append(f"| {name} | " + " | ".join(
                    f"{_fmt(t[k]['min'])} / {_fmt(t[k]['max'])}" for k in
                    ("ratio_printed", "ratio_rederived", "holds_printed", "holds_rederived"))
                    + " |")
        out.append("")
    seeded = ("final_loss", "train_acc", "test_acc", "steps_to_acc", "lambda_max_median",
              "beta_eff_median")
    for part in ("optimizer", "init", "smoother"):
        if part not in found:
            continue
        arms = found[part].get("arms") or {}
        level = found[part].get("matched_acc")
        shown = [c for c in seeded  # a part without probes has no curvature columns
                 if any((row.get(c) or {}).get("n") for row in arms.values())]
        out.append(f"### {part}\n\n(mean +- sd over seeds; steps_to_acc: steps to a 20-step "
                   f"mean training accuracy of {level})\n\n| arm | " + " | ".join(shown)
                   + " |\n|" + " --- |" * (len(shown) + 1))
        for arm, row in arms.items():
            out.append(f"| {arm} | " + " | ".join(_ms(row.get(c)) for c in shown) + " |")
        if part == "smoother" and found[part].get("matched_arms"):
            out.append(f"\nat the first measurement with running train accuracy >= {level}:\n\n"
                       "| arm | step | lambda_max | beta_eff |\n| --- | --- | --- | --- |")
            for arm, m in sorted(found[part]["matched_arms"].items(),
                                 key=lambda kv: (kv[1]["lambda_max"]["mean"] is None,
                                                 kv[1]["lambda_max"]["mean"] or 0)):
                out.append(f"| {arm} | {_ms(m['step'])} | {_ms(m['lambda_max'])} | "
                           f"{_ms(m['beta_eff'])} |")
        out.append("")
    if "generalization" in found:
        g = found["generalization"]
        out.append("### generalization\n\n(whole-set accuracies, eval mode; at the first "
                   "evaluation with the whole training set's loss <= the level)\n\n"
                   "| norm | at | step | train acc | test acc | gap |\n"
                   "| --- | --- | --- | --- | --- | --- |")
        for arm, row in g["arms"].items():
            for level in g["matched_losses"]:
                k = f"loss<={level:g}"
                out.append(f"| {arm} | {k} | {_ms(row[k + ' step'])} | "
                           f"{_ms(row[k + ' train_acc'])} | {_ms(row[k + ' test_acc'])} | "
                           f"{_ms(row[k + ' gap'])} |")
            out.append(f"| {arm} | end | - | {_ms(row['final_train_acc'])} | "
                       f"{_ms(row['final_test_acc'])} | {_ms(row['final_gap'])} |")
        out.append("")
    if "lemma45" in found:
        out.append("### lemma45\n\n| init | loss BN | loss plain | layers with <W0,W*> > 0 | "
                   "sum closest / sum dist | BN loss at the mapped plain optimum | BN grad norm "
                   "there | plain grad norm there |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in found["lemma45"]["rows"]:
            out.append(f"| {r['init']} x{r['scale']:g} | {_fmt(r['loss_bn'])} | "
                       f"{_fmt(r['loss_plain'])} | {r['positive_inner']}/{len(r['layers'])} | "
                       f"{_fmt(r['closest_over_dist'])} | {_fmt(r['bn_loss_at_plain_optimum'])} |"
                       f" {_fmt(r['bn_grad_norm_at_plain_optimum'])} | "
                       f"{_fmt(r.get('plain_grad_norm_at_plain_optimum'))} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnstudy findings", description=__doc__.split("\n")[2])
    parser.add_argument("--out", default="results/findings", help="output folder")
    parser.add_argument("--budget", choices=list(BUDGETS), default="mini")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    parser.add_argument("--vgg-setup", choices=list(VGG_SETUPS), default="faithful",
                        help="the VGG parts' net: faithful (default: reproduce mini's VGG-11 w1/8 "
                             "on 32x32x3 digits, 600 steps) or fast (8x8 digits, 300 steps, ~1/10 "
                             "of the time; no network without a norm trains there)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per arm of the optimizer, init, generalization and smoother "
                             "parts (default: the budget's, 3 for mini)")
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
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1; got {args.seeds}")
    run(Path(args.out), args.budget, args.only, args.vgg_setup, args.seeds)
    print(f"findings written to {args.out} in {time.perf_counter() - started:.0f} s")
    return 0
