"""How to spend 2 CPU cores on the mini reproduction: per-step cost of its two networks at 1 and 2
threads, and two 1-thread processes side by side against one 2-thread process.

    python bench/bench_mini.py            # about 2 minutes on an idle 2-core machine

Networks as `python -m bnstudy reproduce mini` trains them: VGG-16 at width 0.125 on 32x32x3
inputs, batch 64, with and without BN; the 25-layer 10x10 DLN on its full batch of 1,000, with
and without BN. A step is zero_grad, forward, backward and an SGD step (no Lightning, no probes:
the driver's timing.json has the real runs' wall and CPU times). Reported: milliseconds per step
(median of the repeats), wall time and CPU time, and the throughput of 2 x 1 thread / 1 x 2
threads (above 1: run two 1-thread runs at a time, the driver's default `--jobs 2 --threads 1`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def step_costs(kind: str, steps: int, repeats: int) -> dict:
    from bnstudy.models import VGG, DeepLinear, init_weights

    torch.manual_seed(0)
    if kind.startswith("vgg"):
        net = VGG(16, 0.125, "batch" if kind == "vgg_bn" else "none")
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        loss_fn = torch.nn.functional.cross_entropy
    else:
        net = DeepLinear(25, 10, "batch" if kind == "dln_bn" else "none")
        x, y = torch.randn(1000, 10), torch.randn(1000, 10)
        loss_fn = lambda out, t: (out - t).pow(2).sum()
    init_weights(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3 if kind.startswith("vgg") else 1e-7)

    def step():
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        walls.append((time.perf_counter() - w) / steps * 1e3)
        cpus.append((time.process_time() - c) / steps * 1e3)
    return {"wall_ms": statistics.median(walls), "cpu_ms": statistics.median(cpus)}


def child(kind: str, threads: int, steps: int, repeats: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    code = (f"import json, sys; sys.path.insert(0, {os.getcwd()!r}); from bench.bench_mini import "
            f"step_costs; print(json.dumps(step_costs({kind!r}, {steps}, {repeats})))")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    steps = {"vgg_bn": 10, "vgg": 10, "dln_bn": 200, "dln": 200}
    print(f"{'network':8} {'threads':>7} {'alone ms/step':>14} {'cpu ms/step':>12} "
          f"{'2 at once ms/step':>18} {'2x1 / 1x2 throughput':>21}")
    for kind, n in steps.items():
        alone = {}
        for threads in (1, 2):
            proc = child(kind, threads, n, args.repeats)
            alone[threads] = json.loads(proc.communicate()[0])
        pair = [child(kind, 1, n, args.repeats) for _ in range(2)]
        both = [json.loads(p.communicate()[0]) for p in pair]
        pair_ms = statistics.mean(b["wall_ms"] for b in both)
        # two 1-thread runs finish 2 steps in pair_ms; one 2-thread run, 1 step in alone[2]
        ratio = 2 * alone[2]["wall_ms"] / pair_ms
        for threads in (1, 2):
            extra = (f"{pair_ms:18.1f} {ratio:21.2f}" if threads == 1 else "")
            print(f"{kind:8} {threads:7d} {alone[threads]['wall_ms']:14.1f} "
                  f"{alone[threads]['cpu_ms']:12.1f} {extra}")


if __name__ == "__main__":
    main()
