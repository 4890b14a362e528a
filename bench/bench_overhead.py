"""`fit` as a user runs it against a plain one-thread PyTorch loop on the CPU: every speed ratio
of the README's targets side by side, idle and beside a process that keeps one core busy, each
measured --repeats times (interleaved) and printed as the median with its range.

    .venv/bin/python bench/bench_overhead.py                       # every case, idle and busy
    .venv/bin/python bench/bench_overhead.py --loads idle --cases dln,dln_bn --repeats 5
    .venv/bin/python bench/bench_overhead.py --repo /tmp/old        # another checkout's code

Cases:
  dln, dln_bn, dln_l1   configs/dln*.yaml: DLN 25 x 10 (none / BN / l1), full batch of 1,000
  vgg16, vgg11          the mini VGG (configs/vgg_bn.yaml, width 1/8, depth 16 or 11) on the
                        digits at 32x32x3, batch 128, as `reproduce mini` trains it
Per case and repeat, each in its own process, one after the other:
  plain        the config's own model, loss, data and SGD (built by the CLI) in a bare loop on one
               thread; for the VGG in channels_last fp32, and again under bf16 autocast ("bf16")
               and in NCHW fp32 (the channels_last speed-up: the rule for --model.channels_last)
  fit off      `python -m bnstudy fit --config ... --trainer.callbacks=[]`: everything as the
               config has it (W&B offline and metrics.csv, progress bar, LR and throughput
               monitors, divergence guard, checkpoints) but the instruments
  fit instr.   the same with the config's instruments, at the config's cadence (DLN: steps
               200-2,200, which hold 24 ICS/landscape, 4 random landscape, 48 activation and 4
               curvature measurements, about the full 10,000-step run's rate; VGG: steps 100-300,
               4 ICS/landscape and 6 activation measurements, the 600-step mini run's rate)
  fit paper    the same with the paper's instruments only (ICS, landscape along the gradient and
               along random directions, activation statistics: the config's list without
               bnstudy's own Curvature and Theorem 4.1 probes)
  Lightning alone  the config's module and data in a bare `lightning.Trainer` (no logger,
               callback, checkpoint or progress bar; the threads `fit` would choose, and
               bnstudy's no-op profiler and hidden no-op hooks where the checkout has them):
               Lightning's loop at its cheapest, the ceiling
               for `fit` inside Lightning's automatic optimization
Validation is off in the fits (the plain loop has none). Every process is timed inside itself
(a callback records the clock at the start of each training step; start-up, the first steps and
the end of the fit are left out), in wall time and in CPU time (CPU time is what a shared machine
distorts least: it leaves out the time the process waited for a core).
Ratios are speeds (plain ms/step / fit ms/step, so 1.0 is as fast as the plain loop), computed
within each repeat (the processes of one repeat run minutes apart at most) and then the median
over repeats, with [min-max]; targets: fit off >= 0.75, fit with the paper's instruments >= 0.6
(DLN) and >= 0.8 (VGG, against channels_last fp32).
"same process": each fit process also runs the plain loop in bursts of its own (DLN: 50 timed
steps every 100 fit steps; VGG: 4 every 25), on a copy of the net with its own SGD and its own
batches (a loader of the data module's, channels_last for the VGG, as the plain process's);
the bursts' time is left out of the fit's steps. (Before 2026-12-07 the bursts trained on the
fit's own batch, already fetched and made channels_last: for the VGG that left the loading,
about 0.5 ms of a 20 ms step, out of the plain side only.) The ratio of the two, measured in one
process minutes apart at most, is what a noisy machine distorts least (separate processes of the
same code differ by 10-40% here).
"no-probe step": the median step of the fit with instruments, over the steps on which no probe
runs, against the median step of the fit without them: what the Instruments callback costs when
nothing is due (target <= +3%). Two processes a minute apart: the machine's drift shows in it.
"Instruments' hooks in a no-probe step": the same cost timed inside the instrumented process
(the callback's hooks wrapped in a clock), as a share of its median no-probe step.
"busy": a `while True` process pinned to CPU 0 runs meanwhile.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VGG_MINI = ["--data=bnstudy.data.DigitsData", "--data.image_size=32", "--data.channels=3",
            "--data.batch_size=128", "--model.width=0.125", "--model.channels_last=true"]
CASES = {
    "dln": {"config": "dln.yaml", "args": []},
    "dln_bn": {"config": "dln_bn.yaml", "args": []},
    "dln_l1": {"config": "dln_l1.yaml", "args": []},
    "vgg16": {"config": "vgg_bn.yaml", "args": VGG_MINI + ["--model.depth=16"]},
    "vgg11": {"config": "vgg_bn.yaml", "args": VGG_MINI + ["--model.depth=11"]},
}
# timed window [start, stop) of the fits (in steps) and of the plain loop
WINDOWS = {"dln": (200, 2200), "vgg": (100, 300)}
PLAIN_WINDOWS = {"dln": (200, 2200), "vgg": (10, 50)}
# the plain loop again inside each fit process: BURST timed steps every BURST_EVERY fit steps
BURSTS = {"dln": (50, 100), "vgg": (4, 25)}
MARK = "BENCH_RESULT "

# One child process per measurement, run with the checkout's code first on sys.path.
CHILD = r"""
import functools, json, os, sys, time
mode, start, stop, BURST, BURST_EVERY = sys.argv[1], *map(int, sys.argv[2:6])
args = sys.argv[6:]
sys.argv = ["bnstudy", *(["fit", *args] if mode == "fit" else [])]  # as `bnstudy fit` sees them
MARK = "BENCH_RESULT "

def report(times, active=None):
    print(MARK + json.dumps({"times": times, "active": active}), flush=True)

if mode.startswith("plain"):
    import torch
    torch.set_num_threads(1)
    from bnstudy.cli import cli_main
    # the config's own model and data, built by the CLI, then trained in a bare loop
    cli = cli_main([*args, "--trainer.logger=false", "--trainer.callbacks=[]"], run=False)
    model, data = cli.model, cli.datamodule
    data.trainer = None
    if hasattr(data, "setup"):
        data.setup("fit")
    net, loss_fn = model.net, model.loss_fn
    image = mode in ("plain", "plain_bf16")
    if image:  # channels_last fp32 (and bf16 autocast for plain_bf16); plain_nchw: NCHW fp32
        net.to(memory_format=torch.channels_last)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=model.lr)
    times, done = [], 0
    while done < stop:
        for x, y in data.train_dataloader():
            times.append((time.perf_counter(), time.process_time()))
            if image:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "plain_bf16"):
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == stop:
                break
    times.append((time.perf_counter(), time.process_time()))
    report(times[start:])
else:  # "fit" (a `bnstudy fit` as a user runs it) or "bare" (Lightning's loop alone)
    import lightning.pytorch as pl

    class Clock(pl.Callback):
        # the clock at the start of every training step, whether a probe runs in it, and the
        # seconds the Instruments callback's own hooks took in it (timed inside this process, so
        # the no-probe cost does not depend on two processes' machine states)
        def __init__(self):
            self.times, self.active, self.hooks = [], [], []
            self.bursts, self.skipped, self.plain = [], [], None
            self._wrapped = False
            self._spent = 0.0

        def _wrap(self, trainer):
            for cb in trainer.callbacks:
                if not hasattr(cb, "probes"):
                    continue
                for name in ("on_train_batch_start", "on_before_optimizer_step",
                             "on_train_batch_end"):
                    def timed(*a, _hook=getattr(cb, name), **k):
                        t0 = time.perf_counter()
                        try:
                            return _hook(*a, **k)
                        finally:
                            self._spent += time.perf_counter() - t0
                    setattr(cb, name, timed)
            self._wrapped = True

        def _batches(self, trainer):
            # the plain loop's own batches, as the plain process draws them: a loader of the
            # data module's of its own (its order and position apart from the fit's), each image
            # batch made channels_last there, as the plain loop does
            import torch
            loader = trainer.datamodule.train_dataloader()
            image = trainer.lightning_module.hparams.get("channels_last", False)
            while True:
                for x, y in loader:
                    if image:
                        x = x.contiguous(memory_format=torch.channels_last)
                    yield x, y

        def _burst(self, trainer, pl_module):
            # the plain loop, in this process, between two of the fit's steps: a copy of the
            # net with its own SGD and its own batches (its first step, a warm-up, not timed)
            import copy
            import torch
            if self.plain is None:
                net = copy.deepcopy(pl_module.net).train()
                self.plain = (net, torch.optim.SGD(net.parameters(), lr=pl_module.lr),
                              self._batches(trainer))
            net, opt, batches = self.plain
            for i in range(BURST + 1):
                if i == 1:
                    began = (time.perf_counter(), time.process_time())
                x, y = next(batches)
                loss = pl_module.loss_fn(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self.bursts.append((time.perf_counter() - began[0], time.process_time() - began[1]))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not self._wrapped:
                self._wrap(trainer)
            t = trainer.global_step
            if start <= t <= stop:
                now, burst = (time.perf_counter(), time.process_time()), (0.0, 0.0)
                if BURST and (t - start) % BURST_EVERY == 0 and t < stop:
                    self._burst(trainer, pl_module)
                    after = (time.perf_counter(), time.process_time())
                    now, burst = after, (after[0] - now[0], after[1] - now[1])
                if self.times:  # left out of the interval from the last step's start to now
                    self.skipped.append(burst)
                self.times.append(now)
                self.hooks.append(self._spent)
                probes = [p for c in trainer.callbacks for p in getattr(c, "probes", [])]
                self.active.append(any(p.active(t) for p in probes))

        def on_train_end(self, trainer, pl_module):
            print(MARK + json.dumps({"times": self.times, "active": self.active,
                                     "hooks": self.hooks, "bursts": self.bursts,
                                     "skipped": self.skipped, "burst": BURST}), flush=True)

    if mode == "bare":
        # the config's module and data (built by the CLI) in a bare lightning.Trainer: no logger,
        # callback, checkpoint, progress bar or validation, and bnstudy's two cuts of Lightning's
        # per-hook cost where the checkout has them: the loop alone, at its cheapest
        from bnstudy.cli import cli_main
        from bnstudy.threads import ThreadsForFit  # the threads `fit` would choose
        cli = cli_main([*args, "--trainer.logger=false", "--trainer.callbacks=[]"], run=False)
        extra = {}
        try:
            from bnstudy.lightning_cli import NoProfiler, skip_empty_step_hooks
            extra["profiler"] = NoProfiler()
        except ImportError:
            skip_empty_step_hooks = None
        trainer = pl.Trainer(max_steps=stop + 1, logger=False,
                             callbacks=[Clock(), ThreadsForFit()], enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, accelerator="cpu", devices=1, **extra)
        if skip_empty_step_hooks is not None:
            skip_empty_step_hooks(trainer.callbacks)
        trainer.fit(cli.model, datamodule=cli.datamodule)
        sys.exit(0)
    init = pl.Trainer.__init__
    @functools.wraps(init)  # the CLI reads the Trainer's arguments from its signature
    def with_clock(self, *a, callbacks=None, **k):
        init(self, *a, callbacks=[*(callbacks or []), Clock()], **k)
    pl.Trainer.__init__ = with_clock
    from bnstudy.cli import main
    sys.exit(main())
"""


def child(mode: str, window: tuple[int, int], args: list[str], repo: Path, kind: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BNSTUDY_RUN_DIR")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(repo))
    burst, every = BURSTS[kind] if mode in ("fit", "bare") else (0, 1)
    cmd = [sys.executable, "-c", CHILD, mode, str(window[0]), str(window[1]), str(burst),
           str(every), *args]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"bench_overhead: {mode} failed ({proc.returncode}): {' '.join(args)}\n"
                 + proc.stderr[-3000:])
    out = json.loads(lines[-1][len(MARK):])
    times = out["times"]
    # a step is from its start to the next one's, less a plain burst run in between
    skipped = out.get("skipped") or [(0.0, 0.0)] * len(times)
    steps = [(b[0] - a[0] - s[0], b[1] - a[1] - s[1])
             for a, b, s in zip(times, times[1:], skipped)]
    bursts = out.get("bursts") or []
    active = (out["active"] or [False] * len(times))[:len(steps)]
    quiet = [s for s, busy in zip(steps, active) if not busy] or steps
    hooks = out.get("hooks") or []
    # the Instruments hooks' seconds in each step (the counter is read at the next step's start,
    # before that step's hooks run; this callback runs after Instruments in the list)
    spent = [b - a for a, b in zip(hooks, hooks[1:])]
    quiet_hooks = [h for h, busy in zip(spent, active) if not busy]
    return {"hook_share": (statistics.median(quiet_hooks) / statistics.median(
                s[0] for s in quiet)) if quiet_hooks else None,
            "wall": sum(s[0] for s in steps) / len(steps),
            "cpu": sum(s[1] for s in steps) / len(steps),
            "quiet_wall": statistics.median(s[0] for s in quiet),
            "quiet_cpu": statistics.median(s[1] for s in quiet),
            "probe_steps": sum(active),
            **{f"plain_{clock}": sum(b[i] for b in bursts) / (out["burst"] * len(bursts))
               for i, clock in enumerate(("wall", "cpu")) if bursts}}


def measure(case: str, repo: Path, tmp: Path, scale: float) -> dict:
    spec = CASES[case]
    kind = "vgg" if case.startswith("vgg") else "dln"
    base = ["--config", str(repo / "configs" / spec["config"]), *spec["args"]]
    fit_window = tuple(round(w * scale) for w in WINDOWS[kind])
    plain_window = tuple(round(w * scale) for w in PLAIN_WINDOWS[kind])
    run_dirs = iter(tmp / f"{case}-{i}-{time.monotonic_ns()}" for i in range(10))
    if case == "vgg11":  # the mini plan's VGG-11 instruments (a checkout without them: VGG-16's
        instruments = repo / "configs" / "common" / "instruments_vgg11.yaml"  # at its layers)
        if not instruments.exists():
            paper = (repo / "configs" / "common" / "instruments_vgg.yaml").read_text()
            instruments = tmp / "instruments_vgg11.yaml"
            instruments.write_text(paper.replace("layers: [5, 10]", "layers: [3, 6]")
                                   .replace("layers: [2, 3, 9, 11, 13]", "layers: [1, 2, 6, 7, 8]"))
        base.append(f"--trainer.callbacks={instruments}")
    else:  # the instruments file the config names
        config = repo / "configs" / spec["config"]
        instruments = config.parent / yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    fit = [*base, f"--trainer.max_steps={fit_window[1] + 1}", "--trainer.limit_val_batches=0",
           "--trainer.enable_model_summary=false"]
    result = {"plain": child(f"plain_{kind}" if kind == "dln" else "plain", plain_window,
                             [*base, f"--run_dir={next(run_dirs)}"], repo, kind)}
    if kind == "vgg":
        for mode in ("bf16", "nchw"):
            result[mode] = child(f"plain_{mode}", plain_window,
                                 [*base, f"--run_dir={next(run_dirs)}"], repo, kind)
    result["bare"] = child("bare", fit_window, [*base, f"--run_dir={next(run_dirs)}"], repo,
                           kind)
    result["off"] = child("fit", fit_window, [*fit, "--trainer.callbacks=[]",
                                              f"--run_dir={next(run_dirs)}"], repo, kind)
    result["instr"] = child("fit", fit_window, [*fit, f"--run_dir={next(run_dirs)}"], repo, kind)
    papers = f"--trainer.callbacks={paper_only(instruments, tmp)}"
    result["paper"] = child("fit", fit_window, [*fit, papers, f"--run_dir={next(run_dirs)}"], repo,
                            kind)
    return result


PAPERS = ("ICS", "Landscape", "RandomLandscape", "ActivationStats")


def paper_only(instruments: Path, tmp: Path) -> Path:
    """The instruments file with the paper's probes only (bnstudy's Curvature and Theorem 4.1
    probes left out)."""
    blocks = yaml.safe_load(instruments.read_text())
    for block in blocks:
        probes = block["init_args"]["probes"]
        block["init_args"]["probes"] = [p for p in probes
                                        if p["class_path"].rsplit(".", 1)[-1] in PAPERS]
    out = tmp / f"paper_{instruments.name}"
    out.write_text(yaml.safe_dump(blocks))
    return out


def burner() -> subprocess.Popen:
    """A process that keeps CPU 0 busy (as another job on a shared node would)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {0}))


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """The median, and [min-max] when there are several."""
    med, low, high = (fmt.format(f(values)) for f in (statistics.median, min, max))
    return med if len(values) == 1 else f"{med} [{low}-{high}]"


def rows(case: str, load: str, repeats: list[dict], clock: str) -> list[str]:
    """One table row: every ratio within each repeat, then the median over the repeats."""
    def ratio(num: str, den: str) -> list[float]:
        return [r[num][clock] / r[den][clock] for r in repeats if num in r and den in r]

    quiet = [100 * (r["instr"][f"quiet_{clock}"] / r["off"][f"quiet_{clock}"] - 1)
             for r in repeats]
    target = 0.8 if case.startswith("vgg") else 0.6
    def ms(mode: str) -> str:
        return f"{statistics.median(r[mode][clock] for r in repeats) * 1e3:.2f}"

    def same(mode: str) -> list[float]:  # the plain bursts run inside that fit's own process
        return [r[mode][f"plain_{clock}"] / r[mode][clock] for r in repeats
                if f"plain_{clock}" in r[mode]]

    cells = [case, load, clock, ms("plain"), ms("off"), ms("instr"), ms("paper"),
             spread(ratio("plain", "off")), spread(ratio("plain", "instr")),
             f"{spread(ratio('plain', 'paper'))} (>= {target})",
             *(spread(same(mode)) if same(mode) else "" for mode in ("off", "instr", "paper")),
             spread(quiet, "{:+.1f}%")]
    cells.append(spread(ratio("plain", "bf16")) if "bf16" in repeats[0] else "")
    cells.append(spread(ratio("nchw", "plain")) if "nchw" in repeats[0] else "")
    shares = [100 * r["instr"]["hook_share"] for r in repeats
              if r["instr"].get("hook_share") is not None]
    cells.append(spread(shares, "{:.2f}%") if shares and clock == "wall" else "")
    cells.append(spread(same("bare")) if "bare" in repeats[0] and same("bare") else "")
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="checkout whose bnstudy and configs to run (default: this one)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--loads", nargs="+", default=["idle", "busy"], choices=["idle", "busy"])
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements of each case and load, interleaved (median printed)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the timed windows (0.25 for a quick look)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; expected some of {list(CASES)}")
    repo = args.repo.resolve()
    print(f"bench_overhead: {repo}, {len(os.sched_getaffinity(0))} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}", flush=True)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for load in args.loads:
            hot = burner() if load == "busy" else None
            try:
                results = {case: [] for case in cases}
                for rep in range(args.repeats):  # repeats outermost: drift spreads over cases
                    for case in cases:
                        started = time.perf_counter()
                        r = measure(case, repo, Path(tmp), args.scale)
                        results[case].append(r)
                        print(f"  {case} {load} {rep + 1}/{args.repeats} "
                              f"({time.perf_counter() - started:.0f} s): "
                              + ", ".join(f"{k} {v['wall'] * 1e3:.2f} ms/step"
                                          for k, v in r.items()), flush=True)
                table += [rows(case, load, results[case], clock)
                          for case in cases for clock in ("wall", "cpu")]
            finally:
                if hot is not None:
                    hot.kill()
                    hot.wait()
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; medians of {args.repeats} "
          "repeats [min-max]\n")
    print("| case | load | clock | plain ms/step | fit off ms/step | fit instr. ms/step "
          "| fit paper ms/step | fit off / plain | fit instr. / plain | fit paper / plain "
          "| same process: off / plain | instr. / plain | paper / plain "
          "| no-probe step vs off | bf16 speed-up, plain | channels_last speed-up, plain fp32 "
          "| Instruments' hooks in a no-probe step | same process: Lightning alone / plain |")
    print("|---" * 18 + "|")
    for cells in table:
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
