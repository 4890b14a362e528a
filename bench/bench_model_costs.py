"""The model's own costs on the CPU, this checkout against another one (an earlier commit): a plain
training step of the 25-layer DLN with each norm, and one Curvature measurement (hessian_eigs:
the top eigenvalue by Lanczos to a relative residual of 1e-3, from a random start) on the DLN and
on the mini VGG-11 + BN of `reproduce mini`. What neither the fit loop nor start-up touches:
the norms' arithmetic, the Hessian-vector products and Lanczos' own vector work.

    .venv/bin/python bench/bench_model_costs.py --repo /tmp/old        # about 5 minutes
    .venv/bin/python bench/bench_model_costs.py --quick                # this checkout, a check

Each checkout runs in its own processes (one thread), the checkouts alternating, --repeats
times; printed: the median per checkout and the median of the per-repeat ratios old / this
(> 1: this checkout is faster), with their range. The products counted by each Lanczos and the
eigenvalue it found are printed too: the same numbers mean the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "BENCH_RESULT "
NORMS = ["none", "batch", "noisy_batch", "l1", "l2", "linf"]
CURVATURE = ["dln", "dln_l1", "dln_batch", "vgg11_bn"]

# run in a child process with the checkout's code first on sys.path
CHILD = r"""
import json, sys, time
repo, steps, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
NORMS, CURVATURE = json.loads(sys.argv[4]), json.loads(sys.argv[5])
sys.path.insert(0, repo)
import torch
torch.set_num_threads(1)
from bnstudy.models import VGG, DeepLinear
from bnstudy.instruments.curvature import hessian_eigs
from bnstudy.norms import resample_noise
out = {}
gen = torch.Generator().manual_seed(0)
x = torch.randn(1000, 10, generator=gen)
y = x @ torch.randn(10, 10, generator=gen)
sse = lambda o, t: ((o - t) ** 2).sum()
for norm in NORMS:
    torch.manual_seed(0)
    net = DeepLinear(25, 10, norm).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)
    for i in range(steps + 10):  # 10 warm-up steps
        if i == 10:
            began = time.perf_counter()
        resample_noise(net)  # noisy BN: new noise every step, as the fit draws it
        loss = sse(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out["step " + norm] = {"value": (time.perf_counter() - began) / steps}
for case in CURVATURE:
    torch.manual_seed(0)
    if case == "vgg11_bn":
        net = VGG(depth=11, width=0.125, norm="batch", num_classes=10).train()
        inputs = torch.randn(128, 3, 32, 32, generator=gen)
        targets = torch.randint(0, 10, (128,), generator=gen)
        loss_fn = torch.nn.functional.cross_entropy
    else:
        net = DeepLinear(25, 10, case.partition("_")[2] or "none").train()
        inputs, targets, loss_fn = x, y, sse
    hessian_eigs(net, loss_fn, inputs, targets, tol=1e-3, max_iter=50)  # warm-up
    times = []
    for rep in range(reps):
        began = time.perf_counter()
        r = hessian_eigs(net, loss_fn, inputs, targets, tol=1e-3, max_iter=50, seed=rep)
        times.append(time.perf_counter() - began)
    out["curvature " + case] = {"value": min(times), "hvps": r["hvps"],
                                "lambda": r["eigenvalues"][0]}
print("BENCH_RESULT " + json.dumps(out), flush=True)
"""


def child(repo: Path, steps: int, reps: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(repo), str(steps), str(reps),
                           json.dumps(NORMS), json.dumps(CURVATURE)],
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise SystemExit(f"bench_model_costs: the child for {repo} failed:\n{proc.stderr[-3000:]}")


def table(results: dict[str, list[dict]]) -> str:
    names = list(results)
    keys = list(results[names[0]][0])
    head = ["", *(f"{n} (median)" for n in names)]
    if len(names) == 2:
        head.append(f"{names[1]} / {names[0]} (median [range]; > 1: {names[0]} faster)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        unit, scale = ("ms", 1e3) if key.startswith("step") else ("s", 1.0)
        cells = [key]
        for n in names:
            med = statistics.median(r[key]["value"] for r in results[n]) * scale
            extra = results[n][-1][key]
            note = f" ({extra['hvps']} products, lambda {extra['lambda']:.6g})" if "hvps" in extra \
                else ""
            cells.append(f"{med:.3f} {unit}{note}")
        if len(names) == 2:
            ratios = [o[key]["value"] / t[key]["value"]
                      for t, o in zip(results[names[0]], results[names[1]])]
            cells.append(f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=None, help="the other checkout")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="timed DLN steps per norm")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 20 steps")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 20
    repos = {"this": REPO} | ({"old": args.repo.resolve()} if args.repo else {})
    results: dict[str, list[dict]] = {name: [] for name in repos}
    for i in range(args.repeats):
        for name, repo in repos.items():
            results[name].append(child(repo, args.steps, 1 if args.quick else 3))
            print(f"  {name} repeat {i + 1}/{args.repeats} done", flush=True)
    print(", ".join(f"{n}: {r}" for n, r in repos.items()))
    print(table(results))


if __name__ == "__main__":
    main()
