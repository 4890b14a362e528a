"""Cost of the curvature probe (top Hessian eigenvalue), in training steps, on CPU.

    python bench/bench_curvature.py --threads 1    # VGG-16 w0.25 BN, DLN-25 +-BN (~15 min)
    python bench/bench_curvature.py --quick        # shorter windows, fewer repeats (~7 min)

Per model: the median time of one training step (zero_grad, forward, backward, SGD step) and of
one Hessian-vector product (double backward through a graph built once per measurement; the
build is counted separately), interleaved over the repeats, on a fixed batch.

Then the steady state: train past the first transient (`--*-burn` steps), then measure lambda_max
every `--*-every` steps as the Curvature instrument does (Lanczos, relative residual <= --tol,
warm-started from the previous measurement's vector) and count the products each measurement
spent. The DLN trains full-batch at lr 1e-6 (the paper's setting). VGG trains with SGD at lr 0.1
on minibatches of 128 CIFAR-shaped digits (32x32x3; a fixed random batch would be memorized in a
few dozen steps and its Hessian would vanish), where the instrument measures on the step's batch
(the default) or, with fixed_batch=True, always on the first measured batch. At each measurement
a cold power iteration (PyHessian: random start, stop when the estimate changes by <= tol
relative) runs on the same point, and everything is compared with a tight reference (Lanczos,
tol 1e-6). Targets: warm lambda_max <= 10 products at steady state, one product <= 2.5 steps.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bnstudy import probes  # noqa: E402
from bnstudy.instruments.hvp import HVP  # noqa: E402
from bnstudy.instruments.vectors import random_vector  # noqa: E402
from bnstudy.data import DigitsData  # noqa: E402
from bench_probes import dln_problem, vgg_problem  # noqa: E402  (the probes' bench models)

print = functools.partial(print, flush=True)  # noqa: A001 (progress as it comes)
TARGETS = {"warm_hvps": 10, "hvp_steps": 2.5}


def costs(problem, repeats: int) -> dict[str, float]:
    """Median seconds of a training step, of building the double-backward graph, of one HVP."""
    model, loss_fn, x, y, lr = problem()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    v = random_vector(params, gen)
    times = {"step": [], "graph": [], "hvp": []}
    for r in range(repeats + 1):
        started = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        step = time.perf_counter() - started
        with probes.measuring(model):
            started = time.perf_counter()
            hvp = HVP(model, loss_fn, x, y, params, sync=False)
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


def dln_training(norm: str):
    """The DLN-25 of bench_probes, trained full-batch: every step sees the whole set."""
    model, loss_fn, x, y, lr = dln_problem(norm)()
    return model, loss_fn, itertools.repeat((x, y)), lr


def vgg_training():
    """The VGG-16 w0.25 + BN of bench_probes on 32x32x3 digits, batches of 128, reshuffled every
    epoch."""
    model, loss_fn, _, _, lr = vgg_problem()
    data = DigitsData(batch_size=128, image_size=32, channels=3)
    data.setup()
    loader = data.train_dataloader()
    return model, loss_fn, itertools.chain.from_iterable(itertools.repeat(loader)), lr


def timed(fn, *args, **kw) -> tuple[dict, float]:
    started = time.perf_counter()
    return fn(*args, **kw), time.perf_counter() - started


def steady_state(training, burn: int, steps: int, every: int, tol: float, fixed: bool
                 ) -> list[dict]:
    """Train with SGD; at steps burn, burn + every, ... <= steps: the warm-started lambda_max on
    the step's batch (as the instrument), with `fixed` also on the first measured batch, and the
    cold power iteration and a tight reference on the same points."""
    model, loss_fn, batches, lr = training
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    vectors, fixed_vectors, first, rows = None, None, None, []

    def reference(x, y, t) -> float:
        return probes.hessian_eigs(model, loss_fn, x, y, tol=1e-6, max_iter=150,
                                   seed=t)["eigenvalues"][0]

    def error(result: dict, lam: float) -> float:
        return abs(result["eigenvalues"][0] - lam) / abs(lam)

    for t in range(steps + 1):
        x, y = next(batches)
        if t >= burn and (t - burn) % every == 0:
            warm, warm_s = timed(probes.hessian_eigs, model, loss_fn, x, y, tol=tol, init=vectors)
            vectors = warm["vectors"]
            power, power_s = timed(probes.hessian_eigs, model, loss_fn, x, y, tol=tol,
                                   method="power", seed=t, max_iter=100)
            lam = reference(x, y, t)
            row = {"step": t, "lambda_": lam, "warm_hvps": warm["hvps"], "warm_s": warm_s,
                   "warm_err": error(warm, lam), "power_hvps": power["hvps"],
                   "power_s": power_s, "power_err": error(power, lam)}
            if fixed:
                first = first or (x, y)
                warm = probes.hessian_eigs(model, loss_fn, *first, tol=tol, init=fixed_vectors)
                fixed_vectors = warm["vectors"]
                lam = reference(*first, t)
                row.update(fixed_lambda=lam, fixed_hvps=warm["hvps"], fixed_err=error(warm, lam))
            rows.append(row)
            print(f"  step {t}: lambda_max {row['lambda_']:.5g}, warm {row['warm_hvps']} products"
                  + (f", fixed batch {row['fixed_hvps']}" if fixed else ""))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return rows


MODELS = {  # key: (name, cost problem, steady-state training)
    "vgg": ("VGG-16 w0.25 BN, batch 128", vgg_problem, vgg_training),
    "dln": ("DLN-25, batch 1000", dln_problem("none"), lambda: dln_training("none")),
    "dln_bn": ("DLN-25 + BN, batch 1000", dln_problem("batch"), lambda: dln_training("batch")),
}


def verdict(value: float, target: float) -> str:
    return f"(target <= {target}: {'met' if value <= target else 'MISSED'})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--vgg-burn", type=int, default=300, help="steps before measuring")
    parser.add_argument("--vgg-steps", type=int, default=600)
    parser.add_argument("--vgg-every", type=int, default=50)
    parser.add_argument("--dln-burn", type=int, default=1000)
    parser.add_argument("--dln-steps", type=int, default=3000)
    parser.add_argument("--dln-every", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer repeats")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.vgg_burn, args.vgg_steps = 2, 150, 300
        args.dln_burn, args.dln_steps = 1000, 2000
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tol {args.tol}")
    ok = True
    for key in args.models:
        name, problem, training = MODELS[key]
        vgg = key == "vgg"
        c = costs(problem, args.repeats)
        per_hvp = c["hvp"] / c["step"]
        print(f"\n{name}: step {c['step'] * 1e3:.1f} ms, graph build {c['graph'] / c['step']:.2f}"
              f" steps, one HVP {per_hvp:.2f} steps {verdict(per_hvp, TARGETS['hvp_steps'])}")
        burn, steps, every = ((args.vgg_burn, args.vgg_steps, args.vgg_every) if vgg
                              else (args.dln_burn, args.dln_steps, args.dln_every))
        print(f"  training {steps} steps, measuring every {every} from step {burn}")
        rows = steady_state(training(), burn, steps, every, args.tol, fixed=vgg)
        print("  step   lambda_max   warm: hvps  rel.err   time      power: hvps  rel.err   time"
              + ("   fixed batch: lambda_max  hvps  rel.err" if vgg else ""))
        for r in rows:
            print(f"  {r['step']:5d}  {r['lambda_']:11.5g}   {r['warm_hvps']:10d}  "
                  f"{r['warm_err']:.1e}  {r['warm_s']:6.2f}s   {r['power_hvps']:11d}  "
                  f"{r['power_err']:.1e}  {r['power_s']:6.2f}s"
                  + (f"   {r['fixed_lambda']:23.5g}  {r['fixed_hvps']:4d}  {r['fixed_err']:.1e}"
                     if vgg else ""))
        later = rows[1:]  # warm-started measurements (the first one starts cold)
        med = lambda k: statistics.median(r[k] for r in later)  # noqa: E731
        worst = lambda k: max(r[k] for r in rows)  # noqa: E731
        per_hvp_all = statistics.median(r["warm_s"] / r["warm_hvps"] for r in later) / c["step"]
        print(f"  steady state, median over the warm-started measurements:")
        print(f"    warm Lanczos on the step's batch: {med('warm_hvps'):.1f} products "
              f"{verdict(med('warm_hvps'), TARGETS['warm_hvps'])}, largest error "
              f"{worst('warm_err'):.1e}; {per_hvp_all:.2f} steps per product with the build")
        if vgg:
            print(f"    warm Lanczos on a fixed batch: {med('fixed_hvps'):.1f} products "
                  f"{verdict(med('fixed_hvps'), TARGETS['warm_hvps'])}, largest error "
                  f"{worst('fixed_err'):.1e}")
        print(f"    cold power iteration (PyHessian): {med('power_hvps'):.1f} products, largest "
              f"error {worst('power_err'):.1e}")
        ok &= per_hvp <= TARGETS["hvp_steps"] and med("warm_hvps") <= TARGETS["warm_hvps"]
    print("\nall targets met" if ok else "\nsome targets missed (see above; contended machine?)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
