"""`fit` as a user runs it against a plain 1-thread loop on the CPU, on the two overhead-bound
cases, on an idle machine and beside a process that keeps one core busy.

    .venv/bin/python bench/bench_overhead.py                 # both cases, idle and busy (~8 min)
    .venv/bin/python bench/bench_overhead.py --repo ../old-checkout  # the same, another checkout's code

Cases (instruments off, validation off; everything else as the config has it: the W&B logger
(offline) and the CSV logger, the progress bar, LR and throughput monitors, checkpoints):
  dln  configs/dln_bn.yaml: DLN 25 x 10 + BN, full batch 1000
  vgg  configs/quickstart.yaml: VGG-11 width 0.25 + BN on the 8x8 digits, batch 64
`fit` runs as `python -m bnstudy fit --config ...` with the environment's thread settings
(OMP_NUM_THREADS removed: the user's default); the plain loop is the same model, loss, data and
SGD in a bare loop on one thread, timed inside its process after 20 warm-up steps. `fit` is timed
at two run lengths, N and 2N steps, as whole processes: the difference over N is the cost of a
step, with start-up, data loading and W&B's start and finish cancelled. "busy": a `while True` process pinned to CPU 0 runs meanwhile.
Ratio = fit steps/s / plain steps/s (targets busy: dln >= 0.5, vgg >= 0.7).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "dln": {"config": "dln_bn.yaml", "steps": 2000},
    "vgg": {"config": "quickstart.yaml", "steps": 600},
}
TARGETS = {"dln": 0.5, "vgg": 0.7}
COUNTER = iter(range(10**6))  # a fresh run directory for every process

PLAIN = r"""
import sys, time, torch
torch.set_num_threads(1)
from bnstudy.cli import cli_main
steps = int(sys.argv[2])
# the config's own model and data, built by the CLI, then trained in a bare loop
cli = cli_main(["--config", sys.argv[1], "--trainer.logger=false", "--trainer.callbacks=[]",
                "--run_dir=" + sys.argv[3]], run=False)
model, data = cli.model, cli.datamodule
data.trainer = None
if hasattr(data, "setup"):
    data.setup("fit")
net, loss_fn = model.net, model.loss_fn
net.train()
opt = torch.optim.SGD(net.parameters(), lr=model.lr)
done, warmup = 0, 20
while done < steps + warmup:
    for x, y in data.train_dataloader():
        if done == warmup:
            start = time.perf_counter()
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
        if done == steps + warmup:
            break
print("seconds_per_step", (time.perf_counter() - start) / steps, "loss", float(loss))
"""


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench_overhead: command failed ({proc.returncode}): {' '.join(cmd)}\n"
                 + proc.stderr[-3000:])
    return elapsed, proc.stdout


def per_step(make_cmd, n: int, cwd: Path, env: dict) -> float:
    """Seconds per step from whole-process wall times at N and 2N steps."""
    t1, _ = run(make_cmd(n), cwd, env)
    t2, _ = run(make_cmd(2 * n), cwd, env)
    if t2 <= t1:  # start-up noise larger than N steps: too short a run for this machine's load
        print(f"  (2N-step run not slower than the N-step one: {t2:.1f} s vs {t1:.1f} s; "
              "use a larger --scale)", flush=True)
        return float("nan")
    return (t2 - t1) / n


def measure(case: str, repo: Path, scale: float, tmp: Path) -> tuple[float, float]:
    config = str(repo / "configs" / CASES[case]["config"])
    n = max(2, int(CASES[case]["steps"] * scale))
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BNSTUDY_RUN_DIR")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(repo))
    def fit_cmd(steps: int) -> list[str]:
        return [sys.executable, "-m", "bnstudy", "fit", "--config", config,
                f"--trainer.max_steps={steps}", "--trainer.callbacks=[]",
                "--trainer.limit_val_batches=0", f"--run_dir={tmp / f'fit{next(COUNTER)}'}"]

    fit = per_step(fit_cmd, n, repo, env)
    _, out = run([sys.executable, "-c", PLAIN, config, str(n), str(tmp / f"p{next(COUNTER)}")],
                 repo, env)
    plain = float(out.split("seconds_per_step")[1].split()[0])
    return fit, plain


def burner() -> subprocess.Popen:
    """A process that keeps CPU 0 busy (as another job on a shared node would)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {0}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="checkout whose bnstudy and configs to run (default: this one)")
    parser.add_argument("--cases", default="dln,vgg")
    parser.add_argument("--loads", default="idle,busy")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the run lengths")
    args = parser.parse_args()
    cases = args.cases.split(",")
    loads = args.loads.split(",")
    print(f"bench_overhead: {args.repo}, {len(os.sched_getaffinity(0))} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for load in loads:
            hot = burner() if load == "busy" else None
            try:
                for case in cases:
                    fit, plain = measure(case, args.repo.resolve(), args.scale, Path(tmp))
                    rows.append((case, load, plain, fit))
                    print(f"  {case} {load}: plain {plain * 1e3:.2f} ms/step, fit "
                          f"{fit * 1e3:.2f} ms/step, ratio {plain / fit:.2f}", flush=True)
            finally:
                if hot is not None:
                    hot.kill()
                    hot.wait()
    print("\n| case | load | plain loop, 1 thread (ms/step) | fit (ms/step) | fit/plain speed |"
          "\n|---|---|---|---|---|")
    for case, load, plain, fit in rows:
        target = f" (target >= {TARGETS[case]})" if load == "busy" else ""
        print(f"| {case} | {load} | {plain * 1e3:.2f} | {fit * 1e3:.2f} | "
              f"{plain / fit:.2f}{target} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
