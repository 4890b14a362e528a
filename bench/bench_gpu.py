"""The fit loop against plain PyTorch loops on one GPU, every row side by side in one run.

    .venv/bin/python bench/bench_gpu.py                       # one GPU, about 2 minutes on an H200
    .venv/bin/python bench/bench_gpu.py --device cpu --tiny   # the same code paths on a CPU

The paper's VGG-16 + BN, batch 128, SGD lr 0.1, on a CIFAR-shaped stand-in: random images written
in CIFAR-10's own file format and read by the real CIFAR10Data. Rows (steps/s, and the ratio to
the plain eager fp32 loop):
  fit fp32                  `python -m bnstudy fit --config configs/vgg_bn.yaml`, instruments off
  fit bf16-mixed            the same, --trainer.precision=bf16-mixed
  plain eager fp32          bnstudy.models.VGG, data already on the GPU, TF32 off
  plain TF32                TF32 matmuls and convolutions allowed
  plain bf16+channels_last  bf16 autocast, channels_last, eager
  plain compiled            bf16 + channels_last + torch.compile(mode="reduce-overhead")
  fit fast preset           --config configs/fast.yaml after vgg_bn.yaml, instruments off
  fit + instruments         fp32 with the paper config's instruments at their cadence
  fit fast + instruments    the fast preset with the instruments
The fits run in this process through bnstudy's CLI (the config's loggers, W&B disabled; progress bar
on), without validation; a callback times `--steps` steps after `--warmup` steps (compilation and
CUDA-graph capture happen in the warm-up). The CLI allows TF32 matmuls (float32 matmul precision
"high") and cuDNN allows TF32 convolutions by default: "fit fp32" compares with "plain TF32".
The instrument rows measure far more often per step than a 15,000-step run does (log-spaced steps
0, 1, 2, 4, ... up to the window's end, every 50/100/500).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random images in CIFAR-10's python format (as tests/conftest.py writes them)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, n: int) -> None:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "filenames": [f"img{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for i in range(1, 6):
        dump(f"data_batch_{i}", n_train // 5)
    dump("test_batch", n_test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f, protocol=2)
    # torchvision checks every file against the official archive's md5: point it at these files
    import hashlib

    from torchvision.datasets import CIFAR10
    md5 = lambda name: hashlib.md5((folder / name).read_bytes()).hexdigest()  # noqa: E731
    CIFAR10.train_list = [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)]
    CIFAR10.test_list = [["test_batch", md5("test_batch")]]
    CIFAR10.meta = {**CIFAR10.meta, "md5": md5("batches.meta")}
    return root


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


TIMERS: list[float] = []  # steps/s of each timed fit


class StepTimer(Callback):
    """Built by the CLI from --trainer.callbacks (class_path __main__.StepTimer): wall time of
    the steps after `warmup`, the GPU drained at both ends."""

    def __init__(self, warmup: int = 10):
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            sync(pl_module.device.type)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.steps += 1
            if trainer.global_step == trainer.max_steps or trainer.should_stop:
                sync(pl_module.device.type)
                TIMERS.append(self.steps / (time.perf_counter() - self.start))



def fit_row(args, configs: list[str], extra: list[str], instruments: bool) -> float:
    from bnstudy.cli import cli_main

    timer = {"class_path": "__main__.StepTimer", "init_args": {"warmup": args.warmup}}
    callbacks = ["--trainer.callbacks+=" + json.dumps(timer)] if instruments else [
        "--trainer.callbacks=" + json.dumps([timer])]
    with tempfile.TemporaryDirectory() as run_dir:
        argv = ["fit", *sum((["--config", str(REPO / "configs" / c)] for c in configs), []),
                f"--data.root={args.root}", "--data.download=false",
                f"--data.batch_size={args.batch}", f"--model.width={args.width}",
                f"--trainer.max_steps={args.warmup + args.steps}",
                f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
                "--trainer.devices=1", "--trainer.limit_val_batches=0",
                "--trainer.enable_model_summary=false",
                *callbacks, *extra, f"--run_dir={run_dir}"]
        TIMERS.clear()
        cli_main(argv)
    return TIMERS[-1]


def plain_row(args, precision: str, channels_last: bool = False, compiled: bool = False) -> float:
    """The same model and optimizer in a plain loop, data already on the device, random batches
    gathered there (as a resident data set would)."""
    from bnstudy.models import VGG, init_weights

    dev = torch.device(args.device)
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    net = VGG(16, args.width, "batch").to(dev)
    init_weights(net, "glorot")
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    n = 50 * args.batch
    x_all = torch.randn(n, 3, 32, 32, device=dev)
    y_all = torch.randint(0, 10, (n,), device=dev)
    if channels_last:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    forward = net
    if compiled:
        mode = "reduce-overhead" if args.device == "cuda" else "default"
        forward = torch.compile(net, mode=mode)
    order = torch.randperm(n, device=dev)

    def step(i: int) -> None:
        idx = order[(i % 50) * args.batch:(i % 50 + 1) * args.batch]
        x, y = x_all[idx], y_all[idx]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(args.warmup):
        step(i)
    sync(args.device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync(args.device)
    rate = args.steps / (time.perf_counter() - start)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="VGG-16 width 1/8, batch 16, a few steps: checks the code paths")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--rows", default="all", help="comma-separated row keys, or all")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU on this machine; nothing to measure "
              "(run with --device cpu --tiny to check the code paths)")
        return 0
    args.width = 0.125 if args.tiny else 1.0
    args.batch = 16 if args.tiny else 128
    args.steps = args.steps or (4 if args.tiny else 300)
    args.warmup = args.warmup or (3 if args.tiny else 40)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.environ["WANDB_MODE"] = "disabled"

    tmp = tempfile.TemporaryDirectory()
    n_train = 640 if args.tiny else 50_000
    args.root = str(write_cifar10(Path(tmp.name), n_train, 100 if args.tiny else 10_000))
    no_inst = ["vgg_bn.yaml"]
    rows = {
        "fit_fp32": ("fit fp32", lambda: fit_row(args, no_inst, [], False)),
        "fit_bf16": ("fit bf16-mixed", lambda: fit_row(
            args, no_inst, ["--trainer.precision=bf16-mixed"], False)),
        "plain_fp32": ("plain eager fp32", lambda: plain_row(args, "fp32")),
        "plain_tf32": ("plain TF32", lambda: plain_row(args, "tf32")),
        "plain_bf16_cl": ("plain bf16+channels_last", lambda: plain_row(args, "bf16", True)),
        "plain_compiled": ("plain bf16+CL+compile", lambda: plain_row(args, "bf16", True, True)),
        "fit_fast": ("fit fast preset", lambda: fit_row(args, [*no_inst, "fast.yaml"], [], False)),
        "fit_instruments": ("fit + instruments", lambda: fit_row(args, no_inst, [], True)),
        "fit_fast_instruments": ("fit fast + instruments", lambda: fit_row(
            args, [*no_inst, "fast.yaml"], [], True)),
    }
    chosen = list(rows) if args.rows == "all" else args.rows.split(",")
    unknown = [k for k in chosen if k not in rows]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(rows)}")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"bench_gpu: {time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__}, VGG-16 "
          f"width {args.width} + BN, batch {args.batch}, {args.steps} timed steps after "
          f"{args.warmup}", flush=True)
    results: dict[str, float] = {}
    started = time.perf_counter()
    for key in chosen:
        label, run = rows[key]
        t0 = time.perf_counter()
        try:
            results[key] = run()
        except Exception as err:  # one failing row (e.g. compile) must not hide the others
            print(f"  {label:<28} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
                  flush=True)
            continue
        print(f"  {label:<28} {results[key]:8.1f} steps/s   ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    base = results.get("plain_fp32")
    print(f"\n| loop | steps/s | vs plain eager fp32 |\n|---|---|---|")
    for key in chosen:
        if key in results:
            ratio = f"{results[key] / base:.2f}x" if base else "-"
            print(f"| {rows[key][0]} | {results[key]:.1f} | {ratio} |")
    if "fit_fp32" in results and "plain_tf32" in results:
        print(f"\nfit fp32 / plain TF32 (same precision) = "
              f"{results['fit_fp32'] / results['plain_tf32']:.2f} (target >= 0.9)")
    if "fit_fast" in results:
        print(f"fit fast preset: {results['fit_fast']:.0f} steps/s (target >= 300 on one H100)")
    print(f"total {time.perf_counter() - started:.0f} s")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
