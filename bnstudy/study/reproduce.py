"""`python -m bnstudy reproduce mini --out results/mini`: the paper's claims 1-5 on a laptop.

Every run is a plain `fit` of a paper config plus overrides (printed by --dry-run), in its own
directory out/runs/<name>, started as a subprocess (a crash or a leak ends that run only). A
finished run leaves done.json and is skipped when the command is run again; an interrupted one
resumes from its last checkpoint, so a rerun after a crash loses nothing. At the end the report
(`python -m bnstudy report`) is written to out/report and the wall time to out/timing.json.

The mini VGG is VGG-16 at 1/8 width on the digits upscaled to 32x32 with three channels: the
paper's geometry (five pools take 32x32 to 1x1), a CIFAR-shaped input, 1,437 training images. The
deep linear network runs at the paper's exact size, steps and learning rates.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bnstudy.analysis.runs import load_run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# The digits-32 miniature of the paper's VGG setup (see the module docstring): the paper's batch
# size, optimizer and init. Without BN the network needs a few hundred steps to leave its initial
# plateau (measured: still at chance at step 200, 17% test accuracy at step 250).
VGG_DATA = ["--data=bnstudy.data.DigitsData", "--data.image_size=32", "--data.channels=3",
            "--data.batch_size=128"]
VGG_WIDTH = 0.125
VGG_STEPS = 1000     # 89 epochs of the 1,437 training digits (2,000 and 1,500 ran over the 45-minute budget)
VGG_VAL_EVERY = 100
DLN_STEPS = 10_000   # the paper's


@dataclass
class PlannedRun:
    """A run of the plan: a paper config, its steps and overrides (a finished run is an
    analysis.runs.Run)."""

    name: str
    config: str                      # a file in configs/
    steps: int
    overrides: list[str] = field(default_factory=list)
    claims: str = ""                 # which claims/figures it feeds (for --dry-run and the docs)

    def fit_args(self, run_dir: Path, steps_scale: float) -> list[str]:
        steps = max(2, round(self.steps * steps_scale))
        args = ["fit", "--config", str(CONFIGS / self.config), f"--run_dir={run_dir}",
                f"--trainer.max_steps={steps}", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", *self.overrides]
        if self.config.startswith("vgg"):
            args += [f"--trainer.val_check_interval={min(VGG_VAL_EVERY, steps)}"]
        elif steps < DLN_STEPS:  # a shortened DLN run still evaluates about ten times
            args += [f"--data.steps_per_epoch={max(1, steps // 10)}",
                     "--trainer.check_val_every_n_epoch=1"]
        return args


def _vgg(name: str, config: str, lr: float, claims: str, *extra: str) -> PlannedRun:
    return PlannedRun(name, config, VGG_STEPS,
               [*VGG_DATA, f"--model.width={VGG_WIDTH}", f"--model.lr={lr}", *extra], claims)


def _dln(name: str, config: str, lr: float, claims: str) -> PlannedRun:
    return PlannedRun(name, config, DLN_STEPS, [f"--model.lr={lr}"], claims)


def mini_runs() -> list[PlannedRun]:
    """The mini reproduction, most important first (two run at a time), so that a run cut short
    by the time at hand has the key figures already."""
    return [
        _vgg("vgg_bn_lr0.1", "vgg_bn.yaml", 0.1, "claims 1-4; figures 1-4"),
        _vgg("vgg_lr0.1", "vgg.yaml", 0.1, "claims 1-4; figures 1-4"),
        _dln("dln_lr1e-6", "dln.yaml", 1e-6, "claims 3-5; figures 3, 5, 9, 10, 11"),
        _dln("dln_bn_lr1e-6", "dln_bn.yaml", 1e-6, "claims 3-5; figures 3, 5, 9, 10, 11"),
        _vgg("vgg_bn_lr0.5", "vgg_bn.yaml", 0.5, "claim 1; figure 1"),
        _vgg("vgg_lr0.5", "vgg.yaml", 0.5, "claim 1; figure 1"),
        _vgg("vgg_noisy_bn_lr0.1", "vgg_noisy_bn.yaml", 0.1, "claim 2; figure 2"),
        _vgg("vgg_noise_lr0.1", "vgg.yaml", 0.1, "claim 2 (the noise without BN)",
             "--model.norm=noise"),
        _dln("dln_noisy_bn_lr1e-6", "dln_noisy_bn.yaml", 1e-6, "claim 2"),
        _dln("dln_l1_lr1e-6", "dln_l1.yaml", 1e-6, "claim 5; figures 5, 13"),
        _dln("dln_l2_lr1e-6", "dln_l2.yaml", 1e-6, "claim 5; figures 5, 13"),
        _dln("dln_linf_lr1e-6", "dln_linf.yaml", 1e-6, "claim 5; figures 5, 13"),
        _vgg("vgg_l1_lr0.1", "vgg_l1.yaml", 0.1, "claim 5; figures 5, 6, 12"),
        _vgg("vgg_l2_lr0.1", "vgg_l2.yaml", 0.1, "claim 5; figures 5, 6, 12"),
        _vgg("vgg_linf_lr0.1", "vgg_linf.yaml", 0.1, "claim 5; figures 5, 6, 12"),
        _dln("dln_lr1e-7", "dln.yaml", 1e-7, "claim 3; figure 3"),
        _dln("dln_bn_lr1e-7", "dln_bn.yaml", 1e-7, "claim 3; figure 3"),
        _vgg("vgg_bn_lr0.01", "vgg_bn.yaml", 0.01, "claim 3; figure 3"),
        _vgg("vgg_lr0.01", "vgg.yaml", 0.01, "claim 3; figure 3"),
    ]


PLANS = {"mini": mini_runs}


# -- reading a run's progress and result -------------------------------------------------------
def result_line(run_dir: Path) -> str:
    """The final numbers of a run, for the progress display: loss, test accuracy or loss."""
    run = load_run(run_dir)
    parts = []
    for key, label, fmt in (("train/loss", "loss", ".3g"), ("val/acc", "test acc", ".3f"),
                            ("val/loss", "test loss", ".3g")):
        value = run.last(key)
        if value is not None and not (key == "val/loss" and run.last("val/acc")):
            parts.append(f"{label} {value:{fmt}}")
    if run.last("diverged"):
        parts.append("diverged")
    return ", ".join(parts)


def current_step(run_dir: Path) -> int:
    """The newest step in metrics.csv (written every 100 steps), 0 before the first flush."""
    path = run_dir / "metrics.csv"
    try:
        with open(path, "rb") as f:
            header = f.readline().decode().strip().split(",")
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read().decode(errors="ignore").splitlines()[1:]
    except OSError:
        return 0
    column = header.index("step") if "step" in header else None
    steps = [int(float(c[column])) for c in (line.split(",") for line in tail)
             if column is not None and len(c) > column and c[column].replace(".", "").isdigit()]
    return max(steps, default=0)


# -- running -------------------------------------------------------------------------------------
def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("WANDB_MODE", "disabled")  # set WANDB_MODE=offline/online to log to W&B too
    return env


LIVE: dict[str, subprocess.Popen] = {}  # runs in progress, ended by stop_children on Ctrl-C
STOPPING = threading.Event()  # set on Ctrl-C: no new run starts


def stop_children(grace_s: float = 10.0) -> None:
    """End the runs in progress (their last checkpoint stays: the next invocation resumes)."""
    STOPPING.set()
    for proc in list(LIVE.values()):
        proc.terminate()
    deadline = time.time() + grace_s
    for proc in list(LIVE.values()):
        try:
            proc.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()


def run_one(run: PlannedRun, out: Path, steps_scale: float, threads: int) -> dict:
    run_dir = out / "runs" / run.name
    if (run_dir / "done.json").exists():  # finished at another step count: kept, set aside
        old = json.loads((run_dir / "done.json").read_text()).get("steps", "other")
        run_dir.rename(run_dir.with_name(f"{run.name}.{old}-steps"))
    run_dir.mkdir(parents=True, exist_ok=True)
    log = out / "logs" / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bnstudy", *run.fit_args(run_dir, steps_scale)]
    if STOPPING.is_set():
        return {"name": run.name, "rc": 130, "wall_s": 0.0, "cpu_s": 0.0, "log": str(log)}
    start = time.perf_counter()
    with open(log, "a") as f:
        proc = LIVE[run.name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                 env=child_env(threads))
        try:
            # wait4: this child's own CPU time, which on a busy machine says what an idle one needs
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
        finally:
            LIVE.pop(run.name, None)
    result = {"name": run.name, "rc": rc, "wall_s": round(time.perf_counter() - start, 1),
              "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "command": " ".join(["python", *cmd[1:]]), "log": str(log)}
    result["steps"] = max(2, round(run.steps * steps_scale))
    if rc == 0:
        (run_dir / "done.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def finished(done: Path, steps: int) -> bool:
    """The run finished with this many steps (done.json of a run with another --steps-scale, e.g.
    a smoke test into the same --out, does not count). Runs recorded before the step count was
    kept count as finished."""
    if not done.exists():
        return False
    return json.loads(done.read_text()).get("steps", steps) == steps


def run_all(runs: list[PlannedRun], out: Path, steps_scale: float, jobs: int, threads: int) -> list[dict]:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    results, todo = [], []
    for run in runs:
        done = out / "runs" / run.name / "done.json"
        if finished(done, max(2, round(run.steps * steps_scale))):
            results.append({**json.loads(done.read_text()), "skipped": True})
        else:
            todo.append(run)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, refresh_per_second=2) as progress:
        for r in results:
            progress.console.print(f"[dim]skipped {r['name']} (finished earlier: "
                                   f"{result_line(out / 'runs' / r['name'])})[/dim]")
        overall = progress.add_task("runs", total=len(runs), completed=len(results))
        active: dict[str, tuple[int, Path, int]] = {}

        def start(run: PlannedRun) -> dict:
            done = out / "runs" / run.name / "done.json"
            if finished(done, max(2, round(run.steps * steps_scale))):  # finished meanwhile by another invocation (e.g. an --only one)
                progress.console.print(f"[dim]skipped {run.name} (finished meanwhile)[/dim]")
                progress.advance(overall)
                return {**json.loads(done.read_text()), "skipped": True}
            steps = max(2, round(run.steps * steps_scale))
            task = progress.add_task(f"  {run.name}", total=steps)
            active[run.name] = (task, out / "runs" / run.name, steps)
            result = run_one(run, out, steps_scale, threads)
            del active[run.name]
            progress.remove_task(task)
            status = (result_line(out / "runs" / run.name) if result["rc"] == 0
                      else f"[red]FAILED rc={result['rc']}, see {result['log']}[/red]")
            progress.console.print(f"{'done' if result['rc'] == 0 else 'fail'} {run.name} "
                                   f"{result['wall_s']:.0f} s: {status}")
            progress.advance(overall)
            return result

        pool = ThreadPoolExecutor(max_workers=jobs)
        futures = [pool.submit(start, run) for run in todo]
        try:
            while not all(f.done() for f in futures):
                for task, run_dir, steps in list(active.values()):
                    progress.update(task, completed=min(current_step(run_dir), steps))
                time.sleep(1.0)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            stop_children()
            progress.console.print("interrupted: finished runs are kept, the runs in progress "
                                   "resume from their last checkpoint when you run this again")
            raise
        pool.shutdown()
        results += [f.result() for f in futures]
    return results


def write_report(run_dirs: list[Path], out: Path):
    """The report's claims (a list), or None when the report module is missing."""
    try:
        from bnstudy.analysis.report import build_report
    except ImportError:
        print("bnstudy reproduce: the report module is not installed; runs kept, no report",
              file=sys.stderr)
        return None
    # W&B only where the user asked for it (WANDB_MODE), never through a key found in ~/.netrc
    wandb = os.environ.get("WANDB_MODE") in ("online", "offline")
    return list(getattr(build_report(run_dirs, out, wandb=wandb), "claims", None) or [])


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_summary(out: Path, runs: list[PlannedRun], timing: dict, claims, argv: list[str]) -> Path:
    """out/summary.md: the command, its time, one row per run and the claims table, in Markdown
    (docs/RESULTS.md quotes it)."""
    lines = [f"Command: `python -m bnstudy reproduce {' '.join(argv)}`", "",
             f"Wall time {timing['wall_s'] / 60:.1f} min for this invocation ({timing['jobs']} "
             f"runs at a time, {timing['threads_per_job']} thread each, {timing['cpu_count']} "
             f"CPU cores, load average {timing['loadavg_at_start'][0]} at the start and "
             f"{timing['loadavg_at_end'][0]} at the end); CPU time in the runs "
             f"{timing['cpu_s'] / 60:.1f} min. Started {timing['started']}.", ""]
    whole = [i for i in timing.get("invocations", []) if i["ran"] == i["of"] == len(runs)]
    if whole:  # the newest invocation that ran every run: the plan's own time
        i = whole[-1]
        lines[-1:] = [f"The whole plan, all {i['of']} runs in one invocation: {i['wall_s'] / 60:.1f} "
                      f"min wall, {i['cpu_s'] / 60:.1f} CPU min in the runs ({i['jobs']} runs at a "
                      f"time, steps scale {i['steps_scale']:g}, load average "
                      f"{i['loadavg_at_start'][0]} at the start; started {i['started']}).", ""]
    lines += ["| run | feeds | steps | final train loss | final test acc | final test loss | "
              "wall s | CPU s |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        logged = load_run(out / "runs" / run.name)
        steps = max((s for series in logged.metrics.values() for s, _ in series), default=0)
        cells = [logged.last(k) for k in ("train/loss", "val/acc", "val/loss")]
        info = timing["runs"].get(run.name, {})
        lines.append("| " + " | ".join(_cell(c) for c in [
            run.name, run.claims, steps, *(f"{c:.4g}" if c is not None else "-" for c in cells),
            info.get("wall_s", "-"), info.get("cpu_s", "-")]) + " |")
    if claims:
        lines += ["", "| claim | verdict | rule | numbers | note |", "|---|---|---|---|---|"]
        for c in claims:
            lines.append("| " + " | ".join(_cell(x) for x in [
                f"{c.number}. {c.statement}", f"**{c.verdict}**", c.rule,
                "<br>".join(c.numbers) or "-", c.note or "-"]) + " |")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def publish(out: Path, docs: Path, max_width: int = 900) -> list[Path]:
    """Copy the report's figures (shrunk: at most `max_width` pixels wide, 8-bit palette) and
    summary.md into `docs`, the files docs/RESULTS.md shows."""
    from PIL import Image

    docs.mkdir(parents=True, exist_ok=True)
    written = []
    for png in sorted((out / "report").glob("*.png")):
        with Image.open(png) as img:
            img = img.convert("RGB")
            if img.width > max_width:
                img = img.resize((max_width, round(img.height * max_width / img.width)),
                                 Image.LANCZOS)
            img.quantize(colors=64).save(docs / png.name, optimize=True)
        written.append(docs / png.name)
    (docs / "summary.md").write_text((out / "summary.md").read_text())
    return written + [docs / "summary.md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bnstudy reproduce",
        description="Run a reproduction plan (each run a `fit` of a paper config), skip the runs "
                    "already finished, then write the report.")
    parser.add_argument("plan", choices=sorted(PLANS),
                        help="mini: claims 1-5 on 2 CPU cores in under 45 minutes")
    parser.add_argument("--out", type=Path, default=Path("results/mini"),
                        help="runs/, logs/, report/ and timing.json go here (default results/mini)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every run's steps (e.g. 0.01 for a smoke test; at least 2)")
    parser.add_argument("--only", default="",
                        help="comma-separated run names or globs (e.g. 'dln_*,vgg_bn_lr0.1')")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: two 1-thread runs use 2 cores "
                             "better than one 2-thread run on these small models)")
    parser.add_argument("--no-report", action="store_true", help="only run, do not draw")
    parser.add_argument("--docs", type=Path, default=None,
                        help="also copy the figures (shrunk) and summary.md here, e.g. "
                             "docs/results for docs/RESULTS.md")
    parser.add_argument("--dry-run", action="store_true", help="print the fit commands and stop")
    args = parser.parse_args(argv)
    if args.steps_scale <= 0 or args.jobs < 1 or args.threads < 1:
        parser.error("--steps-scale must be > 0, --jobs and --threads >= 1")
    runs = PLANS[args.plan]()
    if args.only:
        patterns = [p.strip() for p in args.only.split(",") if p.strip()]
        runs = [r for r in runs if any(fnmatch.fnmatch(r.name, p) for p in patterns)]
        if not runs:
            parser.error(f"--only {args.only!r} matches no run of plan {args.plan}")
    if args.dry_run:
        for run in runs:
            fit = run.fit_args(args.out / "runs" / run.name, args.steps_scale)
            fit[2] = os.path.relpath(fit[2])  # configs/x.yaml when run from the repository
            print(f"# {run.name}: {run.claims}\npython -m bnstudy {' '.join(fit)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started, load = time.time(), os.getloadavg()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` ends the runs too
    try:
        results = run_all(runs, args.out, args.steps_scale, args.jobs, args.threads)
    except KeyboardInterrupt:
        return 130
    runs_wall = time.time() - started
    # a run that failed before its first step has no metrics.csv: the report takes the others
    logged = [args.out / "runs" / r.name for r in runs
              if (args.out / "runs" / r.name / "metrics.csv").exists()]
    claims = None if args.no_report or not logged else write_report(logged, args.out / "report")
    report = claims is not None
    wall = time.time() - started
    timing = {"plan": args.plan, "wall_s": round(wall, 1), "runs_wall_s": round(runs_wall, 1),
              "report_wall_s": round(wall - runs_wall, 1), "jobs": args.jobs,
              "threads_per_job": args.threads, "steps_scale": args.steps_scale,
              "cpu_count": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in load],
              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
              "runs": {r["name"]: {k: r[k] for k in ("rc", "wall_s", "cpu_s") if k in r}
                       | {"skipped": bool(r.get("skipped"))} for r in results}}
    timing["cpu_s"] = round(sum(r.get("cpu_s", 0) for r in results if not r.get("skipped")), 1)
    # every invocation is kept: a rerun that only redraws the report must not replace the time
    # of the one that ran the plan
    path = args.out / "timing.json"
    previous = json.loads(path.read_text()).get("invocations", []) if path.exists() else []
    timing["invocations"] = previous + [{
        **{k: timing[k] for k in ("started", "wall_s", "cpu_s", "jobs", "threads_per_job",
                                  "steps_scale", "loadavg_at_start", "loadavg_at_end")},
        "ran": sum(not r.get("skipped") for r in results), "of": len(results)}]
    path.write_text(json.dumps(timing, indent=1) + "\n")
    write_summary(args.out, runs, timing, claims, list(sys.argv[1:] if argv is None else argv))
    if args.docs is not None and report:
        print(f"copied {len(publish(args.out, args.docs))} files to {args.docs}")
    failed = [r["name"] for r in results if r["rc"] != 0]
    print(f"bnstudy reproduce {args.plan}: {len(results) - len(failed)}/{len(results)} runs done "
          f"in {wall / 60:.1f} min wall ({timing['cpu_s'] / 60:.1f} CPU min in the runs)"
          + (f"; report in {args.out / 'report'}" if report else "")
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
