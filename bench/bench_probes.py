"""Cost of the instruments, side by side, in one run on CPU.

    python bench/bench_probes.py                 # everything (about 10-15 minutes on 2 cores)
    python bench/bench_probes.py --quick         # fewer repeats and shorter fits

Part 1, per model (VGG-16 width 0.25 + BN, batch 128, CIFAR-sized inputs; the 25-layer DLN,
full batch 1000, without and with BN): one training step (zero_grad, forward, backward, SGD
step), one ICS probe over all layers (plain API, computing G itself; and as the callback runs it,
with the step's G), one landscape probe with 4 step sizes (as the callback runs it, reusing the
step's gradient; and computing g itself), and the brute-force twins of both. Timings are
interleaved over the repeats and the median is reported (other jobs may share the machine).

Part 2: real Lightning fits with and without the paper's instruments at the default cadence
(the same steps, the same data), interleaved; the ratio of their wall times. The DLN runs the
paper's full 10,000 steps. A VGG run of 15,000 steps is too long for a benchmark: it runs a
window of steps from 0 (which contains the early log-spaced probes, so it overstates the
overhead) and the 15,000-step overhead is also projected from that fit's own measured step and
probe times and the schedule.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bnstudy import probes  # noqa: E402
from bnstudy.models import VGG, DeepLinear, init_weights  # noqa: E402

TARGETS = {"ics_speedup": 2.0, "landscape_steps": 4.5, "fit_overhead": 1.10}


def vgg_problem():
    torch.manual_seed(0)
    model = VGG(16, 0.25, "batch")
    init_weights(model)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    return model, F.cross_entropy, x, y, 0.1


def dln_problem(norm: str):
    def problem():
        torch.manual_seed(0)
        model = DeepLinear(25, 10, norm)
        init_weights(model)
        x = torch.randn(1000, 10)
        y = x @ torch.randn(10, 10)
        return model, lambda o, t: F.mse_loss(o, t, reduction="sum"), x, y, 1e-6
    return problem


PROBLEMS = {"VGG-16 w0.25 BN, batch 128": vgg_problem, "DLN-25, batch 1000": dln_problem("none"),
            "DLN-25 BN, batch 1000": dln_problem("batch")}


def micro(problem, repeats: int) -> dict[str, float]:
    model, loss_fn, x, y, lr = problem()
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def train_step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    train_step()  # warm up; leaves .grad = the step's gradient at the previous W
    w_t = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = {n: (p - lr * p.grad).detach() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    sizes = [m * lr for m in (0.5, 1, 2, 4)]
    ops = {
        "train step": train_step,
        "ics": lambda: probes.ics(model, loss_fn, x, y, after),
        "ics (step's G)": lambda: probes.ics(model, loss_fn, x, y, after, grads=grads),
        "ics twin": lambda: probes.ics_bruteforce(model, loss_fn, x, y, after),
        "landscape (step's g)": lambda: probes.landscape(model, loss_fn, x, y, sizes, grads=grads),
        "landscape": lambda: probes.landscape(model, loss_fn, x, y, sizes),
        "landscape twin": lambda: probes.landscape_bruteforce(model, loss_fn, x, y, sizes),
    }
    times = {k: [] for k in ops}
    for r in range(repeats + 1):
        for name, op in ops.items():
            if name != "train step":  # probes measure at a fixed point
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.copy_(w_t[n])
            started = time.perf_counter()
            op()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- Lightning fits ---------------------------------------------------------------------------
def paper_probes(kind: str):
    """The paper's instruments at the default cadence (what configs/*.yaml carry)."""
    from bnstudy.instruments import ICS, ActivationStats, Landscape, RandomLandscape

    if kind == "vgg":
        return [ICS(layers=[5, 10]), Landscape(lr_multiples=[0.5, 1, 2, 4]),
                RandomLandscape(lr_multiples=[0.5, 1, 2, 4]),
                ActivationStats(layers=[2, 3, 9, 11, 13])]
    return [ICS(layers=[9, 17]), Landscape(lr_logspace=(0.01, 30, 8)),
            RandomLandscape(lr_logspace=(0.01, 30, 8)), ActivationStats(layers=[1, 11, 24])]


class StepTimer(Callback):
    """Wall time of each training step (batch start to batch end)."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._started)


def fit(kind: str, steps: int, instruments: bool):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from bnstudy.instruments import Instruments
    from bnstudy.modules import DLNModule, VGGModule

    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    if kind == "vgg":
        module = VGGModule(width=0.25, norm="batch", lr=0.1)
        data = TensorDataset(torch.randn(1280, 3, 32, 32, generator=g),
                             torch.randint(0, 10, (1280,), generator=g))
        loader = DataLoader(data, batch_size=128)
    else:
        module = DLNModule(norm="none", lr=1e-6)
        x = torch.randn(1000, 10, generator=g)
        loader = DataLoader(TensorDataset(x, x @ torch.randn(10, 10, generator=g)),
                            batch_size=1000)
    timer = StepTimer()
    callbacks = [timer]
    inst = None
    if instruments:
        inst = Instruments(paper_probes(kind))
        callbacks.append(inst)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0)
    started = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - started, timer.times, inst


def projected_overhead(kind: str, run_steps: int, plain_step: float, probe_seconds: dict
                       ) -> float:
    """Run time with the instruments over `run_steps` / without, from measured costs."""
    extra = 0.0
    for probe in paper_probes(kind):
        cost = probe_seconds.get(probe.name)
        if cost is not None:
            extra += cost * sum(probe.due(t) for t in range(run_steps))
    return 1 + extra / (run_steps * plain_step)


def fits(kind: str, steps: int, repeats: int, paper_steps: int) -> dict:
    walls = {True: [], False: []}
    step_times = {True: [], False: []}
    probe_seconds: dict[str, list[float]] = {}
    for with_inst in (False, True):  # warm up (first fits pay one-time costs)
        fit(kind, 3, with_inst)
    for _ in range(repeats):
        for with_inst in (False, True):
            wall, times, inst = fit(kind, steps, with_inst)
            walls[with_inst].append(wall)
            step_times[with_inst].extend(times)
            if inst is not None:
                for _, metrics in inst.history:
                    for k, v in metrics.items():
                        if k.startswith("time/"):
                            probe_seconds.setdefault(k[5:], []).append(v)
    plain = statistics.median(walls[False])
    with_inst = statistics.median(walls[True])
    plain_step = statistics.median(step_times[False])
    costs = {k: statistics.median(v) for k, v in probe_seconds.items()}
    return {"steps": steps, "plain_s": plain, "instruments_s": with_inst,
            "ratio": with_inst / plain, "plain_step_s": plain_step, "probe_s": costs,
            "projected": projected_overhead(kind, paper_steps, plain_step, costs),
            "paper_steps": paper_steps}


def micro_table(repeats: int) -> None:
    results = {name: micro(problem, repeats) for name, problem in PROBLEMS.items()}
    ops = list(next(iter(results.values())))
    width = max(len(n) for n in results) + 2
    print("seconds".ljust(24) + "".join(n.rjust(width) for n in results))
    for op in ops:
        print(op.ljust(24) + "".join(f"{r[op]:{width}.4f}" for r in results.values()))
    print()
    rows = [
        ("ics twin / ics", lambda r: r["ics twin"] / r["ics"], f">= {TARGETS['ics_speedup']}",
         lambda v: v >= TARGETS["ics_speedup"]),
        ("ics twin / ics (step's G)", lambda r: r["ics twin"] / r["ics (step's G)"], "", None),
        ("landscape (step's g) / step", lambda r: r["landscape (step's g)"] / r["train step"],
         f"<= {TARGETS['landscape_steps']}", lambda v: v <= TARGETS["landscape_steps"]),
        ("landscape / step", lambda r: r["landscape"] / r["train step"], "", None),
        ("landscape twin / landscape", lambda r: r["landscape twin"] / r["landscape"], "", None),
        ("ics / step", lambda r: r["ics"] / r["train step"], "", None),
    ]
    print("ratio".ljust(30) + "".join(n.rjust(width) for n in results) + "   target")
    for label, f, target, ok in rows:
        values = [f(r) for r in results.values()]
        mark = "" if ok is None else ("  met" if all(ok(v) for v in values) else "  MISSED")
        print(label.ljust(30) + "".join(f"{v:{width}.2f}" for v in values) + f"   {target}{mark}")


def fit_table(args) -> None:
    print("\nLightning fits with / without the paper's instruments at the default cadence "
          f"(median of {args.fit_repeats}, interleaved)")
    for kind, steps, paper in (("dln", args.dln_fit_steps, 10_000),
                               ("vgg", args.vgg_fit_steps, 15_000)):
        if steps <= 0:
            continue
        r = fits(kind, steps, args.fit_repeats, paper)
        probes_txt = ", ".join(f"{k} {v:.3f}s" for k, v in sorted(r["probe_s"].items()))
        span = (f"the paper's {paper} steps" if steps >= paper else
                f"the first {steps} of the paper's {paper} steps (a window holding the early "
                "log-spaced probes overstates the overhead)")
        judged = r["ratio"] if steps >= paper else r["projected"]  # a whole run, or projected
        verdict = "met" if judged <= TARGETS["fit_overhead"] else "MISSED"
        print(f"  {kind.upper()}, {span}:\n"
              f"    plain {r['plain_s']:.1f}s, with instruments {r['instruments_s']:.1f}s, "
              f"ratio {r['ratio']:.3f}\n"
              f"    step {r['plain_step_s'] * 1000:.1f} ms; seconds per due probe: {probes_txt}\n"
              f"    projected over {paper} steps from these costs: {r['projected']:.3f}\n"
              f"    {'real' if steps >= paper else 'projected'} ratio {judged:.3f}, "
              f"target <= {TARGETS['fit_overhead']}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--vgg-fit-steps", type=int, default=100)
    parser.add_argument("--dln-fit-steps", type=int, default=10_000)
    parser.add_argument("--fit-repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="repeats 2, fits of 30 VGG / 2000 DLN steps, once")
    parser.add_argument("--skip-fits", action="store_true")
    parser.add_argument("--skip-micro", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.vgg_fit_steps, args.dln_fit_steps, args.fit_repeats = 2, 30, 2000, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"medians of {args.repeats} interleaved repeats\n")
    if not args.skip_micro:
        micro_table(args.repeats)
    if not args.skip_fits:
        fit_table(args)


if __name__ == "__main__":
    main()
