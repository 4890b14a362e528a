"""Search for the miniature VGG on which the paper's figure-1 pattern holds in every seed.

    python scripts/vgg_search.py --candidates 11:0.125 16:0.0625 --norms none batch \\
        --lrs 0.1 0.5 --seeds 0 1 2 3 4 --steps 1500          # the decisive arms, two candidates
    python scripts/vgg_search.py --table --budget 1000        # the tables of the JSON at 1,000 steps
    python scripts/vgg_search.py --bench 100 --candidates 11:0.125 16:0.125   # per-step costs
    python scripts/vgg_search.py --quick --out /tmp/q.json    # smoke test: 2 tiny runs

What it searches: VGG depth x width x norm x learning rate x seed x kernel layout, each run a real
`fit` through bnstudy's own CLI (`bnstudy.lightning_cli.cli_main`, several fits in one process)
with the data of `python -m bnstudy reproduce mini` (bnstudy.study.reproduce.VGG_DATA: the digits
upscaled to 32x32x3, batch 128) and the paper configs (configs/vgg*.yaml: plain SGD, Glorot), so
that what it chooses is what `reproduce` runs. A seed changes the init, the data order and the
train/test split (`--seed_everything=S --data.seed=S`). The paper's instruments are off (they leave
the trajectory unchanged: tests/instruments/); the test split is evaluated every `--val-every`
steps (that does not change the trajectory either: the shuffling and the noise have their own
generators). `--layouts nchw nhwc` also runs the candidates on the channels-last kernels
(`--model.channels_last=true`), whose float rounding differs, to show that a verdict does not hinge
on the rounding.

Every run is graded by the claim rules themselves (bnstudy.analysis.claims) on its logged metrics
(metrics.csv: the training accuracy of one batch every 10 steps, the test accuracy every
`--val-every` steps): "trains" = the running mean of the last 3 logged training accuracies
reaches 0.9, and the step at which it does is the speed; "at chance" = the final test accuracy is
<= 0.2 or the run diverged. Since plain SGD at a constant lr does not depend on the budget, a run
is also graded at any shorter budget from its logged curves (`--budget`).

What it records, per run (JSON, one line per run): the logged training and test accuracies, the
first step at which the smoothed training accuracy and the test accuracy reach 50% and 90%, the
final training accuracy (the claims' running mean, and the whole training set in eval mode after
the last step), test accuracy and losses, whether and when the loss became non-finite (the CLI's
divergence guard stops the run there), and the seconds (wall and this process's CPU) per training
step, evaluations excluded.

Early stop (off with --full): a run stops once it is clearly trained, that is once the training
accuracy (the mean of the minibatch accuracies of the last 20 steps) has stayed >= 95% for 100
steps and the test accuracy is >= 90% ("stopped at" in the table); its record then ends there and
a shorter budget is graded from it only up to that step. A diverged run stops at its non-finite
loss. A run that stays at chance goes to the end of the budget.

The criteria (docs/RESULTS.md, "The mini VGG"), checked in every seed by the second table: without a norm at
lr 0.1 the network trains, later than with BN, and ends above chance (the claims' baseline gate);
at lr 0.5 it stays at chance or diverges, while BN trains.

Runs already in the JSON (same key) are skipped, so the search can be widened step by step; the
JSON is rewritten after every run (under a lock: two searches may share it). `--bench N` instead
times N training steps of every candidate and norm, interleaved over `--rounds` rounds, and
stores the median milliseconds per step under "bench" in the JSON. Run it with
`OMP_NUM_THREADS=1 nice -n 10` on a shared machine.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's bnstudy, also when run as a plain script

import lightning as L  # noqa: E402
import torch  # noqa: E402

from bnstudy.analysis import claims  # noqa: E402
from bnstudy.analysis.runs import Run, load_run  # noqa: E402
from bnstudy.study.reproduce import CONFIGS, VGG_DATA  # noqa: E402

# norm -> (paper config, extra overrides): as bnstudy.study.reproduce.mini_runs runs each arm
ARMS = {"none": ("vgg.yaml", []), "batch": ("vgg_bn.yaml", []),
        "noisy_batch": ("vgg_noisy_bn.yaml", []), "noise": ("vgg.yaml", ["--model.norm=noise"]),
        "l1": ("vgg_l1.yaml", []), "l2": ("vgg_l2.yaml", []), "linf": ("vgg_linf.yaml", [])}
LAYOUTS = {"nchw": False, "nhwc": True}  # --model.channels_last
WINDOW = 20      # early stop: steps in the running mean of the minibatch accuracy
HOLD = 100       # early stop: steps that running mean must stay >= CLEAR
CLEAR = 0.95
LEVELS = (0.5, claims.TRAIN_LEVEL)
# metrics.csv in the (temporary) run directory only: the claims read it, the CLI's learning-rate
# monitor needs a logger, and W&B is not wanted here
CSV = {"class_path": "bnstudy.loggers.StudyCSVLogger", "init_args": {"save_dir": "runs"}}
DEFAULT_OUT = REPO / "docs" / "results" / "vgg_search.json"
# what a graded record looks like to the claims: a VGG run (Run.model)
VGG_CONFIG = {"model": {"class_path": "bnstudy.modules.VGGModule"}}


class SearchRecord(L.Callback):
    """The time per training step without the evaluations, the per-step loss, and the early stop
    of a clearly trained run."""

    def __init__(self, early_stop: bool = True):
        self.early_stop = early_stop
        self.losses: list[float] = []
        self.accs: list[float] = []
        self.stopped_clear: int | None = None
        self.wall = self.cpu = 0.0
        self.timed_steps = 0
        self._last: tuple[float, float] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter(), time.process_time()
        if self._last is not None and trainer.global_step > 5:  # the first steps warm up
            self.wall += now[0] - self._last[0]
            self.cpu += now[1] - self._last[1]
            self.timed_steps += 1
        self._last = now
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.accs.append(float(trainer.callback_metrics.get("train/acc", float("nan"))))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # the evaluation is not a training step's time

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.early_stop or len(self.accs) < HOLD + WINDOW:
            return
        running = [statistics.fmean(self.accs[i - WINDOW:i])
                   for i in range(len(self.accs) - HOLD + 1, len(self.accs) + 1)]
        if min(running) >= CLEAR and trainer.callback_metrics["val/acc"] >= LEVELS[-1]:
            self.stopped_clear = trainer.global_step
            trainer.should_stop = True


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


def run_key(depth: int, width: float, norm: str, lr: float, seed: int, layout: str, steps: int,
            early_stop: bool) -> str:
    return (f"vgg{depth} w{width:g} {norm} lr{lr:g} seed{seed} steps{steps}"
            + ("" if layout == "nchw" else f" {layout}") + ("" if early_stop else " full"))


def fit_args(depth: int, width: float, norm: str, lr: float, seed: int, steps: int,
             val_every: int | None, layout: str, early_stop: bool) -> list[str]:
    """The CLI's arguments: the reproduce plan's VGG run at this depth, width and seed, with the
    search's record in place of the instruments. val_every None: no evaluation (benchmarks)."""
    config, extra = ARMS[norm]
    record = {"class_path": f"{SearchRecord.__module__}.SearchRecord",
              "init_args": {"early_stop": early_stop}}
    validation = (["--trainer.limit_val_batches=0"] if val_every is None
                  else [f"--trainer.val_check_interval={val_every}"])
    return ["fit", "--config", str(CONFIGS / config), *VGG_DATA, *extra,
            f"--seed_everything={seed}", f"--data.seed={seed}", f"--model.depth={depth}",
            f"--model.width={width}", f"--model.lr={lr}",
            f"--model.channels_last={str(LAYOUTS[layout]).lower()}",
            f"--trainer.max_steps={steps}", *validation,
            f"--trainer.callbacks=[{json.dumps(record)}]", f"--trainer.logger=[{json.dumps(CSV)}]",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]


def fit(args: list[str]):
    """One fit in this process; returns (cli, its SearchRecord, its divergence step, the run as
    the claims read it)."""
    from bnstudy.callbacks import DivergenceGuard
    from bnstudy.lightning_cli import cli_main

    tmp = Path(tempfile.mkdtemp(prefix="vgg_search-"))
    saved, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads its args, not this script's
    try:
        cli = cli_main([*args, f"--run_dir={tmp / 'run'}"])
        rec = next(c for c in cli.trainer.callbacks if isinstance(c, SearchRecord))
        guard = next(c for c in cli.trainer.callbacks if isinstance(c, DivergenceGuard))
        run = load_run(tmp / "run")
    finally:
        sys.argv = saved
        shutil.rmtree(tmp, ignore_errors=True)
    return cli, rec, guard.diverged_at, run


def train_one(depth: int, width: float, norm: str, lr: float, seed: int, steps: int,
              val_every: int, layout: str, early_stop: bool) -> dict:
    started = time.perf_counter()
    cli, rec, diverged, run = fit(fit_args(depth, width, norm, lr, seed, steps, val_every, layout,
                                           early_stop))
    finite = [x for x in rec.losses[-WINDOW:] if x == x and abs(x) != float("inf")]
    val_loss = run.finite("val/loss")
    r = {"depth": depth, "width": width, "norm": norm, "lr": lr, "seed": seed, "layout": layout,
         "early_stop": early_stop, "max_steps": steps, "val_every": val_every,
         "steps_run": cli.trainer.global_step,
         "stopped": ("diverged" if diverged is not None else
                     "clear" if rec.stopped_clear is not None else "budget"),
         "diverged_step": diverged,
         "final_train_loss": round(statistics.fmean(finite), 6) if finite else None,
         "final_train_acc_eval": eval_accuracy(cli.model.net, *cli.datamodule.train_set,
                                               LAYOUTS[layout]),
         "final_test_loss": round(val_loss[-1][1], 6) if val_loss else None,
         "cpu_ms_per_step": round(1000 * rec.cpu / max(1, rec.timed_steps), 1),
         "wall_ms_per_step": round(1000 * rec.wall / max(1, rec.timed_steps), 1),
         "wall_s": round(time.perf_counter() - started, 1),
         # what the claims read: the logged series (one batch's accuracy every 10 steps)
         "train_acc": [(s, round(a, 4)) for s, a in run.series("train/acc")],
         "test_acc": [(s, round(a, 4)) for s, a in run.series("val/acc")]}
    return {**r, **grade(r, steps)}


# -- grading by the claim rules -------------------------------------------------------------------
def as_run(r: dict, budget: int) -> Run:
    """The record's first `budget` steps as the claims read a run."""
    metrics = {"train/acc": [(s, a) for s, a in r["train_acc"] if s <= budget],
               "val/acc": [(s, a) for s, a in r["test_acc"] if s <= budget]}
    if r["diverged_step"] is not None and r["diverged_step"] <= budget:
        metrics["diverged"] = [(r["diverged_step"], 1.0)]
    return Run(r.get("key", ""), VGG_CONFIG, metrics)


def gradable(r: dict, budget: int) -> bool:
    """The record says what a run of `budget` steps gives: it ran that long, or it stopped
    earlier because it was clearly trained or diverged."""
    return r["max_steps"] >= budget and (r["steps_run"] >= budget or r["stopped"] != "budget")


def grade(r: dict, budget: int) -> dict:
    """The claims' reading of the record at `budget` steps: steps to 50%/90% (smoothed training
    accuracy, and test accuracy), final accuracies, trains, at chance, and the outcome."""
    run = as_run(r, budget)
    out = {}
    for level in LEVELS:
        step = claims.steps_to(run, level)
        out[f"train_{round(100 * level)}"] = None if step == float("inf") else int(step)
        out[f"test_{round(100 * level)}"] = next(
            (s for s, a in run.series("val/acc") if a >= level), None)
    out.update(final_train_acc=claims.final_train_acc(run), final_test_acc=claims.final_test_acc(run),
               trains=claims.trains(run), at_chance=claims.at_chance(run),
               left_chance=claims.left_chance(run))
    if run.diverged:
        out["outcome"] = f"diverged at {r['diverged_step']}"
    elif out["trains"]:
        out["outcome"] = "trains" + (", ends at chance" if out["at_chance"] else "")
    else:
        out["outcome"] = "chance" if out["at_chance"] else "partial"
    return out


# -- the tables -----------------------------------------------------------------------------------
def _steps(values: list[int | None]) -> str:
    return " ".join("-" if v is None else str(v) for v in values)


def _spread(values: list[float | None]) -> str:
    v = [x for x in values if x is not None and x == x]
    if not v:
        return "-"
    return f"{statistics.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]" if len(v) > 1 else f"{v[0]:.3f}"


def _span(values: list) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def ends(graded: list[tuple[dict, dict]], budget: int) -> str:
    """The seeds' outcomes counted: "trains 4 (2 stopped at 300-350); diverged 1 (at 18)"."""
    kinds: dict[str, list[tuple[dict, dict]]] = {}
    for r, g in graded:
        kinds.setdefault(g["outcome"].split(" at ")[0], []).append((r, g))
    parts = []
    for kind, group in kinds.items():
        detail = ""
        if kind == "diverged":
            detail = f" (at {_span([r['diverged_step'] for r, _ in group])})"
        stopped = [r["steps_run"] for r, _ in group
                   if r["stopped"] == "clear" and r["steps_run"] < budget]
        if stopped:
            detail = f" ({len(stopped)} stopped at {_span(stopped)})"
        if kind == "partial":
            ends_at = [format(g["final_test_acc"], ".2f") for _, g in group]
            detail = f" (end test {_span(ends_at)})"
        parts.append(f"{kind} {len(group)}{detail}")
    return "; ".join(parts)


def groups(runs: list[dict], budget: int | None) -> dict[tuple, list[tuple[dict, dict]]]:
    """(depth, width, budget, lr, norm, layout) -> [(record, its grade)] in seed order; each
    record at `budget` steps, or at its own where None."""
    out: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in runs:
        at = r["max_steps"] if budget is None else budget
        if not gradable(r, at):
            continue
        key = (r["depth"], r["width"], at, r["lr"], r["norm"], r["layout"])
        out.setdefault(key, []).append((r, grade(r, at)))
    order = list(ARMS)
    return {k: sorted(v, key=lambda rg: rg[0]["seed"])
            for k, v in sorted(out.items(), key=lambda kv: (*kv[0][:4], order.index(kv[0][4]),
                                                            kv[0][5]))}


def table(runs: list[dict], budget: int | None = None) -> str:
    """One row per depth, width, budget, lr, norm and layout; per-seed columns in seed order;
    accuracies as mean [min, max] over the seeds. Two records of one seed (an early-stopped and a
    full run) count once: the full one."""
    lines = ["| VGG | width | steps | lr | norm | seeds | train 50% | train 90% | test 50% | "
             "test 90% | final train acc | final test acc | outcome over the seeds | CPU ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (depth, width, steps, lr, norm, layout), rgs in groups(one_per_seed(runs), budget).items():
        ms = statistics.median(r["cpu_ms_per_step"] for r, _ in rgs)
        lines.append(
            f"| {depth} | {width:g} | {steps} | {lr:g} | {norm}"
            f"{'' if layout == 'nchw' else f' ({layout.upper()})'} | "
            f"{','.join(str(r['seed']) for r, _ in rgs)} | "
            + " | ".join(_steps([g[k] for _, g in rgs])
                         for k in ("train_50", "train_90", "test_50", "test_90"))
            + f" | {_spread([g['final_train_acc'] for _, g in rgs])} | "
              f"{_spread([g['final_test_acc'] for _, g in rgs])} | "
              f"{ends(rgs, steps)} | {ms:.0f} |")
    return "\n".join(lines)


def one_per_seed(runs: list[dict]) -> list[dict]:
    """A full run of a seed stands for that seed; an early-stopped one only where there is none."""
    best: dict[tuple, dict] = {}
    for r in runs:
        key = (r["depth"], r["width"], r["norm"], r["lr"], r["seed"], r["layout"], r["max_steps"])
        if key not in best or (best[key]["early_stop"] and not r["early_stop"]):
            best[key] = r
    return list(best.values())


def criteria(runs: list[dict], budget: int | None = None) -> str:
    """Must-have 1 per candidate, budget and layout, seed by seed (paired by seed): the standard
    network at lr 0.1 trains, later than BN, and ends above chance; at lr 0.5 it is at chance or
    diverged while BN trains. "4/5" = holds in 4 of 5 seeds; the last column is the latest seed's
    step to 90% training accuracy as a fraction of the budget."""
    by: dict[tuple, dict[tuple, dict[int, dict]]] = {}
    for (depth, width, steps, lr, norm, layout), rgs in groups(one_per_seed(runs), budget).items():
        arms = by.setdefault((depth, width, steps, layout), {})
        arms[(norm, lr)] = {r["seed"]: g for r, g in rgs}

    def count(arm: dict[int, dict] | None, test) -> str:
        return f"{sum(map(test, arm.values()))}/{len(arm)}" if arm else "-"

    def slower(none: dict[int, dict] | None, bn: dict[int, dict] | None) -> str:
        """In how many seeds the standard network reaches 90% after BN (both train)."""
        seeds = [s for s in none or {} if s in (bn or {})]
        ok = [none[s]["trains"] and bn[s]["trains"] and none[s]["train_90"] > bn[s]["train_90"]
              for s in seeds]
        return f"{sum(ok)}/{len(ok)}" if ok else "-"

    lines = ["| VGG | width | steps | layout | no norm, lr 0.1: trains | later than BN | "
             "ends above chance (gate) | no norm, lr 0.5: chance or diverged | BN, lr 0.5: trains "
             "| latest no-norm step to 90% (lr 0.1) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (depth, width, steps, layout), arms in by.items():
        none1, bn1 = arms.get(("none", 0.1)), arms.get(("batch", 0.1))
        none5, bn5 = arms.get(("none", 0.5)), arms.get(("batch", 0.5))
        latest = "-"
        if none1:
            worst = [g["train_90"] for g in none1.values()]
            latest = ("never in a seed" if None in worst
                      else f"{max(worst)} ({max(worst) / steps:.0%})")
        lines.append(
            f"| {depth} | {width:g} | {steps} | {layout} | {count(none1, lambda g: g['trains'])} | "
            f"{slower(none1, bn1)} | {count(none1, lambda g: g['left_chance'])} | "
            f"{count(none5, lambda g: g['at_chance'])} | {count(bn5, lambda g: g['trains'])} | "
            f"{latest} |")
    return "\n".join(lines)


def bench_table(bench: list[dict]) -> str:
    """Median CPU and wall ms per step of each candidate, norm and layout, and the CPU ratio to
    the first row's."""
    if not bench:
        return ""
    rows: dict[tuple, list[dict]] = {}
    for b in bench:
        rows.setdefault((b["depth"], b["width"], b["norm"], b["layout"]), []).append(b)
    first = None
    lines = ["| VGG | width | norm | layout | rounds | CPU ms/step | wall ms/step | CPU ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for (depth, width, norm, layout), bs in rows.items():
        cpu = statistics.median(b["cpu_ms_per_step"] for b in bs)
        wall = statistics.median(b["wall_ms_per_step"] for b in bs)
        first = first or cpu
        lines.append(f"| {depth} | {width:g} | {norm} | {layout} | {len(bs)} | {cpu:.1f} | "
                     f"{wall:.1f} | {cpu / first:.2f} |")
    return "\n".join(lines)


# -- the driver -----------------------------------------------------------------------------------
def load(path: Path) -> dict:
    doc = json.loads(path.read_text()) if path.exists() else {}
    return {"runs": doc.get("runs", []), "bench": doc.get("bench", [])}


def save(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    head = {"about": "scripts/vgg_search.py: the miniature VGG search; "
                     "`python scripts/vgg_search.py --table --out THIS` prints its tables",
            "torch": torch.__version__}
    # one line per record: small, and a diff shows which runs changed
    body = ",\n".join(f" {json.dumps(k)}: [\n" + ",\n".join(
        "  " + json.dumps(x, separators=(",", ":")) for x in doc[k]) + "\n ]"
        for k in ("runs", "bench"))
    tmp.write_text(json.dumps(head, indent=1)[:-2] + ",\n" + body + "\n}\n")
    tmp.replace(path)


@contextmanager
def locked(path: Path):
    """Read, change and write the JSON with no other search doing the same."""
    name = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"vgg_search-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = load(path)
        yield doc
        save(path, doc)


def candidate(text: str) -> tuple[int, float]:
    try:
        depth, width = text.split(":")
        return int(depth), float(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a candidate is DEPTH:WIDTH, e.g. 11:0.125; got {text!r}")


def quiet() -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    for name in ("lightning.pytorch", "lightning.fabric"):  # "Seed set", "GPU available", ...
        logging.getLogger(name).setLevel(logging.WARNING)
    if os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(1)


def bench(args) -> None:
    """`--bench N` steps of every candidate x norm x layout, interleaved, `--rounds` times."""
    plan = [(d, w, n, lay) for d, w in args.candidates for n in args.norms for lay in args.layouts]
    for i in range(args.rounds):
        for depth, width, norm, layout in plan:
            _, rec, _, _ = fit(fit_args(depth, width, norm, args.lrs[0], args.seeds[0],
                                        args.bench, None, layout, False))
            b = {"depth": depth, "width": width, "norm": norm, "layout": layout, "round": i,
                 "steps": args.bench, "lr": args.lrs[0], "seed": args.seeds[0],
                 "cpu_ms_per_step": round(1000 * rec.cpu / max(1, rec.timed_steps), 2),
                 "wall_ms_per_step": round(1000 * rec.wall / max(1, rec.timed_steps), 2)}
            with locked(args.out) as doc:
                doc["bench"].append(b)
            print(f"[round {i + 1}/{args.rounds}] vgg{depth} w{width:g} {norm} {layout}: "
                  f"{b['cpu_ms_per_step']} CPU ms/step, {b['wall_ms_per_step']} wall", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=candidate, nargs="+", default=[(11, 0.125)],
                   metavar="DEPTH:WIDTH", help="VGG depth (11, 13, 16, 19) and width multiplier")
    p.add_argument("--norms", nargs="+", default=["none", "batch"], choices=list(ARMS))
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=1500, help="the step budget of every run")
    p.add_argument("--val-every", type=int, default=25, help="steps between test evaluations")
    p.add_argument("--layouts", nargs="+", default=["nchw"], choices=list(LAYOUTS),
                   help="kernel layouts: nhwc = --model.channels_last=true (other rounding)")
    p.add_argument("--full", action="store_true", help="no early stop of clearly trained runs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON (read and extended)")
    p.add_argument("--table", action="store_true", help="only print the tables of --out")
    p.add_argument("--budget", type=int, nargs="+", default=None,
                   help="--table: grade every run at these step budgets (default: its own)")
    p.add_argument("--bench", type=int, default=0, metavar="N",
                   help="time N steps (no evaluation) of each candidate, norm and layout at the "
                        "first lr and seed, interleaved, instead of the search")
    p.add_argument("--rounds", type=int, default=3, help="--bench: rounds")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: VGG-11 at width 1/16, none and BN, lr 0.1, seed 0, 20 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.candidates, args.norms, args.lrs, args.seeds = [(11, 0.0625)], ["none", "batch"], [0.1], [0]
        args.steps, args.val_every = 20, 10
    if args.steps < 1 or args.val_every < 1 or args.rounds < 1 or args.bench < 0:
        p.error("--steps, --val-every and --rounds must be >= 1, --bench >= 0")
    if args.table:
        doc = load(args.out)
        for budget in args.budget or [None]:
            print(table(doc["runs"], budget), "", criteria(doc["runs"], budget), "", sep="\n")
        print(bench_table(doc["bench"]))
        return 0
    quiet()
    if args.bench:
        bench(args)
        print(bench_table(load(args.out)["bench"]))
        return 0
    plan = [(d, w, n, lr, s, lay) for d, w in args.candidates for lay in args.layouts
            for lr in args.lrs for n in args.norms for s in args.seeds]
    started = time.perf_counter()
    for i, (depth, width, norm, lr, seed, layout) in enumerate(plan, 1):
        key = run_key(depth, width, norm, lr, seed, layout, args.steps, not args.full)
        if key in {r["key"] for r in load(args.out)["runs"]}:
            print(f"[{i}/{len(plan)}] {key}: in {args.out} already", flush=True)
            continue
        r = {"key": key, **train_one(depth, width, norm, lr, seed, args.steps, args.val_every,
                                     layout, not args.full)}
        with locked(args.out) as doc:
            doc["runs"] = [x for x in doc["runs"] if x["key"] != key] + [r]
        stop = f", stopped at {r['steps_run']}" if r["stopped"] == "clear" else ""
        print(f"[{i}/{len(plan)}] {key}: {r['outcome']}{stop}; train/test 90% at "
              f"{r['train_90']}/{r['test_90']}, final test {r['final_test_acc']:.3f}, "
              f"{r['cpu_ms_per_step']} CPU ms/step ({r['wall_s']:.0f} s; "
              f"{time.perf_counter() - started:.0f} s so far)", flush=True)
    runs = load(args.out)["runs"]
    print(table(runs), "", criteria(runs), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
