"""`python -m bnstudy reproduce mini --out results/mini`: the paper's claims 1-5 on a laptop.

Every run is a plain `fit` of a paper config plus overrides (printed by --dry-run), in its own
directory out/runs/<name>, started as a subprocess (a crash or a leak ends that run only). A
finished run leaves done.json and is skipped when the command is run again; an interrupted one
resumes from its last checkpoint, so a rerun after a crash loses nothing. At the end the report
(`python -m bnstudy report`) is written to out/report and the wall time to out/timing.json.

The mini VGG is VGG-11 at 1/8 width on the digits upscaled to 32x32 with three channels: the
paper's geometry (five pools take 32x32 to 1x1), a CIFAR-shaped input, 1,437 training images,
chosen by scripts/vgg_search.py (docs/RESULTS.md): without BN it trains at lr 0.1, more slowly
than with BN, and stays at chance or diverges at lr 0.5, in every seed searched; VGG-16 at this
width leaves its plateau at a seed-dependent step between about 400 and 1,000+. The paper's
instrumented layers are mapped to the same relative depth (configs/common/instruments_vgg11.yaml).
The deep linear network runs at the paper's exact size, steps and learning rates.

Every arm (a config and its overrides) runs with --seeds seeds, named <arm>_s<seed>; a seed S is
`--seed_everything=S --data.seed=S` (VGG: the init, the data order and the train/test split; DLN:
the init, A and x). The plan runs seed 0 of every arm first, then seed 1, ...: a plan cut short
has whole seeds.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import fnmatch
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bnstudy.analysis.runs import load_run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# The digits-32 miniature of the paper's VGG setup (see the module docstring): the paper's batch
# size, optimizer and init. Without BN the network needs 100-360 steps to reach 90% training
# accuracy at lr 0.1 (scripts/vgg_search.py, seeds 0-4, channels_last), so 600 steps leave every
# seed well past its plateau.
VGG_BATCH = 128
VGG_DATA = ["--data=bnstudy.data.DigitsData", "--data.image_size=32", "--data.channels=3",
            f"--data.batch_size={VGG_BATCH}"]
VGG_DEPTH = 11
VGG_WIDTH = 0.125
VGG_STEPS = 600      # 53 epochs of the 1,437 training digits
VGG_VAL_EVERY = 50
# channels_last: 1.2-1.5x faster on this CPU for the mini VGG (bench/bench_overhead.py); the
# search's seeds were graded in this layout (kernels of another layout round differently)
VGG_MODEL = [f"--model.depth={VGG_DEPTH}", f"--model.width={VGG_WIDTH}",
             "--model.channels_last=true",
             f"--trainer.callbacks={CONFIGS / 'common' / 'instruments_vgg11.yaml'}"]
DLN_STEPS = 10_000   # the paper's
SEEDS = 3            # the default of --seeds


@dataclass
class PlannedRun:
    """A run of the plan: a paper config, its steps and overrides (a finished run is an
    analysis.runs.Run)."""

    name: str
    config: str                      # a file in configs/
    steps: int
    overrides: list[str] = field(default_factory=list)
    claims: str = ""                 # which claims/figures it feeds (for --dry-run and the docs)
    seed: int = 0
    arm: str = ""                    # the name without its seed (set by seeded)

    def seeded(self, seed: int) -> "PlannedRun":
        return PlannedRun(f"{self.name}_s{seed}", self.config, self.steps, self.overrides,
                          self.claims, seed, self.name)

    def fit_args(self, run_dir: Path, steps_scale: float) -> list[str]:
        steps = max(2, round(self.steps * steps_scale))
        args = ["fit", "--config", str(CONFIGS / self.config), f"--run_dir={run_dir}",
                f"--trainer.max_steps={steps}", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", *self.overrides,
                f"--seed_everything={self.seed}", f"--data.seed={self.seed}"]  # after --data=
        if self.config.startswith("vgg"):
            args += [f"--trainer.val_check_interval={min(VGG_VAL_EVERY, steps)}"]
        elif steps < DLN_STEPS:  # a shortened DLN run still evaluates about ten times
            args += [f"--data.steps_per_epoch={max(1, steps // 10)}",
                     "--trainer.check_val_every_n_epoch=1"]
        return args


def _vgg(name: str, config: str, lr: float, claims: str, *extra: str) -> PlannedRun:
    return PlannedRun(name, config, VGG_STEPS,
               [*VGG_DATA, *VGG_MODEL, f"--model.lr={lr}", *extra], claims)


def _dln(name: str, config: str, lr: float, claims: str) -> PlannedRun:
    return PlannedRun(name, config, DLN_STEPS, [f"--model.lr={lr}"], claims)


def mini_runs(seeds: int = SEEDS) -> list[PlannedRun]:
    """The mini reproduction: every arm with `seeds` seeds, seed 0 of every arm first, each seed's
    arms most important first (two run at a time), so that a plan cut short by the time at hand
    has whole seeds and the key figures."""
    return [arm.seeded(seed) for seed in range(seeds) for arm in mini_arms()]


def mini_arms() -> list[PlannedRun]:
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


# -- running: worker processes -------------------------------------------------------------------
# A fit's fixed cost is mostly importing Lightning, torch and their dependencies (about 6 s a
# process here, more beside a busy core): as much as a short run's training. So the plan runs in
# --jobs worker processes, each started once: a worker imports the fit machinery, then runs the
# runs it is handed one after another, each through bnstudy.cli.main, the entry point of
# `python -m bnstudy fit`, with the arguments --dry-run prints. Each run is an ordinary run
# directory, its output in logs/<name>.log. A run that fails ends its worker (a fresh one takes
# the next run); a worker that dies (a segfault, the OOM killer) fails only the run it was on.

def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("WANDB_MODE", "disabled")  # set WANDB_MODE=offline/online to log to W&B too
    return env


def _cpu_s() -> float:
    """CPU time of this process and its reaped children (DDP ranks, if any) so far."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


@contextmanager
def _as_in_a_new_process(torch_rng):
    """Runs the body as a new `fit` process would, and puts back afterwards what a fit may change
    process-wide, so that the next run in this process starts from the same state: environment
    variables (BNSTUDY_RUN_DIR, PL_GLOBAL_SEED, WANDB_MODE), the working directory and sys.path,
    torch's thread count, default dtype, matmul precision, deterministic and grad modes, its
    default generator (set to a new process's), signal handlers, warning filters and the record
    of warnings already shown, sys.stdout/stderr/excepthook (W&B wraps them), and the logging
    handlers, levels and filters (a handler added by the run is closed)."""
    import logging
    import warnings

    import torch

    environ, cwd, path = dict(os.environ), os.getcwd(), sys.path[:]
    torch_state = (torch.get_num_threads(), torch.get_default_dtype(),
                   torch.get_float32_matmul_precision(),
                   torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled(), torch.is_grad_enabled())
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    streams = sys.stdout, sys.stderr, sys.excepthook
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    logging_state = {lg: (lg.handlers[:], lg.filters[:], lg.level, lg.propagate, lg.disabled)
                     for lg in loggers}
    torch.set_rng_state(torch_rng)
    try:
        with warnings.catch_warnings():  # restores the filters; warnings show again next run
            yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        sys.path[:] = path
        threads, dtype, matmul, deterministic, warn_only, grad = torch_state
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.set_float32_matmul_precision(matmul)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_grad_enabled(grad)
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        sys.stdout, sys.stderr, sys.excepthook = streams
        for lg in [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]:
            kept, filters, level, propagate, disabled = logging_state.get(lg, ([], [], 0, True,
                                                                                False))
            for handler in [h for h in lg.handlers if h not in kept]:
                lg.removeHandler(handler)
                handler.close()
            lg.handlers[:], lg.filters[:] = kept, filters
            lg.level, lg.propagate, lg.disabled = level, propagate, disabled
        gc.collect()


def _fit_here(args: list[str], log: str, header: str, torch_rng) -> tuple[int, dict]:
    """One `fit` in this process, its output (Python's and C's, fds 1 and 2) appended to `log`.
    Returns the exit code `python -m bnstudy fit` would have had, and its start-up (seconds to
    its first training step, wall and CPU: StartupTime's STARTUP; empty if it took none)."""
    from bnstudy.callbacks.startup_time import STARTUP
    from bnstudy.cli import main as bnstudy_main

    sys.stdout.flush()
    sys.stderr.flush()
    between = os.dup(2)  # the worker's own log, between runs
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    STARTUP.clear()
    try:
        print(header, flush=True)
        with _as_in_a_new_process(torch_rng):
            try:
                rc = bnstudy_main(args)
            except SystemExit as stop:  # as the interpreter would exit
                rc = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            except KeyboardInterrupt:
                traceback.print_exc()
                rc = 128 + signal.SIGINT
            except BaseException:  # noqa: BLE001 (any failure is this run's, reported as rc 1)
                traceback.print_exc()
                rc = 1
        return rc, dict(STARTUP)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(between, 1)
        os.dup2(between, 2)
        os.close(between)


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def worker_main() -> int:
    """A worker process (started by Worker): reads runs as JSON lines on stdin, runs each with
    _fit_here, answers each with a JSON line on its original stdout. Its stderr (and stdout
    between runs) is the plan's logs/workers.log."""
    control = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # a stray print between runs must not reach the driver's pipe
    faulthandler.enable()  # a segfault prints its traceback into the log of the run it hit
    import torch

    import bnstudy.cli  # noqa: F401
    import bnstudy.lightning_cli  # noqa: F401  (the import every `fit` process pays)

    torch_rng = torch.get_rng_state()  # a new process's default generator, before any run
    control.write(json.dumps({"ready_cpu_s": _round(_cpu_s())}) + "\n")
    for line in sys.stdin:
        task = json.loads(line)
        cpu, start = _cpu_s(), time.perf_counter()
        rc, startup = _fit_here(task["args"], task["log"], task["header"], torch_rng)
        wall = time.perf_counter() - start
        with open(task["log"], "a") as f:
            f.write(f"bnstudy reproduce: exit code {rc} after {wall:.1f} s\n")
        control.write(json.dumps({
            "rc": rc, "wall_s": round(wall, 1), "cpu_s": round(_cpu_s() - cpu, 1),
            "cpu_total_s": _cpu_s(), "startup_s": _round(startup.get("fit_s")),
            "startup_cpu_s": _round(startup.get("fit_cpu_s"))}) + "\n")
    return 0


class Worker:
    """A worker process (worker_main) and the pipes to it. A worker belongs to one thread of
    run_all, which hands it one run at a time."""

    def __init__(self, out: Path, threads: int):
        started = time.perf_counter()
        with open(out / "logs" / "workers.log", "a") as log:
            code = f"import sys; from {__name__} import worker_main; sys.exit(worker_main())"
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log,
                                         env=child_env(threads), text=True)
        LIVE.add(self)
        self.runs, self.cpu_s = 0, 0.0  # runs handed to it; its CPU time at its last answer
        self.exit_code: int | None = None
        self.lost_cpu_s = 0.0  # CPU time of a run it died in
        ready = self._answer() or {}
        self.ready_s = _round(time.perf_counter() - started) if ready else None
        self.ready_cpu_s = ready.get("ready_cpu_s")  # its imports, paid once for all its runs
        if not ready:
            self.lost_cpu_s = self._reap()

    def _answer(self) -> dict | None:
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def run(self, args: list[str], log: Path, header: str) -> dict | None:
        """The worker's answer for this run, or None when it died (exit_code says how)."""
        self.runs += 1
        if self.exit_code is not None:  # it died before it was ready
            return None
        try:
            self.proc.stdin.write(json.dumps({"args": args, "log": str(log),
                                              "header": header}) + "\n")
            self.proc.stdin.flush()
            answer = self._answer()
        except (BrokenPipeError, OSError):
            answer = None
        if answer is None:
            self.lost_cpu_s = self._reap()
            return None
        self.cpu_s = answer.pop("cpu_total_s")
        return answer

    def _reap(self) -> float:
        """Wait for the dead worker; its exit code, and the CPU time it used after its last
        answer (wait4: its own rusage, which Popen.wait would discard)."""
        try:
            _, status, usage = os.wait4(self.proc.pid, 0)
            self.proc.returncode = self.exit_code = os.waitstatus_to_exitcode(status)
            return max(0.0, usage.ru_utime + usage.ru_stime - self.cpu_s)
        except ChildProcessError:  # reaped already
            self.exit_code = self.proc.returncode
            return 0.0
        finally:
            LIVE.discard(self)

    def close(self, timeout: float = 60.0) -> None:
        """End the worker: no more runs (it exits at the end of its input), killed if it hangs."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        LIVE.discard(self)


LIVE: set[Worker] = set()  # workers alive, stopped by stop_workers
STOPPING = threading.Event()  # set on SIGTERM/SIGINT: no new run starts
STOP_SIGNAL: list[int] = []  # the signals the driver got


def stop_workers(grace_s: float = 60.0) -> None:
    """Ask every worker's run in progress to stop (SIGTERM: it stops at the end of its step with
    a checkpoint, and the next invocation resumes it); kill the workers still there after
    `grace_s`. A run that got the signal itself (a kill of the process group, Ctrl-C) stops the
    same way: a second SIGTERM changes nothing."""
    STOPPING.set()
    for worker in list(LIVE):
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    while LIVE and time.time() < deadline:
        time.sleep(0.1)
    for worker in list(LIVE):
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()


def _on_stop_signal(signum, frame) -> None:
    STOP_SIGNAL.append(signum)
    if STOPPING.is_set():  # asked twice: do not wait for the runs' steps
        for worker in list(LIVE):
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
    STOPPING.set()


def run_one(run: PlannedRun, out: Path, steps_scale: float, worker: Worker) -> dict:
    run_dir = out / "runs" / run.name
    if (run_dir / "done.json").exists():  # finished at another step count: kept, set aside
        old = json.loads((run_dir / "done.json").read_text()).get("steps", "other")
        run_dir.rename(run_dir.with_name(f"{run.name}.{old}-steps"))
    run_dir.mkdir(parents=True, exist_ok=True)
    log = out / "logs" / f"{run.name}.log"
    args = run.fit_args(run_dir, steps_scale)
    command = " ".join(["python", "-m", "bnstudy", *args])
    result = {"name": run.name, "command": command, "log": str(log),
              "steps": max(2, round(run.steps * steps_scale)), "worker": worker.proc.pid,
              "worker_run": worker.runs + 1}
    start = time.perf_counter()
    answer = worker.run(args, log, f"bnstudy reproduce: worker pid {worker.proc.pid}, its run "
                                   f"{worker.runs + 1}:\n$ {command}")
    if answer is None:  # the worker died in this run
        code, cpu = worker.exit_code, worker.lost_cpu_s
        why = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exit code {code}") + (": out of memory?" if code == -signal.SIGKILL else "")
        with open(log, "a") as f:
            f.write(f"bnstudy reproduce: the worker process running this run died ({why})\n")
        answer = {"rc": code if code is not None else 1,
                  "wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(cpu, 1),
                  "startup_s": None, "startup_cpu_s": None}
    result.update(answer)
    if result["rc"] == 0:
        (run_dir / "done.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def finished(done: Path, steps: int) -> bool:
    """The run finished with this many steps (done.json of a run with another --steps-scale, e.g.
    a smoke test into the same --out, does not count). Runs recorded before the step count was
    kept count as finished."""
    if not done.exists():
        return False
    return json.loads(done.read_text()).get("steps", steps) == steps


def run_all(runs: list[PlannedRun], out: Path, steps_scale: float, jobs: int, threads: int,
            runs_per_worker: int = 0) -> tuple[list[dict], list[dict]]:
    """Run `runs` in `jobs` worker processes; returns the runs' results (those skipped as
    finished included) and the workers' start-up times. Stops early when STOPPING is set."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    results, todo = [], []
    for run in runs:
        done = out / "runs" / run.name / "done.json"
        if finished(done, max(2, round(run.steps * steps_scale))):
            results.append({**json.loads(done.read_text()), "skipped": True})
        else:
            todo.append(run)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    workers: list[dict] = []
    with Progress(*columns, refresh_per_second=2) as progress:
        for r in results:
            progress.console.print(f"[dim]skipped {r['name']} (finished earlier: "
                                   f"{result_line(out / 'runs' / r['name'])})[/dim]")
        overall = progress.add_task("runs", total=len(runs), completed=len(results))
        active: dict[str, tuple[int, Path, int]] = {}
        queue, lock = list(todo), threading.Lock()

        def next_run() -> PlannedRun | None:
            with lock:
                return queue.pop(0) if queue and not STOPPING.is_set() else None

        def start(run: PlannedRun, worker: Worker) -> dict:
            done = out / "runs" / run.name / "done.json"
            if finished(done, max(2, round(run.steps * steps_scale))):  # finished meanwhile by another invocation (e.g. an --only one)
                progress.console.print(f"[dim]skipped {run.name} (finished meanwhile)[/dim]")
                progress.advance(overall)
                return {**json.loads(done.read_text()), "skipped": True}
            steps = max(2, round(run.steps * steps_scale))
            task = progress.add_task(f"  {run.name}", total=steps)
            active[run.name] = (task, out / "runs" / run.name, steps)
            result = run_one(run, out, steps_scale, worker)
            del active[run.name]
            progress.remove_task(task)
            if result["rc"] == 0:
                status = result_line(out / "runs" / run.name)
            elif STOPPING.is_set():
                status = "stopped, resumes when you run this again"
            else:
                status = f"[red]FAILED rc={result['rc']}, see {result['log']}[/red]"
            progress.console.print(f"{'done' if result['rc'] == 0 else 'fail'} {run.name} "
                                   f"{result['wall_s']:.0f} s: {status}")
            progress.advance(overall)
            return result

        def serve() -> list[dict]:
            """One worker's share: runs from the queue until it is empty. A worker whose run
            failed (or that ran runs_per_worker runs) is ended; the next run gets a new one."""
            mine, worker = [], None
            try:
                while (run := next_run()) is not None:
                    if worker is None:
                        worker = Worker(out, threads)
                        workers.append({"pid": worker.proc.pid, "ready_s": worker.ready_s,
                                        "ready_cpu_s": worker.ready_cpu_s})
                    result = start(run, worker)
                    mine.append(result)
                    if result.get("skipped"):
                        continue
                    if (worker.exit_code is not None or result["rc"] != 0
                            or worker.runs == runs_per_worker):
                        worker.close()
                        worker = None
            finally:
                if worker is not None:
                    worker.close()
            return mine

        pool = ThreadPoolExecutor(max_workers=jobs)
        futures = [pool.submit(serve) for _ in range(min(jobs, len(todo)))]
        while not all(f.done() for f in futures):
            for task, run_dir, steps in list(active.values()):
                progress.update(task, completed=min(current_step(run_dir), steps))
            if STOPPING.wait(1.0):
                progress.console.print(
                    f"stopping ({signal.Signals(STOP_SIGNAL[0]).name}): the runs in progress "
                    "stop at the end of a step with a checkpoint; finished runs are kept, and "
                    "the rest resumes when you run this again")
                stop_workers()
                break
        pool.shutdown()
        for f in futures:
            results += f.result()
    return results, workers


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
    parser.add_argument("--seeds", type=int, default=SEEDS,
                        help=f"seeds of every arm (default {SEEDS}; runs <arm>_s0, _s1, ...)")
    parser.add_argument("--only", default="",
                        help="comma-separated run or arm names or globs (e.g. "
                             "'dln_*,vgg_bn_lr0.1', 'vgg_lr0.1_s0')")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at a time (default 2): worker processes, each started once, "
                             "that run their runs one after another")
    parser.add_argument("--runs-per-worker", type=int, default=0, metavar="N",
                        help="end a worker after N runs, a new one takes the next (default 0: "
                             "no limit; 1: a new process for every run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: two 1-thread runs use 2 cores "
                             "better than one 2-thread run on these small models)")
    parser.add_argument("--no-report", action="store_true", help="only run, do not draw")
    parser.add_argument("--docs", type=Path, default=None,
                        help="also copy the figures (shrunk) and summary.md here, e.g. "
                             "docs/results for docs/RESULTS.md")
    parser.add_argument("--dry-run", action="store_true", help="print the fit commands and stop")
    args = parser.parse_args(argv)
    if args.steps_scale <= 0 or args.jobs < 1 or args.threads < 1 or args.runs_per_worker < 0 \
            or args.seeds < 1:
        parser.error("--steps-scale must be > 0, --jobs, --threads and --seeds >= 1, "
                     "--runs-per-worker >= 0")
    runs = PLANS[args.plan](args.seeds)
    if args.only:
        patterns = [p.strip() for p in args.only.split(",") if p.strip()]
        runs = [r for r in runs if any(fnmatch.fnmatch(r.name, p) or fnmatch.fnmatch(r.arm, p)
                                       for p in patterns)]
        if not runs:
            parser.error(f"--only {args.only!r} matches no run of plan {args.plan}")
    if args.dry_run:
        for run in runs:
            fit = run.fit_args(args.out / "runs" / run.name, args.steps_scale)
            # configs/x.yaml when run from the repository
            fit = [a.replace(str(CONFIGS), os.path.relpath(CONFIGS)) for a in fit]
            print(f"# {run.name}: {run.claims}\npython -m bnstudy {' '.join(fit)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started, load = time.time(), os.getloadavg()
    for signum in (signal.SIGTERM, signal.SIGINT):  # `kill` and Ctrl-C stop the runs too
        signal.signal(signum, _on_stop_signal)
    results, workers = run_all(runs, args.out, args.steps_scale, args.jobs, args.threads,
                               args.runs_per_worker)
    if STOPPING.is_set():  # as `fit` does: the exit code of the signal
        return 128 + STOP_SIGNAL[0]
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
              "runs": {r["name"]: {k: r[k] for k in ("rc", "wall_s", "cpu_s", "startup_s",
                                                         "startup_cpu_s")
                                   if k in r} | {"skipped": bool(r.get("skipped"))}
                       for r in results},
              "workers": workers}
    # CPU time in the runs, and in the workers' start-ups (each paid once for all its runs)
    timing["cpu_s"] = round(sum(r.get("cpu_s", 0) for r in results if not r.get("skipped"))
                            + sum(w["ready_cpu_s"] or 0 for w in workers), 1)
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
