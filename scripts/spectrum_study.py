"""The Hessian's spectrum and the 2-D loss surface over training, with and without BN, on the
faithful miniature (docs/FINDINGS.md, "The whole spectrum").

    .venv/bin/python scripts/spectrum_study.py --out results/spectrum            # train + measure
    .venv/bin/python scripts/spectrum_study.py --out results/spectrum --table    # the tables only

Trains, with `python -m bnstudy fit`, reproduce mini's VGG-11 w1/8 (digits at 32x32x3, batch 128,
lr 0.1, 600 steps) with and without BN over --seeds seeds, and the paper's DLN (lr 1e-6, 10,000
steps) with and without BN, each keeping its trajectory at the start, middle and end
(`--trajectory.every_n_train_steps`); no instruments during training (they are measured here,
afterwards, on the same weights). Then, for every run, `python -m bnstudy spectrum --per-layer`
(the density by stochastic Lanczos quadrature, the top eigenvalue of each layer's block) and
`python -m bnstudy surface --directions random` (filter-normalized, as Li et al.) at those
three steps, on the loss the optimizer sees (train mode, the run's first batch). Prints one markdown table per
quantity from the runs' landscape/*.npz, mean +- sd over the seeds."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bnstudy.analysis.claims import stat  # noqa: E402
from bnstudy.study.reproduce import VGG_DATA, VGG_DEPTH, VGG_STEPS, VGG_WIDTH  # noqa: E402

VGG = [*VGG_DATA, f"--model.depth={VGG_DEPTH}", f"--model.width={VGG_WIDTH}",
       "--model.channels_last=true", "--model.lr=0.1", f"--trainer.max_steps={VGG_STEPS}",
       f"--trajectory.every_n_train_steps={VGG_STEPS // 2}", "--trainer.limit_val_batches=0"]
DLN_STEPS = 10_000
DLN = ["--model.lr=1e-6", f"--trainer.max_steps={DLN_STEPS}",
       f"--trajectory.every_n_train_steps={DLN_STEPS // 2}"]
ARMS = {"vgg_bn": ("vgg_bn.yaml", VGG), "vgg": ("vgg.yaml", VGG),
        "dln_bn": ("dln_bn.yaml", DLN), "dln": ("dln.yaml", DLN)}


def bnstudy(*args: str) -> None:
    print("+ bnstudy " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "bnstudy", *args], cwd=REPO, check=True)


def runs(out: Path, seeds: int) -> list[Path]:
    dirs = []
    for arm, (config, args) in ARMS.items():
        for seed in range(seeds if arm.startswith("vgg") else 1):  # DLN: one data set, one seed
            run_dir = out / f"{arm}_s{seed}"
            if not (run_dir / "checkpoints" / "last.ckpt").exists():
                bnstudy("fit", "--config", str(REPO / "configs" / config), *args,
                        "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
                        f"--seed_everything={seed}", f"--data.seed={seed}",
                        f"--run_dir={run_dir}")
            dirs.append(run_dir)
    return dirs


def table(out: Path) -> str:
    rows: dict[str, dict[int, dict[str, list[float]]]] = {}
    for run_dir in sorted(out.glob("*_s*")):
        arm = run_dir.name.rsplit("_s", 1)[0]
        folder = run_dir / "landscape"
        if not (folder / "spectrum.npz").exists():
            continue
        spec = np.load(folder / "spectrum.npz")
        for k, step in enumerate(spec["steps"]):
            cell = rows.setdefault(arm, {}).setdefault(int(step), {})
            for key in ("lambda_max", "lambda_min", "trace", "neg_mass"):
                cell.setdefault(key, []).append(float(spec[key][k]))
            if "layer_lambda_max" in spec:
                layers = spec["layer_lambda_max"][k]
                cell.setdefault("top_layer", []).append(float(np.argmax(layers) + 1))
                cell.setdefault("layer_max_over_min", []).append(
                    float(layers.max() / max(layers.min(), 1e-12)))
            surf = folder / f"surface-step{int(step)}.npz"
            if surf.exists():
                s = np.load(surf)
                loss = s["loss"]
                c = loss.shape[0] // 2
                h = float(s["coords0"][1] - s["coords0"][0])
                curv = [(loss[c + 1, c] - 2 * loss[c, c] + loss[c - 1, c]) / h ** 2,
                        (loss[c, c + 1] - 2 * loss[c, c] + loss[c, c - 1]) / h ** 2]
                cell.setdefault("surface_rise", []).append(float(np.nanmax(loss) - loss[c, c]))
                cell.setdefault("surface_curv", []).append(float(np.mean(curv)))

    keys = ("lambda_max", "lambda_min", "trace", "neg_mass", "top_layer", "layer_max_over_min",
            "surface_rise", "surface_curv")
    lines = ["| arm | step | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for arm in sorted(rows):
        for step in sorted(rows[arm]):
            cell = rows[arm][step]
            lines.append(f"| {arm} | {step} | " + " | ".join(stat(cell.get(k, [])) for k in keys) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/spectrum"))
    parser.add_argument("--seeds", type=int, default=3, help="VGG seeds per arm (default 3)")
    parser.add_argument("--n-v", type=int, default=4, help="SLQ random vectors (default 4)")
    parser.add_argument("--grid", type=int, default=21, help="surface points per axis")
    parser.add_argument("--only", default=None, help="arms to measure, e.g. vgg_bn,vgg")
    parser.add_argument("--reverse", action="store_true",
                        help="measure the runs in reverse order (a second process beside a "
                             "first one meets it in the middle)")
    parser.add_argument("--table", action="store_true", help="print the tables; run nothing")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1; got {args.seeds}")
    if not args.table:
        dirs = runs(args.out, args.seeds)
        if args.only:
            dirs = [d for d in dirs if d.name.rsplit("_s", 1)[0] in args.only.split(",")]
        if args.reverse:
            dirs = dirs[::-1]
        for d in dirs:
            if not (d / "landscape" / "spectrum.npz").exists():
                bnstudy("spectrum", str(d), "--per-layer", f"--n-v={args.n_v}", "--threads=1",
                        f"--out={args.out / 'figures'}")
            total = VGG_STEPS if d.name.startswith("vgg") else DLN_STEPS
            at = [0, total // 2, total]
            if not all((d / "landscape" / f"surface-step{s}.npz").exists() for s in at):
                # span: a filter-normalized step as long as the weights (Li et al.'s) for the
                # VGG; the DLN's loss is a product of 25 layers, so 1/20 of that
                span = 1.0 if d.name.startswith("vgg") else 0.05
                bnstudy("surface", str(d), f"--grid={args.grid}", "--threads=1",
                        "--directions=random", f"--span={span}", "--at", *map(str, at),
                        f"--out={args.out / 'figures'}")
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
