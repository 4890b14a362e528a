"""Test accuracy of a trained noisy-BN VGG with the noise off at evaluation, and on.

    python scripts/noisy_bn_eval.py results/mini/runs/vgg_noisy_bn_lr0.1

The paper does not say whether its noisy BN (claim 2) keeps the noise at test time. bnstudy's
default (`model.noise.in_eval: false`) evaluates without it. The network trained with the noise,
whose per-unit scale averages 1.125, so without the noise every noisy layer passes on a smaller
signal than in training, and over 13 layers that compounds. This script reads the run's last
checkpoint and its config.yaml, then measures the test accuracy three ways on the same weights:
eval mode without the noise, eval mode with fresh noise, and train mode (batch statistics plus
noise, as the optimizer saw the network).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from bnstudy.data import DigitsData
from bnstudy.modules import VGGModule
from bnstudy.norms import BatchNoise, NoiseConfig, resample_noise


def load(run_dir: Path) -> tuple[VGGModule, DigitsData, int]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    kw = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    if isinstance(kw.get("noise"), dict):
        kw["noise"] = NoiseConfig(**kw["noise"])
    model = VGGModule(**kw)
    model.load_state_dict(ckpt["state_dict"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = DigitsData(**config["data"]["init_args"])
    data.setup("fit")
    return model, data, ckpt["global_step"]


def accuracy(model: VGGModule, data: DigitsData, train_mode: bool, noise_in_eval: bool,
             passes: int = 1) -> list[float]:
    """Test accuracy per pass over the test set (the noise differs from pass to pass)."""
    for m in model.modules():
        if isinstance(m, BatchNoise):
            m.cfg.in_eval = noise_in_eval
    model.train(train_mode)
    out = []
    with torch.no_grad():
        for _ in range(passes):
            correct = total = 0
            for x, y in data.val_dataloader():
                resample_noise(model)  # train mode: fresh noise per batch, as in training
                correct += (model.net(x).argmax(1) == y).sum().item()
                total += len(y)
            out.append(correct / total)
    return out


def describe(accs: list[float]) -> str:
    if len(accs) == 1:
        return f"{accs[0]:.3f}"
    t = torch.tensor(accs)
    return f"{t.mean():.3f} +- {t.std():.3f} (mean +- std over {len(accs)} noise draws)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished noisy-BN VGG run directory")
    parser.add_argument("--passes", type=int, default=10, help="noise draws to average")
    args = parser.parse_args()
    run_dir = args.run_dir
    torch.manual_seed(0)  # the noise layers' seeds (and so every draw below) follow it
    model, data, step = load(run_dir)
    if not any(isinstance(m, BatchNoise) for m in model.modules()):
        raise SystemExit(f"{run_dir}: not a noisy-BN run (no BatchNoise layer in the model)")
    print(f"{run_dir}: test accuracy of the step-{step} weights")
    n = args.passes
    print(f"  eval mode, no noise (the default):     {describe(accuracy(model, data, False, False))}")
    print(f"  eval mode, with noise (in_eval: true):  {describe(accuracy(model, data, False, True, n))}")
    print(f"  train mode (batch statistics + noise):  {describe(accuracy(model, data, True, True, n))}")


if __name__ == "__main__":
    main()
