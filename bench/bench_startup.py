"""Start-up time: what a `fit` process costs before its first training step, what of it is the
import of Lightning (and torch, W&B, ...), and what bnstudy adds on top; the CLI's `--help` and a
config error; with --plan, the wall and CPU time of a `reproduce` plan of short runs, whose cost
is mostly start-up. Medians of --repeats runs, each a fresh process, the cases interleaved (so a
change in the machine's load hits all of them alike).

    .venv/bin/python bench/bench_startup.py [--repeats 5]
    .venv/bin/python bench/bench_startup.py --repo ../old-checkout       # both checkouts, side by side
    .venv/bin/python bench/bench_startup.py --repo ../old-checkout --plan --repeats 1
    .venv/bin/python bench/bench_startup.py --repo ../old-checkout --plan --plan-alone \
        --plan-only 'dln_*' --plan-scale 1 --repeats 1     # the plan's 8 DLN runs at full length
    .venv/bin/python bench/bench_startup.py --repo ../old-checkout --plan --plan-alone \
        --plan-only 'dln_*' --plan-scale 1 --plan-together   # the same, both plans at once

"fit to first step": `python -m bnstudy fit` of configs/dln.yaml and of a mini VGG (VGG-16
w0.125 on 32x32x3 digits, the VGG `reproduce mini` trained before it moved to VGG-11), from the
launch of the process to the start of its first training step (bench/first_step.py, added with
--trainer.callbacks+=, reports it), W&B disabled as `reproduce` runs it. The fit process imports
lightning.pytorch first and stamps the clock, then runs `python -m bnstudy` (runpy): "bnstudy on
top of lightning ... in one process" is its first step less that stamp, the target's measure;
the "two processes' medians subtracted" line is the fit's median less the median of a separate
`python -c "import lightning.pytorch"` (what earlier versions of this bench printed; it mixes two
processes' machine states). Wall time, and the process's CPU time (all its threads), which a
busy machine inflates less.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
COMMANDS = {
    "--help": ["--help"],
    "fit --help (config first)": ["fit", "--config", "configs/quickstart.yaml", "--help"],
    "config error (--model.lrr=1)": ["fit", "--config", "configs/vgg_bn.yaml", "--model.lrr=1"],
}
MINI_VGG = ["--data=bnstudy.data.DigitsData", "--data.image_size=32", "--data.channels=3",
            "--data.batch_size=128", "--model.width=0.125", "--trainer.val_check_interval=1"]
FITS = {"dln": ["--config", "configs/dln.yaml"],
        "mini vgg": ["--config", "configs/vgg.yaml", *MINI_VGG]}
# imported one after another on top of lightning.pytorch, in one process: what each adds
ON_TOP = ["jsonargparse", "wandb", "torchvision", "sklearn", "matplotlib.pyplot",
          "lightning.pytorch.cli", "bnstudy.lightning_cli"]
TIMED_IMPORTS = r"""
import sys, time
t0, c0 = time.time(), time.process_time()
import lightning.pytorch
print("lightning.pytorch", time.time() - t0, time.process_time() - c0)
for name in sys.argv[1:]:
    t, c = time.time(), time.process_time()
    __import__(name)
    print(name, time.time() - t, time.process_time() - c)
"""
PLAN_ONLY, PLAN_SCALE = "dln_*,vgg_lr0.1,vgg_bn_lr0.1", 0.01


def plan_args(repo: Path, only: str, scale: float) -> list[str]:
    """The same plan in either checkout: one seed where `reproduce` has --seeds (runs <arm>_s0,
    seeded 0), as a checkout from before seeds ran it."""
    module = repo / "bnstudy" / "study" / "reproduce.py"
    module = module if module.exists() else repo / "bnstudy" / "reproduce.py"
    seeds = ["--seeds", "1"] if "--seeds" in module.read_text() else []
    return ["--only", only, "--steps-scale", str(scale), *seeds, "--no-report"]


def reproduce_cmd(out: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "bnstudy", "reproduce", "mini", "--out", str(out), *args]


def plan(repo: Path, out: Path, args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of a whole `reproduce mini` invocation, its runs included; every run
    must have finished."""
    wall, cpu, _, err = launch(reproduce_cmd(out, args), repo)
    runs = sorted((out / "runs").iterdir()) if (out / "runs").exists() else []
    unfinished = [r.name for r in runs if not (r / "done.json").exists()]
    if not runs or unfinished:
        sys.exit(f"bench_startup: reproduce in {repo} left runs unfinished "
                 f"({unfinished or 'no runs'}):\n{err[-3000:]}")
    return wall, cpu


def env_for(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "BNSTUDY_RUN_DIR"}
    env.update(PYTHONPATH=f"{repo}{os.pathsep}{BENCH}", WANDB_MODE="disabled",
               WANDB_SILENT="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def launch(cmd: list[str], repo: Path) -> tuple[float, float, str, str]:
    """Wall and CPU seconds of a whole process (its children included), stdout, stderr."""
    before, start = children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env_for(repo), capture_output=True, text=True)
    return time.perf_counter() - start, children_cpu() - before, proc.stdout, proc.stderr


def children_cpu() -> float:
    """CPU time of this process's reaped children (and theirs): one process runs at a time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# `python -m bnstudy` with lightning.pytorch imported first, its end stamped: the same process's
# first step less that stamp is what bnstudy adds on top of the import, measured in one process
# (subtracting another process's import time mixes two processes' machine states)
LIGHTNING_FIRST = r"""
import runpy, sys, time
import lightning.pytorch
print(f"LIGHTNING_IMPORTED {time.time():.6f} {time.process_time():.6f}", file=sys.stderr, flush=True)
sys.argv = ["bnstudy", *sys.argv[1:]]
runpy.run_module("bnstudy", run_name="__main__", alter_sys=True)
"""


def first_step(repo: Path, fit: list[str], tmp: Path) -> tuple[float, float, float, float]:
    """Seconds from the launch of `python -m bnstudy fit` to its first training step (wall,
    CPU), and from the end of its import of lightning.pytorch to that step (wall, CPU)."""
    run_dir = tempfile.mkdtemp(dir=tmp)
    cmd = [sys.executable, "-c", LIGHTNING_FIRST, "fit", *fit, f"--run_dir={run_dir}",
           "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false", "--trainer.callbacks+=first_step.FirstStep"]
    launched = time.time()
    _, _, _, err = launch(cmd, repo)
    stamps = {}
    for line in err.splitlines():
        if line.startswith(("FIRST_STEP ", "LIGHTNING_IMPORTED ")):
            name, wall, cpu = line.split()
            stamps.setdefault(name, (float(wall), float(cpu)))
    if len(stamps) < 2:
        sys.exit(f"bench_startup: no first step in {' '.join(cmd)}:\n{err[-3000:]}")
    (step, step_cpu), (imported, imported_cpu) = stamps["FIRST_STEP"], stamps["LIGHTNING_IMPORTED"]
    return step - launched, step_cpu, step - imported, step_cpu - imported_cpu


def lightning_import(repo: Path) -> tuple[float, float]:
    code = ("import time; t = time.time(); import lightning.pytorch; "
            "print(time.time(), time.process_time())")
    launched = time.time()
    _, _, out, _ = launch([sys.executable, "-c", code], repo)
    end, cpu = map(float, out.split())
    return end - launched, cpu


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=None,
                        help="another checkout (e.g. of an earlier commit), measured beside this")
    parser.add_argument("--plan", action="store_true",
                        help="also time a `reproduce mini` plan, --no-report (in each checkout)")
    parser.add_argument("--plan-only", default=PLAN_ONLY, metavar="PATTERNS",
                        help=f"the plan's runs (reproduce --only; default {PLAN_ONLY!r})")
    parser.add_argument("--plan-scale", type=float, default=PLAN_SCALE, metavar="S",
                        help=f"the plan's --steps-scale (default {PLAN_SCALE}: mostly start-up; "
                             "1 for the runs at their full length)")
    parser.add_argument("--plan-alone", action="store_true",
                        help="only the plan (no imports, start-up or CLI timings)")
    parser.add_argument("--plan-together", action="store_true",
                        help="with --repo: both checkouts' plans at once, one run at a time each "
                             "(--jobs 1), so that both see the same machine throughout")
    args = parser.parse_args()
    repos = {"this": REPO} | ({"other": args.repo.resolve()} if args.repo else {})
    tmp = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"this: {REPO}" + (f"; other: {repos['other']}" if args.repo else ""), flush=True)

    if not args.plan_alone:
        startup(args, repos, tmp)
    if args.plan_together:  # implies --plan
        if not args.repo:
            parser.error("--plan-together needs --repo")
        plans_together(args, repos, tmp)
    elif args.plan:
        plans(args, repos, tmp)


def startup(args, repos: dict[str, Path], tmp: Path) -> None:
    # imports, each on top of lightning.pytorch (this checkout's bnstudy)
    marginal: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        _, _, out, _ = launch([sys.executable, "-c", TIMED_IMPORTS, *ON_TOP], REPO)
        for line in out.splitlines():
            name, wall, cpu = line.split()
            marginal.setdefault(name, []).append((float(wall), float(cpu)))
    print("\nimports (s, wall / CPU; after the first, each on top of those above it):")
    for name, values in marginal.items():
        print(f"  {name:28s} {median(w for w, _ in values):6.2f} / "
              f"{median(c for _, c in values):5.2f}")

    # fit to its first step, against the import of lightning, interleaved
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    same: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for label, repo in repos.items():
            times.setdefault((label, "import lightning.pytorch"), []).append(
                lightning_import(repo))
            for fit_name, fit in FITS.items():
                wall, cpu, on_top, on_top_cpu = first_step(repo, fit, tmp)
                times.setdefault((label, f"fit to first step: {fit_name}"), []).append(
                    (wall, cpu))
                same.setdefault((label, fit_name), []).append((on_top, on_top_cpu))
    print(f"\nstart-up (s, wall / CPU, median of {args.repeats}):")
    for (label, name), values in times.items():
        print(f"  {label:5s} {name:32s} {median(w for w, _ in values):6.2f} / "
              f"{median(c for _, c in values):5.2f}")
    for label in repos:
        base = times[(label, "import lightning.pytorch")]
        for fit_name in FITS:
            fit = times[(label, f"fit to first step: {fit_name}")]
            print(f"  {label:5s} bnstudy on top of lightning, {fit_name:8s}    "
                  f"{median(w for w, _ in fit) - median(w for w, _ in base):6.2f} / "
                  f"{median(c for _, c in fit) - median(c for _, c in base):5.2f}"
                  "   (two processes' medians subtracted)")
    for label in repos:
        for fit_name in FITS:
            values = same[(label, fit_name)]
            print(f"  {label:5s} bnstudy on top of lightning, {fit_name:8s}    "
                  f"{median(w for w, _ in values):6.2f} / {median(c for _, c in values):5.2f}"
                  f"   (in one process, [{min(w for w, _ in values):.2f}-"
                  f"{max(w for w, _ in values):.2f}]; target: under 1.5 s)")

    print("\nCLI (s, wall, median):")
    for name, argv in COMMANDS.items():
        for label, repo in repos.items():
            walls = [launch([sys.executable, "-m", "bnstudy", *argv], repo)[0]
                     for _ in range(args.repeats)]
            print(f"  {label:5s} {name:32s} {median(walls):6.2f}  (min {min(walls):.2f}, "
                  f"max {max(walls):.2f})")



def plans(args, repos: dict[str, Path], tmp: Path) -> None:
    print(f"\nreproduce mini --only {args.plan_only!r} --steps-scale {args.plan_scale}, one seed, "
          "--no-report (s, wall / CPU of the whole invocation, its runs included):", flush=True)
    times: dict[str, list[tuple[float, float]]] = {}
    for i in range(args.repeats):
        # the order alternates, so that a trend in the machine's speed favours neither
        for label, repo in (list(repos.items()) if i % 2 == 0 else list(repos.items())[::-1]):
            wall, cpu = plan(repo, tmp / f"plan_{label}_{i}",
                             plan_args(repo, args.plan_only, args.plan_scale))
            times.setdefault(label, []).append((wall, cpu))
            print(f"  {label:5s} run {i + 1}: {wall:7.2f} / {cpu:7.2f}", flush=True)
    if "other" in times:
        new, old = times["this"], times["other"]
        print(f"  other/this (speed-up of this checkout): wall "
              f"{median(w for w, _ in old) / median(w for w, _ in new):.2f}, "
              f"CPU {median(c for _, c in old) / median(c for _, c in new):.2f}")

def plans_together(args, repos: dict[str, Path], tmp: Path) -> None:
    """Both checkouts' plans side by side: started together, one run at a time each (--jobs 1),
    one core each. The plan that ends first starts again (into another directory, not counted),
    so that the other one keeps a neighbour of the same kind to its end; then the extra one is
    stopped. Whatever the machine does in those minutes, it does to both, with no drift between
    a first and a second plan. The whole plans' wall times give the speed-up; the sum of the
    runs' own times is beside it (a run of a checkout with worker processes leaves out its
    worker's start-up, paid once; an older checkout's run includes its process's)."""
    print(f"\nreproduce mini --only {args.plan_only!r} --steps-scale {args.plan_scale}, one seed, "
          "--no-report --jobs 1, both checkouts at once (s, wall of the invocation):", flush=True)
    procs, first, began = {}, {}, time.perf_counter()

    def start(label: str, index: int) -> None:
        repo, out = repos[label], tmp / f"plan_{label}_{index}"
        cmd = reproduce_cmd(out, [*plan_args(repo, args.plan_only, args.plan_scale), "--jobs", "1"])
        with open(tmp / f"plan_{label}_{index}.log", "w") as log:  # a pipe could fill, block
            procs[label] = (subprocess.Popen(cmd, cwd=repo, env=env_for(repo), stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True),
                            index, out, time.perf_counter())

    def stop_all() -> None:
        for proc, *_ in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # reproduce stops its workers on SIGTERM
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    try:
        for label in repos:
            start(label, 0)
        # until each checkout has one whole plan; a failing neighbour is restarted 3 times at most
        failures = 0
        while len(first) < len(repos):
            time.sleep(1)
            for label, (proc, index, out, t0) in list(procs.items()):
                if proc.poll() is None:
                    continue
                if proc.returncode != 0 and label in first:  # a neighbour's failure
                    failures += 1
                if proc.returncode != 0 and label not in first:
                    log = (tmp / f"plan_{label}_{index}.log").read_text()
                    sys.exit(f"bench_startup: reproduce in {repos[label]} failed "
                             f"({proc.returncode}):\n{log[-3000:]}")
                if label not in first:
                    first[label] = (time.perf_counter() - t0, out)
                    print(f"  {label:5s} plan: {first[label][0]:7.2f} (ended at "
                          f"{time.perf_counter() - began:.0f} s)", flush=True)
                if len(first) < len(repos) and failures <= 3:
                    start(label, index + 1)  # the neighbour of the plan still running
                elif len(first) < len(repos):
                    del procs[label]  # failed too often: the other plan ends alone
    finally:  # an error or Ctrl-C: the plans run in their own sessions and would go on
        stop_all()
    report_together(first)


def report_together(first: dict) -> None:
    per_run = {label: {r.name.removesuffix("_s0"): json.loads((r / "done.json").read_text())
                       for r in sorted((out / "runs").iterdir())}
               for label, (_, out) in first.items()}
    print("\nper run, wall s (done.json), other / this:")
    nan = float("nan")
    for name in sorted(set(per_run["this"]) | set(per_run["other"])):
        new = per_run["this"].get(name, {}).get("wall_s")
        old = per_run["other"].get(name, {}).get("wall_s")
        both = new is not None and old is not None
        print(f"  {name:24s} {nan if old is None else old:8.1f} {nan if new is None else new:8.1f}"
              f"   {old / new if both else nan:.2f}")
    common = set(per_run["this"]) & set(per_run["other"])  # the sums over the same runs
    sums = {label: sum(runs[n]["wall_s"] for n in common) for label, runs in per_run.items()}
    print(f"  {'sum of the runs':24s} {sums['other']:8.1f} {sums['this']:8.1f}   "
          f"{sums['other'] / sums['this']:.2f}")
    print(f"  {'whole plan (wall)':24s} {first['other'][0]:8.1f} {first['this'][0]:8.1f}   "
          f"{first['other'][0] / first['this'][0]:.2f}")


if __name__ == "__main__":
    main()
