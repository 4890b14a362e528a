"""Search for the miniature VGG on which the paper's figure-1 pattern holds in every seed.

    python scripts/vgg_search.py --candidates 11:0.125 16:0.0625 --norms none batch \\
        --lrs 0.1 0.5 --seeds 0 1 2 3 4 --steps 1500          # the decisive arms, two candidates
    python scripts/vgg_search.py --table                      # the Markdown table of the JSON
    python scripts/vgg_search.py --quick --out /tmp/q.json    # smoke test: 2 tiny runs, ~30 s

What it searches: VGG depth x width x norm x learning rate x seed, each run a real `fit` through
bnstudy's own CLI (`bnstudy.lightning_cli.cli_main`, several fits in one process) with the very
data of `python -m bnstudy reproduce mini` (bnstudy.reproduce.VGG_DATA: the digits upscaled to
32x32x3, batch 128) and the paper configs (configs/vgg*.yaml: plain SGD, Glorot), so that what it
chooses is what `reproduce` runs. A seed changes the init, the data order and the train/test
split (`--seed_everything=S --data.seed=S`). The paper's instruments are off (they leave the
trajectory bit for bit unchanged: tests/test_instruments.py); the test split is evaluated every
`--val-every` steps (that does not change the trajectory either: the shuffling and the noise have
their own generators). `--channels-last` runs the same candidates on the NHWC kernels, whose
float rounding differs, to show that a verdict does not hinge on the rounding.

What it records, per run (JSON, one entry per depth, width, norm, lr, seed, kernel path):
- the first step at which test accuracy reaches 50% and 90%, and the same for training accuracy
  (the running mean of the minibatch accuracy over the last 20 steps, as the paper's curves);
- the final training accuracy (that running mean, and the whole training set in eval mode after
  the last step), test accuracy and the losses; the best test accuracy seen;
- whether the loss became non-finite (the CLI's divergence guard stops the run there) and when;
- the seconds (wall and this process's CPU) per training step, validation excluded.

Early stop (off with --full): a run stops once it is clearly trained, that is once the running
training accuracy has stayed >= 95% for 100 steps and the test accuracy at that evaluation is >=
90% ("clear" in the table, with the step); a diverged run stops at its non-finite loss. A run
that stays at chance goes to the end of the budget, so "chance" means for all `--steps` steps.

The criteria the table is read with (issue 14, must-have 1), in every seed: without a norm at lr
0.1 the network trains (reaches 90%), later than with BN; at lr 0.5 it stays at chance (best test
accuracy < 20%) or diverges, while BN trains.

Runs already in the JSON (same key, same step budget) are skipped, so the search can be widened
step by step; the JSON is rewritten after every run. Cost: VGG-11 at width 1/8 takes about 45 ms
a step on one thread of this project's 2-core machine, VGG-16 at 1/8 about 80 ms; a run that
stays at chance for 1,500 steps takes a minute or two. Run it with
`OMP_NUM_THREADS=1 nice -n 10` on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's bnstudy, also when run as a plain script

import lightning as L  # noqa: E402
import torch  # noqa: E402

from bnstudy.reproduce import CONFIGS, VGG_DATA  # noqa: E402

# norm -> (paper config, extra overrides): as bnstudy.reproduce.mini_runs runs each arm
ARMS = {"none": ("vgg.yaml", []), "batch": ("vgg_bn.yaml", []),
        "noisy_batch": ("vgg_noisy_bn.yaml", []), "noise": ("vgg.yaml", ["--model.norm=noise"]),
        "l1": ("vgg_l1.yaml", []), "l2": ("vgg_l2.yaml", []), "linf": ("vgg_linf.yaml", [])}
WINDOW = 20      # steps in the running mean of the training accuracy
HOLD = 100       # steps the running training accuracy must stay >= CLEAR for an early stop
CLEAR = 0.95
CHANCE = 0.2     # best test accuracy below this: the run never left chance (10 classes)
LEVELS = (0.5, 0.9)
# metrics.csv in the (temporary) run directory only: the CLI's learning-rate monitor needs a
# logger, and W&B is not wanted here
CSV = {"class_path": "bnstudy.loggers.StudyCSVLogger", "init_args": {"save_dir": "runs"}}
DEFAULT_OUT = REPO / "docs" / "results" / "vgg_search.json"


class SearchRecord(L.Callback):
    """Per-step training loss and accuracy, the test accuracy at each evaluation, the time per
    step without the evaluations, and the early stop of a clearly trained run."""

    def __init__(self, early_stop: bool = True):
        self.early_stop = early_stop
        self.train: list[tuple[int, float, float]] = []   # (step, loss, minibatch accuracy)
        self.running: list[float] = []                     # running accuracy after each step
        self.val: list[tuple[int, float, float]] = []      # (step, test accuracy, test loss)
        self.stopped_clear: int | None = None
        self.wall = self.cpu = 0.0
        self.timed_steps = 0
        self._last: tuple[float, float] | None = None

    def _now(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self._now()
        if self._last is not None and trainer.global_step > 5:  # the first steps warm up
            self.wall += now[0] - self._last[0]
            self.cpu += now[1] - self._last[1]
            self.timed_steps += 1
        self._last = now
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        acc = trainer.callback_metrics.get("train/acc")
        self.train.append((trainer.global_step, float(loss), float(acc)))
        window = [a for _, _, a in self.train[-WINDOW:]]
        self.running.append(sum(window) / len(window))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # the evaluation is not a training step's time

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        self.val.append((trainer.global_step, float(m["val/acc"]), float(m["val/loss"])))
        held = self.running[-HOLD:]
        if (self.early_stop and len(held) == HOLD and min(held) >= CLEAR
                and self.val[-1][1] >= LEVELS[-1]):
            self.stopped_clear = trainer.global_step
            trainer.should_stop = True


def first_step(series: list[tuple[int, float]], level: float) -> int | None:
    return next((s for s, v in series if v >= level), None)


@torch.no_grad()
def eval_accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  channels_last: bool) -> float:
    """Accuracy of the whole set in eval mode (BN with its running statistics, no noise)."""
    was_training = net.training
    net.eval()
    correct = 0
    for i in range(0, len(x), 512):
        xb = x[i:i + 512]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        correct += int((net(xb).argmax(1) == y[i:i + 512]).sum())
    net.train(was_training)
    return correct / len(x)


def run_key(depth: int, width: float, norm: str, lr: float, seed: int,
            channels_last: bool, steps: int, early_stop: bool) -> str:
    return (f"vgg{depth} w{width:g} {norm} lr{lr:g} seed{seed} steps{steps}"
            + (" channels_last" if channels_last else "") + ("" if early_stop else " full"))


def fit_args(depth: int, width: float, norm: str, lr: float, seed: int, steps: int,
             val_every: int, channels_last: bool, early_stop: bool, run_dir: Path) -> list[str]:
    config, extra = ARMS[norm]
    record = {"class_path": f"{SearchRecord.__module__}.SearchRecord",
              "init_args": {"early_stop": early_stop}}
    return ["fit", "--config", str(CONFIGS / config), *VGG_DATA, *extra,
            f"--seed_everything={seed}", f"--data.seed={seed}", f"--model.depth={depth}",
            f"--model.width={width}", f"--model.lr={lr}",
            f"--model.channels_last={str(channels_last).lower()}",
            f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={val_every}",
            f"--trainer.callbacks=[{json.dumps(record)}]", f"--trainer.logger=[{json.dumps(CSV)}]",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--run_dir={run_dir}"]


def train_one(depth: int, width: float, norm: str, lr: float, seed: int, steps: int,
              val_every: int, channels_last: bool, early_stop: bool) -> dict:
    from bnstudy.callbacks import DivergenceGuard
    from bnstudy.lightning_cli import cli_main

    tmp = Path(tempfile.mkdtemp(prefix="vgg_search-"))
    started = time.perf_counter()
    saved, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads its args, not this script's
    try:
        cli = cli_main(fit_args(depth, width, norm, lr, seed, steps, val_every, channels_last,
                                early_stop, tmp / "run"))
        rec = next(c for c in cli.trainer.callbacks if isinstance(c, SearchRecord))
        guard = next(c for c in cli.trainer.callbacks if isinstance(c, DivergenceGuard))
        data = cli.datamodule
        train_eval = eval_accuracy(cli.model.net, *data.train_set, channels_last)
    finally:
        sys.argv = saved
        shutil.rmtree(tmp, ignore_errors=True)
    running = list(zip([s for s, _, _ in rec.train], rec.running))
    diverged = guard.diverged_at
    tail = rec.train[-WINDOW:]
    finite_tail = [x for _, x, _ in tail if x == x and abs(x) != float("inf")]
    out = {"depth": depth, "width": width, "norm": norm, "lr": lr, "seed": seed,
           "channels_last": channels_last, "early_stop": early_stop, "max_steps": steps, "val_every": val_every,
           "steps_run": cli.trainer.global_step,
           "stopped": ("diverged" if diverged is not None else
                       "clear" if rec.stopped_clear is not None else "budget"),
           "diverged_step": diverged,
           **{f"train_{int(100 * lv)}": first_step(running, lv) for lv in LEVELS},
           **{f"test_{int(100 * lv)}": first_step([(s, a) for s, a, _ in rec.val], lv)
              for lv in LEVELS},
           "final_train_acc": rec.running[-1] if rec.running else None,
           "final_train_acc_eval": train_eval,
           "final_train_loss": sum(finite_tail) / len(finite_tail) if finite_tail else None,
           "final_test_acc": rec.val[-1][1] if rec.val else None,
           "final_test_loss": rec.val[-1][2] if rec.val else None,
           "best_test_acc": max((a for _, a, _ in rec.val), default=None),
           "wall_ms_per_step": round(1000 * rec.wall / max(1, rec.timed_steps), 1),
           "cpu_ms_per_step": round(1000 * rec.cpu / max(1, rec.timed_steps), 1),
           "wall_s": round(time.perf_counter() - started, 1),
           "test_curve": [(s, round(a, 4)) for s, a, _ in rec.val],
           "train_curve": [(s, round(a, 4)) for s, a in running if s % val_every == 0]}
    return out


def outcome(r: dict) -> tuple[str, int | None]:
    """How a run ended, on the test split, and at which step: "diverged", "clear" (reached 90%
    and stopped early), "trains" (reached 90%), "chance" (best test accuracy < 20%), "chance at
    the end" (ended < 20% after an excursion), or "partial" (never 90%)."""
    if r["stopped"] == "diverged":
        return "diverged", r["diverged_step"]
    if r["test_90"] is not None:
        return ("clear", r["steps_run"]) if r["stopped"] == "clear" else ("trains", None)
    if (r["best_test_acc"] or 0) < CHANCE:
        return "chance", None
    return ("chance at the end" if (r["final_test_acc"] or 0) < CHANCE else "partial"), None


def verdict(r: dict) -> str:
    kind, step = outcome(r)
    if step is not None:
        return f"{kind} at {step}"
    if kind in ("chance at the end", "partial"):
        return f"{kind} (best {r['best_test_acc']:.2f}, end {r['final_test_acc']:.2f})"
    return kind


# -- the table ------------------------------------------------------------------------------------
def _steps(values: list[int | None]) -> str:
    return " ".join("-" if v is None else str(v) for v in values)


def _spread(values: list[float | None]) -> str:
    v = [x for x in values if x is not None and x == x]
    if not v:
        return "-"
    return f"{statistics.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]" if len(v) > 1 else f"{v[0]:.3f}"


def _span(values: list, fmt: str = "") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if lo == hi else f"{lo:{fmt}}-{hi:{fmt}}"


def ends(rs: list[dict]) -> str:
    """The seeds' outcomes counted: "clear 4 (at 125-150); diverged 1 (at 18)"."""
    if len(rs) == 1:
        return verdict(rs[0])
    kinds: dict[str, list[dict]] = {}
    for r in rs:
        kinds.setdefault(outcome(r)[0], []).append(r)
    parts = []
    for kind, group in kinds.items():
        steps = [outcome(r)[1] for r in group if outcome(r)[1] is not None]
        detail = f" (at {_span(steps)})" if steps else ""
        if kind in ("chance at the end", "partial"):
            detail = (f" (best {_span([r['best_test_acc'] for r in group], '.2f')}, "
                      f"end {_span([r['final_test_acc'] for r in group], '.2f')})")
        parts.append(f"{kind} {len(group)}{detail}")
    return "; ".join(parts)


def table(runs: list[dict]) -> str:
    """One row per depth, width, budget, lr, norm and kernel path; per-seed columns in seed
    order; accuracies as mean [min, max] over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r["depth"], r["width"], r["max_steps"], r["lr"], r["norm"], r["channels_last"],
               r["early_stop"])
        groups.setdefault(key, []).append(r)
    lines = ["| VGG | width | steps | lr | norm | seeds | train 50% | train 90% | test 50% | "
             "test 90% | final train acc | final test acc | outcome over the seeds | CPU ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(ARMS)
    for (depth, width, steps, lr, norm, cl, early), rs in sorted(
            groups.items(), key=lambda g: (*g[0][:4], order.index(g[0][4]), *g[0][5:])):
        rs = sorted(rs, key=lambda r: r["seed"])
        ms = statistics.median(r["cpu_ms_per_step"] for r in rs)
        lines.append(
            f"| {depth} | {width:g} | {steps}{'' if early else ' (full)'} | {lr:g} | "
            f"{norm}{' (NHWC)' if cl else ''} | "
            f"{','.join(str(r['seed']) for r in rs)} | "
            + " | ".join(_steps([r[k] for r in rs])
                         for k in ("train_50", "train_90", "test_50", "test_90"))
            + f" | {_spread([r['final_train_acc'] for r in rs])} | "
              f"{_spread([r['final_test_acc'] for r in rs])} | "
              f"{ends(rs)} | {ms:.0f} |")
    return "\n".join(lines)


# -- the driver -----------------------------------------------------------------------------------
def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["runs"] if path.exists() else []


def save(path: Path, runs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    doc = {"about": "scripts/vgg_search.py: the miniature VGG search (issue 14); rerun with the "
                    "command in `command` of each run group, `--table` prints the table",
           "torch": torch.__version__, "runs": runs}
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def candidate(text: str) -> tuple[int, float]:
    try:
        depth, width = text.split(":")
        return int(depth), float(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a candidate is DEPTH:WIDTH, e.g. 11:0.125; got {text!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=candidate, nargs="+", default=[(11, 0.125)],
                   metavar="DEPTH:WIDTH", help="VGG depth (11, 13, 16, 19) and width multiplier")
    p.add_argument("--norms", nargs="+", default=["none", "batch"], choices=sorted(ARMS))
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=1500, help="the step budget of every run")
    p.add_argument("--val-every", type=int, default=25, help="steps between test evaluations")
    p.add_argument("--channels-last", action="store_true", help="NHWC kernels (other rounding)")
    p.add_argument("--full", action="store_true", help="no early stop of clearly trained runs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON (read and extended)")
    p.add_argument("--table", action="store_true", help="only print the table of --out")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: VGG-11 at width 1/16, none and BN, lr 0.1, seed 0, 6 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.candidates, args.norms, args.lrs, args.seeds = [(11, 0.0625)], ["none", "batch"], [0.1], [0]
        args.steps, args.val_every = 6, 3
    if args.steps < 1 or args.val_every < 1:
        p.error("--steps and --val-every must be >= 1")
    runs = load(args.out)
    if args.table:
        print(table(runs))
        return 0
    os.environ.setdefault("WANDB_MODE", "disabled")
    for name in ("lightning.pytorch", "lightning.fabric"):  # "Seed set", "GPU available", ...
        logging.getLogger(name).setLevel(logging.WARNING)
    if os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(1)
    done = {r["key"] for r in runs}
    plan = [(d, w, n, lr, s) for d, w in args.candidates for lr in args.lrs for n in args.norms
            for s in args.seeds]
    started = time.perf_counter()
    for i, (depth, width, norm, lr, seed) in enumerate(plan, 1):
        key = run_key(depth, width, norm, lr, seed, args.channels_last, args.steps,
                      not args.full)
        if key in done:
            print(f"[{i}/{len(plan)}] {key}: in {args.out} already", flush=True)
            continue
        r = train_one(depth, width, norm, lr, seed, args.steps, args.val_every,
                      args.channels_last, not args.full)
        r["key"] = key
        runs = [x for x in load(args.out) if x["key"] != key] + [r]  # another process may add
        save(args.out, runs)
        print(f"[{i}/{len(plan)}] {key}: {verdict(r)}, test 50/90% at {r['test_50']}/"
              f"{r['test_90']}, final test {r['final_test_acc']:.3f}, {r['cpu_ms_per_step']} ms/step "
              f"({r['wall_s']:.0f} s; {time.perf_counter() - started:.0f} s so far)", flush=True)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
