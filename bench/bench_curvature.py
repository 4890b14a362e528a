"""Cost of the curvature probe (top Hessian eigenvalue), in training steps, on CPU.

    python bench/bench_curvature.py            # VGG-16 w0.25 BN batch 128, DLN-25 +-BN (~5 min)
    python bench/bench_curvature.py --quick    # fewer steps and repeats (~1 min)

Per model: the median time of one training step (zero_grad, forward, backward, SGD step) and of
one Hessian-vector product (double backward through a graph built once per measurement; the
build is counted separately), interleaved over the repeats. Then a short SGD run measures
lambda_max every `--every` steps as the Curvature instrument does (Lanczos, relative residual
<= --tol, warm-started from the previous vector): the products each measurement spent. At each
measurement a cold power iteration (PyHessian: random start, stop when the estimate changes by
<= tol relative) runs on the same point, and both are compared with a tight reference (Lanczos,
tol 1e-6). Targets: warm lambda_max <= 10 products at steady state, one product <= 2.5 steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import functools
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bnstudy import probes  # noqa: E402
from bench_probes import PROBLEMS  # noqa: E402  (the same models and batches as the probes' bench)

print = functools.partial(print, flush=True)  # noqa: A001 (progress as it comes)
TARGETS = {"warm_hvps": 10, "hvp_steps": 2.5}


def costs(problem, repeats: int) -> dict[str, float]:
    """Median seconds of a training step, of building the double-backward graph, of one HVP."""
    model, loss_fn, x, y, lr = problem()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    v = probes._random_vector(params, gen)
    times = {"step": [], "graph": [], "hvp": []}
    for r in range(repeats + 1):
        started = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        step = time.perf_counter() - started
        with probes.measuring(model):
            started = time.perf_counter()
            hvp = probes._HVP(model, loss_fn, x, y, params, sync=False)
            graph = time.perf_counter() - started
            started = time.perf_counter()
            hvp(v)
            one = time.perf_counter() - started
            del hvp.grads
        if r:
            times["step"].append(step)
            times["graph"].append(graph)
            times["hvp"].append(one)
    return {k: statistics.median(t) for k, t in times.items()}


def steady_state(problem, steps: int, every: int, tol: float) -> list[dict]:
    """Train with SGD; every `every` steps, the warm-started lambda_max (as the instrument), the
    cold power iteration and a tight reference on the same point."""
    model, loss_fn, x, y, lr = problem()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    vectors, rows = None, []
    for t in range(steps + 1):
        if t % every == 0:
            started = time.perf_counter()
            warm = probes.hessian_eigs(model, loss_fn, x, y, tol=tol, init=vectors)
            warm_s = time.perf_counter() - started
            vectors = warm["vectors"]
            started = time.perf_counter()
            power = probes.hessian_eigs(model, loss_fn, x, y, tol=tol, method="power", seed=t,
                                        max_iter=100)
            power_s = time.perf_counter() - started
            ref = probes.hessian_eigs(model, loss_fn, x, y, tol=1e-6, max_iter=150, seed=t)
            lam = ref["eigenvalues"][0]
            rows.append({"step": t, "lambda": lam, "warm_hvps": warm["hvps"], "warm_s": warm_s,
                         "warm_err": abs(warm["eigenvalues"][0] - lam) / abs(lam),
                         "power_hvps": power["hvps"], "power_s": power_s,
                         "power_err": abs(power["eigenvalues"][0] - lam) / abs(lam)})
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--vgg-steps", type=int, default=40)
    parser.add_argument("--vgg-every", type=int, default=10)
    parser.add_argument("--dln-steps", type=int, default=1000)
    parser.add_argument("--dln-every", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--models", nargs="+", choices=["vgg", "dln", "dln_bn"],
                        default=["vgg", "dln", "dln_bn"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.vgg_steps, args.dln_steps = 2, 20, 300
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tol {args.tol}")
    ok = True
    for key, (name, problem) in zip(("vgg", "dln", "dln_bn"), PROBLEMS.items()):
        if key not in args.models:
            continue
        c = costs(problem, args.repeats)
        vgg = name.startswith("VGG")
        rows = steady_state(problem, args.vgg_steps if vgg else args.dln_steps,
                            args.vgg_every if vgg else args.dln_every, args.tol)
        later = rows[1:]  # warm-started measurements
        warm = statistics.median(r["warm_hvps"] for r in later)
        power = statistics.median(r["power_hvps"] for r in later)
        per_hvp = c["hvp"] / c["step"]
        per_hvp_all = statistics.median(r["warm_s"] / r["warm_hvps"] for r in later) / c["step"]
        print(f"\n{name}: step {c['step'] * 1e3:.1f} ms, graph build {c['graph'] / c['step']:.2f}"
              f" steps, one HVP {per_hvp:.2f} steps ({per_hvp_all:.2f} with the build shared)")
        print("  step   lambda_max   warm: hvps  rel.err   time      power: hvps  rel.err   time")
        for r in rows:
            print(f"  {r['step']:5d}  {r['lambda']:11.5g}   {r['warm_hvps']:10d}  "
                  f"{r['warm_err']:.1e}  {r['warm_s']:6.2f}s   {r['power_hvps']:11d}  "
                  f"{r['power_err']:.1e}  {r['power_s']:6.2f}s")
        print(f"  steady state (median after the first): warm Lanczos {warm:.0f} HVPs "
              f"(target <= {TARGETS['warm_hvps']}), cold power iteration {power:.0f} HVPs; "
              f"one HVP = {per_hvp:.2f} training steps (target <= {TARGETS['hvp_steps']})")
        ok &= warm <= TARGETS["warm_hvps"] and per_hvp <= TARGETS["hvp_steps"]
    print("\nall targets met" if ok else "\nsome targets missed (contended machine?)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
