"""`python -m bnstudy spectrum RUN_DIR...` and `python -m bnstudy surface RUN_DIR...`: the Hessian
spectrum over a run's checkpoints and the loss surface around them, from finished (or running)
run directories.

A run's model and data come from its config.yaml through the study's own CLI (the config is
parsed as `fit` would parse it, and the model and data classes built; nothing is trained or
written into the run directory but RUN_DIR/landscape/). Its checkpoints are every
checkpoints/*.ckpt, one per step: last.ckpt and best-*.ckpt by default, and the trajectory that
`fit --trajectory.every_n_train_steps=N` (and/or `--trajectory.log_spaced=true`) writes. Both
commands measure on one fixed batch, the first training batch of the run's data (its seed's
first shuffle; the full batch for the DLN), the same for every checkpoint, in train mode.

Per run they write RUN_DIR/landscape/: spectrum.npz and spectrum.png, surface-step<N>.npz and
.png, line-<A>-<B>.npz and .png; across the runs given, the same figures side by side into --out
(BN beside no norm when both are given). With a W&B mode active (WANDB_MODE online/offline, or
an API key) the figures go to one W&B run (job type spectrum or surface) in the runs' project.
`python -m bnstudy report` picks the per-run data up and draws the side-by-side figures too.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnstudy.analysis.runs import Run, load_runs

OUT_DIR = "landscape"  # inside each run directory, and the default --out


@dataclass
class Checkpoint:
    step: int
    path: Path


def checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The run's checkpoints, one per global step (step-<N>.ckpt preferred, then last, then
    best: the same weights), in step order."""
    import torch

    def preference(path: Path) -> int:
        return 0 if path.name.startswith("step-") else 1 if path.name == "last.ckpt" else 2

    found: dict[int, Checkpoint] = {}
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt"), key=preference):
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True,
                                  mmap=True)["global_step"])
        except Exception:  # not a training checkpoint (or one being written): leave it out
            continue
        found.setdefault(step, Checkpoint(step, path))
    return [found[s] for s in sorted(found)]


_PARSER: dict = {}  # the CLI, parsed once per process (the parse is most of the start-up time)


@dataclass
class LoadedRun:
    """A run directory's model (built from its config), its fixed batch and its checkpoints."""

    run: Run
    module: object
    inputs: object
    targets: object
    checkpoints: list[Checkpoint]
    device: str
    label: str = ""
    _loaded: int | None = field(default=None, repr=False)

    @property
    def net(self):
        return self.module.net

    @property
    def loss_fn(self):
        return self.module.loss_fn

    def at(self, step: int):
        """The net with the weights (and BN buffers) of the checkpoint at `step`."""
        import torch

        if self._loaded != step:
            ckpt = next((c for c in self.checkpoints if c.step == step), None)
            if ckpt is None:
                raise ValueError(f"{self.run.path}: no checkpoint at step {step}; steps: "
                                 f"{[c.step for c in self.checkpoints]}")
            state = torch.load(ckpt.path, map_location=self.device, weights_only=True)
            self.module.load_state_dict(state["state_dict"])
            self._loaded = step
        return self.net

    def parameters_at(self, step: int) -> dict:
        return {n: p.detach().clone() for n, p in self.at(step).named_parameters()}


def load_run(run: Run, device: str) -> LoadedRun:
    from bnstudy.lightning_cli import parse_only, readable_config

    config = readable_config(run.path / "config.yaml")
    args = ["fit", "--config", config, "--trainer.logger=false", "--trainer.callbacks=[]"]
    if "cli" not in _PARSER:
        _PARSER["cli"] = parse_only(args)
        cfg = _PARSER["cli"].config
    else:
        cfg = _PARSER["cli"].parser.parse_args(args)
    parser = _PARSER["cli"].parser
    init = (getattr(parser, "instantiate", None) or parser.instantiate_classes)(cfg)["fit"]
    module, data = init.model, init.data
    data.setup("fit")
    inputs, targets = next(iter(data.train_dataloader()))
    found = checkpoints(run.path)
    if not found:
        raise ValueError(f"{run.path}: no checkpoints in {run.path / 'checkpoints'}")
    module.to(device)
    label = f"{run.norm}" + (f" lr={run.lr:g}" if run.lr else "")
    return LoadedRun(run, module, inputs.to(device), targets.to(device), found, device, label)


def run_label(runs: list[LoadedRun], r: LoadedRun) -> str:
    """The norm (and lr), with the run's directory name when two runs would share a label."""
    same = [o for o in runs if o.label == r.label]
    return r.label if len(same) == 1 else f"{r.label} ({r.run.path.name})"


def command_parser(name: str, what: str) -> argparse.ArgumentParser:
    """The options both commands take; `what` says what this one measures."""
    parser = argparse.ArgumentParser(
        prog=f"python -m bnstudy {name}", description=__doc__.split("\n\n")[0] + "\n\n"
        + f"{name}: {what}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories, globs, or folders of runs")
    parser.add_argument("--out", type=Path, default=Path(OUT_DIR),
                        help=f"folder for the figures across the runs (default: {OUT_DIR})")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random vectors")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's)")
    return parser


def start(args) -> tuple[list[LoadedRun], str]:
    """The runs of the arguments, loaded; the device."""
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|srun).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runs = load_runs(args.paths)
    if not runs:
        raise ValueError(f"no run directories (with config.yaml and metrics.csv) in {args.paths}")
    loaded = [load_run(r, device) for r in runs]
    return loaded, device


@contextmanager
def progress_bar(description: str, total: int):
    """A rich progress bar; yields advance(k)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, refresh_per_second=2, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda k=1: progress.advance(task, k), progress


def save_figure(fig, path: Path) -> Path:
    from bnstudy.analysis.drawing import pyplot

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def log_to_wandb(figures: dict[str, Path], job_type: str, runs: list[LoadedRun], out: Path,
                 tables: dict[str, tuple[list[str], list[list]]] | None = None) -> Path | None:
    """The figures (and tables) in one W&B run of `job_type` in the runs' project, when a W&B mode
    is active (as the report logs); returns its local directory."""
    from bnstudy.analysis.wandb_report import wandb_active, wandb_run

    if not wandb_active() or not figures:
        return None
    import wandb

    with wandb_run(job_type, out, [r.run for r in runs], {"runs": [r.run.id for r in runs]}) as run:
        data = {f"{job_type}/{name}": wandb.Image(str(path)) for name, path in figures.items()}
        for name, (columns, rows) in (tables or {}).items():
            data[f"{job_type}/{name}"] = wandb.Table(columns=columns, data=rows)
        run.log(data)
        return Path(run.dir).parent


def parse_params(values: list[str] | None) -> list[str | int] | None:
    """--params 3 5 features.0: layer numbers as ints, names and paths as they are."""
    if not values:
        return None
    return [int(v) if v.isdigit() else v for v in values]


def chosen_steps(run: LoadedRun, steps: list[int] | None, last_only: bool = False) -> list[int]:
    have = [c.step for c in run.checkpoints]
    if steps is None:
        return have[-1:] if last_only else have
    missing = [s for s in steps if s not in have]
    if missing:
        raise ValueError(f"{run.run.path}: no checkpoint at step(s) {missing}; steps: {have}")
    return list(steps)


def run_command(main_body, argv_parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, run, and turn bad input into one line and exit code 2."""
    args = argv_parser.parse_args(argv)
    started = time.perf_counter()
    try:
        main_body(args)
    except ValueError as err:
        if os.environ.get("BNSTUDY_DEBUG"):
            raise
        print(f"bnstudy {argv_parser.prog.split()[-1]}: error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


# --------------------------------------------------------------------------------------------
# spectrum
# --------------------------------------------------------------------------------------------
SUMMARY = ("lambda_max", "lambda_min", "trace", "trace_se", "neg_mass", "neg_mass_se",
           "quadrature_l1", "hvps")


def spectrum_parser() -> argparse.ArgumentParser:
    parser = command_parser("spectrum", "the Hessian's eigenvalue density (stochastic Lanczos "
                            "quadrature, bnstudy.instruments.hessian_density) at every checkpoint "
                            "of each run.")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="checkpoints to measure, by step (default: all)")
    parser.add_argument("--n-v", type=int, default=10, help="random vectors (default 10)")
    parser.add_argument("--m", type=int, default=40, help="Lanczos steps per vector (default 40)")
    parser.add_argument("--width", type=float, default=0.01,
                        help="Gaussian smoothing, a fraction of the spectrum's range (0.01)")
    parser.add_argument("--tol", type=float, default=None,
                        help="stop a vector's Lanczos run once its density moves by < tol (L1)")
    parser.add_argument("--params", nargs="+", default=None,
                        help="a block: layer numbers, parameter names or module paths")
    parser.add_argument("--per-layer", action="store_true",
                        help="also the top eigenvalue of every layer's block (weight and bias)")
    return parser


def measure_spectrum(run: LoadedRun, steps: list[int], args, advance) -> dict:
    from bnstudy.instruments import hessian_density, hessian_eigs, layer_names

    rows: dict[str, list] = {}
    for step in steps:
        net = run.at(step)
        started = time.perf_counter()
        result = hessian_density(net, run.loss_fn, run.inputs, run.targets, args.n_v, args.m,
                                 params=parse_params(args.params), width=args.width,
                                 tol=args.tol, seed=args.seed, progress=advance)
        result["seconds"] = time.perf_counter() - started
        if args.tol:  # products not spent count as done
            advance(args.n_v * args.m - result["hvps"])
        if args.per_layer:
            layers = layer_names(net, run.inputs)
            result["layer_lambda_max"] = np.array([hessian_eigs(
                net, run.loss_fn, run.inputs, run.targets, params=[i + 1], seed=args.seed,
            )["eigenvalues"][0] for i in range(len(layers))])
        for key in ("grid", "density", "density_se", "nodes", "weights", "moments",
                    "moments_se", "sigma", "seconds", "layer_lambda_max", *SUMMARY):
            if key in result:
                rows.setdefault(key, []).append(result[key])
    data = {k: np.stack([np.asarray(v, dtype=float) for v in vs]) for k, vs in rows.items()
            if k not in ("nodes", "weights")}
    # runs that stopped early differ in length: pad to the longest (NaN nodes, zero weights)
    width = max(n.shape[1] for n in rows["nodes"])
    data["nodes"] = np.stack([np.pad(n, ((0, 0), (0, width - n.shape[1])),
                                     constant_values=np.nan) for n in rows["nodes"]])
    data["weights"] = np.stack([np.pad(w, ((0, 0), (0, width - w.shape[1]))) for w in
                                rows["weights"]])
    data.update(steps=np.array(steps), n=np.array(result["n"]), n_v=np.array(args.n_v),
                m=np.array(args.m), width=np.array(args.width))
    return data


def spectrum_body(args) -> None:
    from bnstudy.analysis.figures import spectrum_figure, spectrum_over_training

    runs, _ = start(args)
    steps = {id(r): chosen_steps(r, args.steps) for r in runs}
    total = sum(len(s) for s in steps.values()) * args.n_v * args.m
    figures, entries, table = {}, [], []
    with progress_bar("Hessian-vector products", total) as (advance, progress):
        for r in runs:
            data = measure_spectrum(r, steps[id(r)], args, advance)
            label = run_label(runs, r)
            folder = r.run.path / OUT_DIR
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(folder / "spectrum.npz", **data)
            path = save_figure(spectrum_over_training(label, data), folder / "spectrum.png")
            figures[f"{r.run.path.name}/spectrum"] = path
            entries.append((label, r.run.norm, data))
            for k, step in enumerate(data["steps"]):
                table.append([r.run.id, label, int(step)] + [float(data[s][k]) for s in SUMMARY])
            progress.console.print(f"{r.run.id}: wrote {folder / 'spectrum.npz'} and "
                                   f"{path.name}; lambda_max at step {int(data['steps'][-1])}: "
                                   f"{float(data['lambda_max'][-1]):.4g}")
    figures["spectrum"] = save_figure(spectrum_figure(entries), args.out / "spectrum.png")
    print(f"wrote {figures['spectrum']}")
    log_to_wandb(figures, "spectrum", runs, args.out,
                 {"summary": (["run", "label", "step", *SUMMARY], table)})


def spectrum_main(argv: list[str] | None = None) -> int:
    return run_command(spectrum_body, spectrum_parser(), argv)


# --------------------------------------------------------------------------------------------
# surface
# --------------------------------------------------------------------------------------------
DIRECTIONS = ("auto", "random", "pca", "hessian")


def surface_parser() -> argparse.ArgumentParser:
    parser = command_parser("surface", "the loss on a grid around a checkpoint of each run "
                            "(bnstudy.instruments.loss_surface), with the run's trajectory (its "
                            "checkpoints) projected onto the plane.")
    parser.add_argument("--grid", type=int, default=41, help="points per axis (default 41)")
    parser.add_argument("--span", type=float, default=None,
                        help="the grid covers [-span, span] (default 1: a step as long as the "
                             "weights; pca: the trajectory's extent and a quarter more)")
    parser.add_argument("--directions", choices=DIRECTIONS, default="auto",
                        help="random: two filter-normalized Gaussian directions (Li et al.); "
                             "pca: the top two principal directions of the trajectory; hessian:"
                             " the top two Hessian eigenvectors at the center; auto (default): "
                             "pca when the run has 3 or more checkpoints, else random")
    parser.add_argument("--at", type=int, nargs="+", default=None,
                        help="the checkpoints (steps) to center grids at (default: the last)")
    parser.add_argument("--mode", choices=("train", "eval"), default="train",
                        help="train (default): BN with the batch's statistics, the loss the "
                             "optimizer sees; eval: with the running statistics")
    parser.add_argument("--norm", choices=("filter", "layer", "none"), default="filter",
                        help="random directions' normalization (default filter)")
    parser.add_argument("--bias-bn", choices=("zero", "keep"), default="zero",
                        help="biases and BN parameters in random and PCA directions: zero "
                             "(default, as Li et al.'s figures) or keep")
    parser.add_argument("--part", default=None, metavar="I/N",
                        help="compute only part I of N of each grid (Slurm array task I, 0-based;"
                             " e.g. --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    parser.add_argument("--merge", action="store_true",
                        help="merge the parts written by --part I/N runs, then draw")
    parser.add_argument("--line", type=int, nargs=2, default=None, metavar=("A", "B"),
                        help="instead of a surface: the loss on the line from the checkpoint at "
                             "step A (0) to step B (1), --grid points in [-0.5, 1.5]")
    return parser


def parse_part(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--part must be I/N (e.g. 0/4); got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--part I/N needs 0 <= I < N; got {text}")
    return i, n


def directions_for(run: LoadedRun, step: int, kind: str, args) -> tuple[list[dict], dict]:
    """The grid's two directions at the checkpoint `step`, and what to save about them."""
    from bnstudy.instruments import filter_normalized_direction, hessian_eigs, pca_directions
    from bnstudy.instruments.vectors import total_norm

    net = run.at(step)
    if kind == "random":
        return [filter_normalized_direction(net, args.seed + i, norm=args.norm,
                                            bias_bn=args.bias_bn) for i in range(2)], {}
    if kind == "hessian":
        eigs = hessian_eigs(net, run.loss_fn, run.inputs, run.targets, k=2, seed=args.seed)
        scale = total_norm([p.detach() for p in net.parameters() if p.requires_grad])
        vectors = [{n: t * scale for n, t in v.items()} for v in eigs["vectors"]]
        return vectors, {"eigenvalues": np.array(eigs["eigenvalues"])}
    center = run.parameters_at(step)
    points = [run.parameters_at(c.step) for c in run.checkpoints]
    found, ratios = pca_directions(points, center, bias_bn=args.bias_bn)
    return found, {"explained_variance_ratio": ratios}


def fingerprint(directions: list[dict]) -> np.ndarray:
    """Sums and squared norms of the directions: parts of one grid must have the same ones."""
    return np.array([[float(sum(t.double().sum() for t in d.values())),
                      float(sum(t.double().pow(2).sum() for t in d.values()))]
                     for d in directions])


def surface_files(folder: Path, step: int, part: tuple[int, int] | None) -> Path:
    name = f"surface-step{step}" + (f".part{part[0]}of{part[1]}" if part else "")
    return folder / f"{name}.npz"


def measure_surface(run: LoadedRun, step: int, args, part, advance) -> dict:
    from bnstudy.instruments import loss_surface, project

    kind = args.directions
    if kind == "auto":
        kind = "pca" if len(run.checkpoints) >= 3 else "random"
    directions, extra = directions_for(run, step, kind, args)
    center = run.parameters_at(step)
    points = [run.parameters_at(c.step) for c in run.checkpoints]
    trajectory = project(points, center, directions)
    if args.span is None and kind == "pca":
        lo, hi = trajectory.min(0), trajectory.max(0)
        pad = 0.25 * np.maximum(hi - lo, 1e-12)
        coords = [np.linspace(lo[i] - pad[i], hi[i] + pad[i], args.grid) for i in range(2)]
    else:
        span = 1.0 if args.span is None else args.span
        coords = [np.linspace(-span, span, args.grid) for _ in range(2)]
    net = run.at(step)
    result = loss_surface(net, run.loss_fn, run.inputs, run.targets, directions, coords,
                          mode=args.mode, part=part, progress=advance)
    return {"coords0": coords[0], "coords1": coords[1], "loss": result["loss"],
            "done": result["done"], "mode": np.array(args.mode), "directions": np.array(kind),
            "center_step": np.array(step), "trajectory": trajectory,
            "trajectory_steps": np.array([c.step for c in run.checkpoints]),
            "part": np.array(result["part"]), "evaluations": np.array(result["evaluations"]),
            "fingerprint": fingerprint(directions), **extra}


def merge_parts(folder: Path, step: int) -> dict:
    from bnstudy.analysis.figures import load_npz
    from bnstudy.instruments import merge_surfaces

    files = sorted(folder.glob(f"surface-step{step}.part*of*.npz"))
    if not files:
        raise ValueError(f"{folder}: no parts surface-step{step}.part*of*.npz to merge")
    parts = [load_npz(f) for f in files]
    counts = {int(p["part"][1]) for p in parts}
    if len(counts) != 1:
        raise ValueError(f"{folder}: parts of different splits {sorted(counts)} for step {step}")
    for p in parts[1:]:
        if not np.allclose(p["fingerprint"], parts[0]["fingerprint"], rtol=1e-6):
            raise ValueError(f"{folder}: the parts' directions differ (step {step}); rerun them "
                             "on one kind of machine, or with --directions random")
    merged = merge_surfaces([{**p, "coords": [p["coords0"], p["coords1"]],
                              "part": tuple(p["part"]), "mode": str(p["mode"])} for p in parts])
    out = {**parts[0], "loss": merged["loss"], "done": merged["done"],
           "part": np.array((0, 1)), "evaluations": np.array(merged["evaluations"])}
    return out


def line_body(runs: list[LoadedRun], args) -> None:
    from bnstudy.analysis.figures import line_figure
    from bnstudy.instruments import interpolate

    a, b = args.line
    figures, entries = {}, []
    with progress_bar("grid points", args.grid * len(runs)) as (advance, progress):
        for r in runs:
            chosen_steps(r, [a, b])
            target = r.parameters_at(b)
            alphas = np.linspace(-0.5, 1.5, args.grid)
            result = interpolate(r.at(a), r.loss_fn, r.inputs, r.targets, target, alphas,
                                 mode=args.mode, progress=advance)
            data = {"coords0": alphas, "loss": result["loss"], "from_step": np.array(a),
                    "to_step": np.array(b), "mode": np.array(args.mode)}
            label = run_label(runs, r)
            folder = r.run.path / OUT_DIR
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(folder / f"line-{a}-{b}.npz", **data)
            figures[f"{r.run.path.name}/line"] = save_figure(
                line_figure([(label, r.run.norm, data)]), folder / f"line-{a}-{b}.png")
            entries.append((label, r.run.norm, data))
            progress.console.print(f"{r.run.id}: wrote {folder / f'line-{a}-{b}.npz'}")
    figures["line"] = save_figure(line_figure(entries), args.out / f"line-{a}-{b}.png")
    print(f"wrote {figures['line']}")
    log_to_wandb(figures, "surface", runs, args.out)


def surface_body(args) -> None:
    from bnstudy.analysis.figures import load_npz, surface_figure

    part = parse_part(args.part)
    if part and args.merge:
        raise ValueError("give --part (compute a part) or --merge (merge the parts), not both")
    if args.grid < 2:
        raise ValueError(f"--grid must be >= 2; got {args.grid}")
    if args.merge:
        runs = [LoadedRun(r, None, None, None, checkpoints(r.path), "cpu",
                          f"{r.norm}" + (f" lr={r.lr:g}" if r.lr else ""))
                for r in load_runs(args.paths)]
    else:
        runs, _ = start(args)
    if args.line:
        return line_body(runs, args)
    centers = {id(r): chosen_steps(r, args.at, last_only=True) for r in runs}
    figures, entries = {}, []
    total = sum(len(c) for c in centers.values()) * args.grid ** 2 // (part[1] if part else 1)
    with progress_bar("grid points", 0 if args.merge else total) as (advance, progress):
        for r in runs:
            label = run_label(runs, r)
            folder = r.run.path / OUT_DIR
            folder.mkdir(parents=True, exist_ok=True)
            for step in centers[id(r)]:
                if args.merge:
                    data = merge_parts(folder, step)
                else:
                    data = measure_surface(r, step, args, part, advance)
                path = surface_files(folder, step, part)
                np.savez(path, **data)
                progress.console.print(f"{r.run.id}: wrote {path}")
                if part:
                    continue  # drawn once the parts are merged
                figures[f"{r.run.path.name}/surface-step{step}"] = save_figure(
                    surface_figure([(label, r.run.norm, data)]), path.with_suffix(".png"))
            if not part:
                entries.append((label, r.run.norm, load_npz(path)))
    if part:
        print(f"part {part[0]} of {part[1]} written; merge with --merge when all are done")
        return
    figures["surface"] = save_figure(surface_figure(entries), args.out / "surface.png")
    print(f"wrote {figures['surface']}")
    log_to_wandb(figures, "surface", runs, args.out)


def surface_main(argv: list[str] | None = None) -> int:
    return run_command(surface_body, surface_parser(), argv)
