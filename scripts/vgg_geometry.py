"""Why VGG-16 without BN stays at chance on 8x8 digits and trains on the 32x32 stand-in.

    python scripts/vgg_geometry.py                 # signal at Glorot init, 8x8 vs 32x32 (seconds)
    python scripts/vgg_geometry.py --train 1000    # + 8x8 training, plain vs 1x1 convs rescaled

On 8x8 inputs the VGG skips its last two pools (the map is already 1x1) and its last six convs
run on 1x1 maps: with padding 1, a 3x3 kernel has one live tap in nine, while Glorot draws its
weights for nine. Each such layer then passes on about 1/sqrt(18) of the signal's RMS (1/9 of
the taps, 1/2 for the ReLU), against about 1/sqrt(2) for a conv on a large map. `--train` runs
8x8 digits without BN at the paper's lr 0.1 and batch 128 twice: as initialized, and with the
weights of the 1x1-map convs multiplied by 3 (restoring the variance Glorot meant). If the
rescaled network trains and the plain one does not, the dead taps are the cause.
"""
from __future__ import annotations

import argparse

import torch

from bnstudy.data import DigitsData
from bnstudy.models import VGG, init_weights


def build(size: int, channels: int, fix_1x1: bool = False, width: float = 0.125) -> VGG:
    torch.manual_seed(0)
    net = VGG(16, width, "none", in_channels=channels, image_size=size)
    init_weights(net, "glorot")
    if fix_1x1:
        h = torch.zeros(1, channels, size, size)
        with torch.no_grad():
            for m in net.features:
                if isinstance(m, torch.nn.Conv2d) and h.shape[-1] == 1:
                    m.weight.mul_(3.0)
                h = m(h)
    return net


def signal_at_init(size: int, channels: int) -> None:
    net = build(size, channels)
    x = torch.randn(128, channels, size, size)
    sides, rms, h = [], [], x
    for m in net.features:
        h = m(h)
        if isinstance(m, torch.nn.ReLU):
            sides.append(h.shape[-1])
            rms.append(h.pow(2).mean().sqrt().item())
    out = net.classifier(torch.flatten(h, 1))
    torch.nn.functional.cross_entropy(out, torch.randint(0, 10, (128,))).backward()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    rel = [c.weight.grad.norm().item() / c.weight.norm().item() for c in convs]
    print(f"{size}x{size}x{channels}: map side at conv 1..13: {sides}")
    print("  RMS after each conv+ReLU: " + " ".join(f"{v:.2g}" for v in rms))
    print(f"  logits std {out.std().item():.2g}; |grad W|/|W| conv 1 {rel[0]:.2g}, "
          f"conv 13 {rel[-1]:.2g}")


def train(fix_1x1: bool, steps: int) -> None:
    data = DigitsData(batch_size=128, seed=0)
    data.setup()
    net = build(8, 1, fix_1x1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x_test, y_test = data.test_set
    step, name = 0, "1x1 convs x3" if fix_1x1 else "as initialized"
    while step < steps:
        for x, y in data.train_dataloader():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            step += 1
            if step % 250 == 0 or step == steps:
                with torch.no_grad():
                    acc = (net(x_test).argmax(1) == y_test).float().mean().item()
                print(f"8x8, {name}: step {step} train loss {loss.item():.4f} test acc {acc:.3f}",
                      flush=True)
            if step >= steps:
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=0, metavar="STEPS",
                        help="also train on 8x8 digits, plain and with the 1x1 convs rescaled")
    args = parser.parse_args()
    torch.set_num_threads(1)
    signal_at_init(8, 1)
    signal_at_init(32, 3)
    if args.train:
        for fix in (False, True):
            train(fix, args.train)


if __name__ == "__main__":
    main()
