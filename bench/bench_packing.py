"""What packing runs into one process would buy on this CPU, priced before building it: S copies
of a model, each with its own weights and data (seeds), trained alone (one after the other, each
with its own SGD, as separate runs do) against all S in one step through torch.func
(stack_module_state, functional_call, vmap(grad_and_value), one SGD update of the stacked
weights), in one process, on one thread, the two interleaved --repeats times.

    .venv/bin/python bench/bench_packing.py            # the cases below, about 3 minutes
    .venv/bin/python bench/bench_packing.py --quick    # DLN at S = 1, 2, a check

Cases: the 25-layer DLN (full batch of 1,000, lr 1e-6) without a norm and with BN, at S = 1, 3
(the plan's seeds) and 8; the mini VGG-11 + BN of `reproduce mini` (width 1/8, batch 128 of
32x32x3, lr 0.1) at S = 1 and 3. Printed per case: the milliseconds per member and step alone
and packed (medians), the speed-up alone / packed (> 1: packing is faster) with its range over
the repeats, and the largest relative difference between a member's gradient from the packed
step and from its own net at the same weights (the same work on both sides: float rounding).
Not packable as the modules are: the lp norms (their autograd.Function has no setup_context,
which torch.func needs) and noisy BN (its noise comes from per-layer generators).
What packing would also save, the fit loop around the step (paid once for S runs), is not in
these numbers: bench_overhead.py prints its share of a step.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bnstudy.models import VGG, DeepLinear  # noqa: E402


def sum_squares(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).sum()  # the DLN's summed squared loss


def members(kind: str, norm: str, size: int):
    """`size` nets of one architecture (seeds 0..size-1), their data (S, batch, ...), loss, lr."""
    nets = []
    for seed in range(size):
        torch.manual_seed(seed)
        net = DeepLinear(25, 10, norm) if kind == "dln" else VGG(11, 0.125, norm, 10, 3, 32)
        nets.append(net.train())
    gen = torch.Generator().manual_seed(size)
    if kind == "dln":
        x = torch.randn(size, 1000, 10, generator=gen)
        return nets, x, x @ torch.randn(10, 10, generator=gen), sum_squares, 1e-6
    x = torch.randn(size, 128, 3, 32, 32, generator=gen)
    return nets, x, torch.randint(0, 10, (size, 128), generator=gen), F.cross_entropy, 0.1


def packed_against_alone(nets, loss_fn, x, y, packed_grads: dict) -> float:
    """The largest relative difference, over members, between the gradient the packed step gave
    a member (`packed_grads`, name -> (S, ...)) and the one its own net's backward gives, at the
    same weights: the two sides do the same work (each member its own data and weights)."""
    worst = 0.0
    for i, net in enumerate(nets):
        twin = copy.deepcopy(net)  # its BN running statistics stay as they are
        own = torch.autograd.grad(loss_fn(twin(x[i]), y[i]), list(twin.parameters()))
        mine = torch.cat([g.reshape(-1) for g in own])
        packed = torch.cat([g[i].reshape(-1) for g in packed_grads.values()])
        worst = max(worst, float((mine - packed).norm() / mine.norm()))
    return worst


def measure(kind: str, norm: str, size: int, steps: int, repeats: int) -> dict:
    nets, x, y, loss_fn, lr = members(kind, norm, size)
    opts = [torch.optim.SGD(net.parameters(), lr=lr, foreach=True) for net in nets]

    def alone() -> None:
        for i, (net, opt) in enumerate(zip(nets, opts)):
            opt.zero_grad()
            loss_fn(net(x[i]), y[i]).backward()
            opt.step()

    # the packed copy starts from the same weights and buffers (BN's running statistics)
    skeleton = copy.deepcopy(nets[0]).to("meta")
    params, buffers = stack_module_state(nets)  # stacked copies, the nets' own left alone
    params = {k: v.detach() for k, v in params.items()}
    keys = list(params)

    def loss_of(p, b, xi, yi):
        return loss_fn(functional_call(skeleton, (p, b), (xi,)), yi)

    packed_step = vmap(grad_and_value(loss_of))

    def packed() -> None:
        grads, _ = packed_step(params, buffers, x, y)
        torch._foreach_add_([params[k] for k in keys], [grads[k] for k in keys], alpha=-lr)

    grads, _ = packed_step(params, {k: v.clone() for k, v in buffers.items()}, x, y)
    grad_diff = packed_against_alone(nets, loss_fn, x, y, grads)
    for fn in (alone, packed):  # warm-up (allocator, first-call work)
        for _ in range(2):
            fn()
    times = {"alone": [], "packed": []}
    for _ in range(repeats):
        for name, fn in (("alone", alone), ("packed", packed)):
            started = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - started) / steps / size)
    ratios = [a / p for a, p in zip(times["alone"], times["packed"])]
    return {"alone": statistics.median(times["alone"]),
            "packed": statistics.median(times["packed"]),
            "ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios),
            "grad_diff": grad_diff}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dln-steps", type=int, default=100, help="timed steps per repeat")
    parser.add_argument("--vgg-steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--quick", action="store_true", help="DLN without a norm at S = 1, 2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        cases = [("dln", "none", 1), ("dln", "none", 2)]
    else:
        cases = [("dln", norm, s) for norm in ("none", "batch") for s in (1, 3, 8)]
        cases += [("vgg", "batch", 1), ("vgg", "batch", 3)]
    print(f"torch {torch.__version__}, 1 thread, {args.repeats} repeats; ms per member and step")
    print("| model | S | alone ms | packed ms | speed-up (alone / packed) | gradient diff |")
    print("|---|---|---|---|---|---|")
    for kind, norm, size in cases:
        steps = args.dln_steps if kind == "dln" else args.vgg_steps
        r = measure(kind, norm, size, steps, args.repeats)
        model = "DLN-25" if kind == "dln" else "VGG-11 w1/8"
        model += " + BN" if norm == "batch" else ""
        print(f"| {model} | {size} | {r['alone'] * 1e3:.3f} | {r['packed'] * 1e3:.3f} | "
              f"{r['ratio']:.2f} [{r['lo']:.2f}-{r['hi']:.2f}] | {r['grad_diff']:.1e} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
