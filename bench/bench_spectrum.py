"""Cost of the Hessian spectrum (one density) and of one loss surface, against the methods of
PyHessian and loss-landscape re-implemented here on the same train-mode loss, on CPU.

    python bench/bench_spectrum.py --threads 1          # all four models (~40 min on 2 cores)
    python bench/bench_spectrum.py --quick --threads 1  # fewer steps and points (~8 min)

Models: VGG-16 and VGG-11 at width 1/8 with BN on 32x32x3 digit batches of 128 (after
--vgg-steps steps of SGD at lr 0.1, so the spectrum is a trained network's), the DLN 25 x 10
without and with BN, full batch 1000 (after --dln-steps steps of GD at lr 1e-6).

Density, per model, all from the same Rademacher vectors (one private generator):
  ours         bnstudy.instruments.hessian_density, n_v vectors x m Lanczos steps (defaults 10, 40)
  ours, tol    the same with the early stop tol=1e-3 (at most 100 steps)
  PyHessian    its `density` as written (iter=100 Lanczos iterations, one Gram-Schmidt pass,
               list-of-tensors arithmetic), with n_v = ours' (the same accuracy over vectors)
  PyHessian default: n_v=1 (its default), iter=100
The accuracy: L1 distance of the smoothed density (width 0.01 of the range, the same grid and
sigma for all) from the reference, and the largest relative error of the moments tr(H^k)/n,
k = 1..4. Reference: for the DLN the dense float64 Hessian (probes.hessian_dense: exact); for
VGG PyHessian's 100-step quadrature on the same vectors (so the L1 there is the quadrature error
alone; the error over vectors, which all methods with n_v vectors share, is printed beside it as
the L1 its standard errors predict).

Surface: a --grid x --grid loss surface along two filter-normalized random directions
(bnstudy.instruments.loss_surface) against loss-landscape's loop (per point `p.data = w + x dx +
y dy` for every parameter, then the loss), both in train mode on the same batch.

Peak memory: the rise of the process's peak resident set (VmHWM, reset before each method via
/proc/self/clear_refs, after malloc_trim) over its resident set before it. Times are one run of
each method, interleaved model by model, on a machine that may be shared: compare the ratios.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bnstudy import probes  # noqa: E402
from bnstudy.data import DigitsData  # noqa: E402
from bnstudy.instruments.hvp import HVP  # noqa: E402
from bnstudy.instruments.vectors import random_vector  # noqa: E402
from bnstudy.models import VGG, DeepLinear, init_weights  # noqa: E402
from bnstudy.instruments.spectrum import (default_grid, hessian_density, quadrature,  # noqa: E402
                                          smoothed_density)
from bnstudy.instruments.surface import filter_normalized_direction, loss_surface  # noqa: E402

print = functools.partial(print, flush=True)  # noqa: A001 (progress as it comes)


# ---- the problems ------------------------------------------------------------------------------
def vgg(depth: int, steps: int):
    torch.manual_seed(0)
    model = VGG(depth, 0.125, "batch")
    init_weights(model)
    data = DigitsData(batch_size=128, image_size=32, channels=3)
    data.setup()
    loader = data.train_dataloader()
    batches = iter(loader)
    x, y = next(batches)  # the batch measured: the first one
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(loader)
            xb, yb = next(batches)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model, F.cross_entropy, x, y


def dln(norm: str, steps: int):
    torch.manual_seed(0)
    model = DeepLinear(25, 10, norm)
    init_weights(model)
    x = torch.randn(1000, 10)
    y = x @ torch.randn(10, 10)
    loss_fn = lambda o, t: F.mse_loss(o, t, reduction="sum")  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model, loss_fn, x, y


MODELS = {  # key: (name, make(args))
    "vgg16": ("VGG-16 w1/8 BN, batch 128", lambda a: vgg(16, a.vgg_steps)),
    "vgg11": ("VGG-11 w1/8 BN, batch 128", lambda a: vgg(11, a.vgg_steps)),
    "dln": ("DLN-25, batch 1000", lambda a: dln("none", a.dln_steps)),
    "dln_bn": ("DLN-25 BN, batch 1000", lambda a: dln("batch", a.dln_steps)),
}


# ---- PyHessian's density, as its hessian.density() runs it, on the train-mode loss --------------
def group_product(xs, ys):
    return sum(torch.sum(x * y) for x, y in zip(xs, ys))


def group_add(params, update, alpha=1.0):
    return [p + u * alpha for p, u in zip(params, update)]


def normalization(v):
    s = math.sqrt(float(group_product(v, v)))
    return [vi / (s + 1e-6) for vi in v]


def orthnormal(w, v_list):
    for v in v_list:
        w = group_add(w, v, alpha=-group_product(w, v))
    return normalization(w)


def pyhessian_density(model, loss_fn, x, y, n_v: int, iters: int, seed: int):
    """PyHessian's SLQ (pyhessian/hessian.py, density()), with its HVPs through a graph built
    once, on the train-mode loss (PyHessian itself calls model.eval()), from the same Rademacher
    vectors as hessian_density with this seed. Returns per-vector (nodes, weights) and the
    products spent."""
    gen = torch.Generator().manual_seed(seed)
    runs = []
    with probes.measuring(model) as state:
        params = [p for p in state.params.values() if p.requires_grad]
        hvp = HVP(model, loss_fn, x, y, params, sync=False)
        for _ in range(n_v):
            v = normalization(random_vector(params, gen, rademacher=True))
            v_list, alphas, betas = [v], [], []
            w = None
            for i in range(iters):
                if i == 0:
                    w_prime = hvp(v)
                    alpha = group_product(w_prime, v)
                    alphas.append(float(alpha))
                    w = group_add(w_prime, v, alpha=-alpha)
                else:
                    beta = torch.sqrt(group_product(w, w))
                    betas.append(float(beta))
                    if betas[-1] != 0.0:
                        v = orthnormal(w, v_list)
                    else:
                        v = orthnormal([torch.randn(p.shape, generator=gen) for p in params],
                                       v_list)
                    v_list.append(v)
                    w_prime = hvp(v)
                    alpha = group_product(w_prime, v)
                    alphas.append(float(alpha))
                    w = group_add(group_add(w_prime, v, alpha=-alpha), v_list[-2], alpha=-beta)
            runs.append(quadrature(alphas, betas))
        del hvp.grads
    return runs, hvp.count


# ---- measuring ---------------------------------------------------------------------------------
def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))


def peak(fn):
    """fn()'s result, seconds, and the rise of peak resident memory it caused (MB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    started = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - started
    return out, seconds, (_status("VmHWM") - before) / 1024


def padded(runs):
    width = max(len(t) for t, _ in runs)
    nodes = np.full((len(runs), width), np.nan)
    weights = np.zeros_like(nodes)
    for i, (t, w) in enumerate(runs):
        nodes[i, :len(t)], weights[i, :len(w)] = t, w
    return nodes, weights


def moments(nodes, weights):
    powers = np.nan_to_num(nodes)[:, :, None] ** np.arange(1, 5)
    return np.einsum("rj,rjk->rk", weights, powers).mean(0)


def density_rows(key: str, args) -> list[dict]:
    name, make = MODELS[key]
    model, loss_fn, x, y = make(args)
    n = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {n} parameters")
    rows = []

    def ours(**kw):
        r = hessian_density(model, loss_fn, x, y, args.n_v, seed=args.seed, **kw)
        return padded([(t[np.isfinite(t)], w[np.isfinite(t)])
                       for t, w in zip(r["nodes"], r["weights"])]), r["hvps"], r

    def pyh(n_v):
        runs, count = pyhessian_density(model, loss_fn, x, y, n_v, 100, args.seed)
        return padded(runs), count, None

    methods = [("ours", functools.partial(ours, m=args.m)),
               ("ours, tol 1e-3", functools.partial(ours, m=100, tol=1e-3)),
               ("PyHessian", functools.partial(pyh, args.n_v)),
               ("PyHessian default (n_v=1)", functools.partial(pyh, 1))]
    for label, fn in methods:
        (quad, hvps, full), seconds, mem = peak(fn)
        rows.append({"method": label, "quad": quad, "hvps": hvps, "s": seconds, "mb": mem,
                     "full": full})
        print(f"  {label}: {hvps} products, {seconds:.1f} s, peak +{mem:.0f} MB")
    # the reference, the common grid and sigma
    if key.startswith("dln"):
        hess, _ = probes.hessian_dense(model, loss_fn, x, y)
        eig = torch.linalg.eigvalsh(hess).numpy()
        ref_quad = (eig[None], np.full((1, len(eig)), 1.0 / len(eig)))
        ref_name = "dense Hessian"
    else:
        ref_quad = rows[2]["quad"]
        ref_name = "PyHessian's 100 steps, same vectors"
    grid, sigma = default_grid(ref_quad[0], 0.01, 1024)
    ref_density = smoothed_density(*ref_quad, grid, sigma).mean(0)
    ref_moments = moments(*ref_quad)
    dx = grid[1] - grid[0]
    for r in rows:
        per_vector = smoothed_density(*r["quad"], grid, sigma)
        r["l1"] = float(np.abs(per_vector.mean(0) - ref_density).sum() * dx)
        r["moment_err"] = float(np.max(np.abs(moments(*r["quad"]) - ref_moments)
                                       / np.abs(ref_moments)))
        if len(per_vector) > 1:
            se = per_vector.std(0, ddof=1) / math.sqrt(len(per_vector))
            r["sampling_l1"] = float(math.sqrt(2 / math.pi) * se.sum() * dx)
        r["ref"] = ref_name
    return rows


def pyh_surface(model, loss_fn, x, y, dx, dy, coords):
    """loss-landscape's plot_surface loop: per point, every parameter's .data replaced by
    w + a dx + b dy (set_weights), then the loss (here in train mode on the batch)."""
    names = list(dx)
    loss = np.zeros((len(coords), len(coords)))
    with probes.measuring(model) as state:
        params = [state.params[n] for n in names]
        weights = [state.saved[n] for n in names]
        with torch.no_grad():
            for i, a in enumerate(coords):
                for j, b in enumerate(coords):
                    for p, w, d0, d1 in zip(params, weights, [dx[n] for n in names],
                                            [dy[n] for n in names]):
                        p.data = w + d0 * float(a) + d1 * float(b)
                    loss[i, j] = float(loss_fn(model(x), y))
            for p, w in zip(params, weights):
                p.data = w.clone()
    return loss


def surface_rows(key: str, args) -> list[dict]:
    name, make = MODELS[key]
    model, loss_fn, x, y = make(args)
    dx, dy = (filter_normalized_direction(model, s) for s in (0, 1))
    coords = np.linspace(-1, 1, args.grid)
    rows = []
    for label, fn in (("ours", lambda: loss_surface(model, loss_fn, x, y, [dx, dy],
                                                    [coords, coords])["loss"]),
                      ("loss-landscape", lambda: pyh_surface(model, loss_fn, x, y, dx, dy,
                                                             coords))):
        loss, seconds, mem = peak(fn)
        rows.append({"method": label, "points": args.grid ** 2, "s": seconds, "mb": mem,
                     "loss": loss})
        print(f"  surface {label}: {args.grid ** 2} points, {seconds:.1f} s, peak +{mem:.0f} MB")
    rows[1]["max_diff"] = float(np.max(np.abs(rows[0]["loss"] - rows[1]["loss"])
                                       / np.abs(rows[1]["loss"])))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--n-v", type=int, default=10)
    parser.add_argument("--m", type=int, default=40)
    parser.add_argument("--grid", type=int, default=21, help="surface points per axis")
    parser.add_argument("--vgg-steps", type=int, default=200)
    parser.add_argument("--dln-steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="n_v 4, grid 11, fewer steps")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n_v, args.grid, args.vgg_steps, args.dln_steps = 4, 11, 50, 200
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; n_v {args.n_v}, "
          f"m {args.m}, surface grid {args.grid}x{args.grid}")
    results = {}
    for key in args.models:
        results[key] = (density_rows(key, args), surface_rows(key, args))
    print("\nDensity (width 0.01 of the range; L1 between densities that integrate to 1; "
          "moment error: largest relative error of tr(H^k)/n, k=1..4)")
    print("| model | method | products | seconds | s/product | peak MB | L1 vs reference | "
          "L1 over vectors (predicted) | moment error | reference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, (rows, _) in results.items():
        for r in rows:
            sampling = f"{r['sampling_l1']:.3f}" if "sampling_l1" in r else "-"
            print(f"| {MODELS[key][0]} | {r['method']} | {r['hvps']} | {r['s']:.1f} | "
                  f"{r['s'] / r['hvps']:.3f} | {r['mb']:.0f} | {r['l1']:.4f} | {sampling} | "
                  f"{r['moment_err']:.1e} | {r['ref']} |")
    print("\nRatios (same run, same machine): PyHessian at ours' n_v / ours")
    for key, (rows, _) in results.items():
        ours, pyh = rows[0], rows[2]
        print(f"  {MODELS[key][0]}: products {pyh['hvps'] / ours['hvps']:.2f}x, seconds "
              f"{pyh['s'] / ours['s']:.2f}x, peak memory {pyh['mb'] / max(ours['mb'], 1):.2f}x")
    print(f"\nSurface ({args.grid}x{args.grid} points, train mode, one batch)")
    print("| model | method | points | seconds | ms/point | peak MB | max rel. difference |")
    print("|---|---|---|---|---|---|---|")
    for key, (_, rows) in results.items():
        for r in rows:
            diff = f"{r['max_diff']:.1e}" if "max_diff" in r else "-"
            print(f"| {MODELS[key][0]} | {r['method']} | {r['points']} | {r['s']:.1f} | "
                  f"{1e3 * r['s'] / r['points']:.1f} | {r['mb']:.0f} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
