"""The Hessian's eigenvalue density (stochastic Lanczos quadrature) against the dense float64
Hessian and an exact oracle; per-layer blocks of hessian_eigs/trace/density against the dense
block; the Spectrum instrument in real fits (training unchanged bit for bit, W&B histogram)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from bnstudy import probes
from bnstudy.spectrum import Spectrum, hessian_density, smoothed_density
from test_curvature import TWINS, conv_bn, quadratic, SPECTRUM


def dense_density(eigenvalues: np.ndarray, result: dict) -> np.ndarray:
    """The dense eigenvalues' smoothed histogram on the result's grid with its sigma."""
    n = len(eigenvalues)
    return smoothed_density(eigenvalues[None], np.full((1, n), 1.0 / n), result["grid"],
                            result["sigma"])[0]


def l1(a: np.ndarray, b: np.ndarray, grid: np.ndarray) -> float:
    return float(np.abs(a - b).sum() * (grid[1] - grid[0]))


@pytest.mark.parametrize("case", list(TWINS))
def test_density_moments_and_curve_equal_the_dense_twin(case):
    """Moments tr(H^k)/n, k = 1..4, within 3 standard errors of the dense float64 Hessian's;
    the smoothed density within L1 (the densities integrate to 1) of twice the distance its own
    error bars predict (sqrt(2/pi) x the summed pointwise standard error, the mean |error| of a
    Gaussian) plus its quadrature change: sampling over vectors is the only error left."""
    model, loss_fn, x, y = TWINS[case]()
    hess, _ = probes.hessian_dense(model, loss_fn, x, y)
    eigenvalues = torch.linalg.eigvalsh(hess).numpy()
    n = len(eigenvalues)
    result = hessian_density(model, loss_fn, x, y, n_v=40, m=60, seed=1)
    assert result["n"] == n and result["n_v"] == 40
    assert result["hvps"] == sum(result["steps"]) and max(result["steps"]) <= 60
    exact = np.array([np.mean(eigenvalues ** k) for k in range(1, 5)])
    assert np.all(result["moments_se"] > 0)
    assert np.all(np.abs(result["moments"] - exact) <= 3 * result["moments_se"]), (
        (result["moments"] - exact) / result["moments_se"])
    assert abs(result["trace"] - float(hess.trace())) <= 3 * result["trace_se"]
    grid = result["grid"]
    assert l1(result["density"], result["density"] * 0, grid) == pytest.approx(1, abs=1e-3)
    predicted = math.sqrt(2 / math.pi) * float(result["density_se"].sum() * (grid[1] - grid[0]))
    distance = l1(result["density"], dense_density(eigenvalues, result), grid)
    assert result["quadrature_l1"] < 0.01
    assert distance <= 2 * predicted + result["quadrature_l1"], (distance, predicted)
    # the extremes: Lanczos finds them first
    assert result["lambda_max"] == pytest.approx(eigenvalues[-1], rel=1e-4)
    assert result["lambda_min"] == pytest.approx(eigenvalues[0], rel=1e-3, abs=1e-4)
    negative = float(np.mean(eigenvalues < -1e-4 * np.abs(eigenvalues).max()))
    assert abs(result["neg_mass"] - negative) <= 3 * result["neg_mass_se"] + 0.02


def test_diagonal_quadratic_is_exact():
    """On a diagonal Hessian every Rademacher vector sees the whole spectrum with equal weights:
    the quadrature nodes are the eigenvalues, each of weight 1/n, the moments exact (se 0)."""
    model, loss_fn, x, y, _, _ = quadratic(SPECTRUM, diagonal=True)
    result = hessian_density(model, loss_fn, x, y, n_v=3, m=20)
    n = len(SPECTRUM)
    assert result["steps"] == [n] * 3  # the Krylov space is exhausted after n steps
    for nodes, weights in zip(result["nodes"], result["weights"]):
        assert nodes == pytest.approx(sorted(SPECTRUM), abs=1e-12)
        assert weights == pytest.approx([1 / n] * n, abs=1e-12)
    exact = [np.mean(np.array(SPECTRUM) ** k) for k in range(1, 5)]
    assert result["moments"] == pytest.approx(exact, rel=1e-12)
    assert result["moments_se"] == pytest.approx([0] * 4, abs=1e-9)
    assert result["neg_mass"] == pytest.approx(1 / n, abs=1e-12)  # the -6
    assert result["lambda_max"] == pytest.approx(4.0, rel=1e-12)
    assert result["quadrature_l1"] == 0  # exhausted: exact
    # a rotated quadratic: moments exact only in expectation, the extremes still exact
    model, loss_fn, x, y, _, _ = quadratic(SPECTRUM)
    rotated = hessian_density(model, loss_fn, x, y, n_v=3, m=20)
    assert rotated["lambda_min"] == pytest.approx(-6.0, rel=1e-10)
    assert rotated["moments_se"][1] > 0


def test_an_early_stop_at_tol_keeps_the_density():
    model, loss_fn, x, y = TWINS["conv_bn"]()
    full = hessian_density(model, loss_fn, x, y, n_v=3, m=100)
    early = hessian_density(model, loss_fn, x, y, n_v=3, m=100, tol=1e-3, grid=full["grid"],
                            sigma=full["sigma"])
    assert max(early["steps"]) < max(full["steps"])
    assert early["hvps"] < full["hvps"]
    assert l1(early["density"], full["density"], full["grid"]) < 5e-3
    assert early["moments"] == pytest.approx(full["moments"], rel=1e-6)  # exact from m = 3 on


def block(hess: torch.Tensor, names: list[str], model, chosen: list[str]) -> torch.Tensor:
    """The rows and columns of the dense Hessian that belong to the `chosen` parameters."""
    sizes = [model.get_parameter(n).numel() for n in names]
    offsets = np.cumsum([0] + sizes)
    index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names)
                       if n in chosen])
    return hess[index][:, index]


def test_parameter_selections_name_what_the_docs_say():
    model, _, x, _ = conv_bn()  # Conv, BN, ReLU, Conv, BN, ReLU, Flatten, Linear
    names = probes.parameter_names
    assert names(model, x) == [n for n, _ in model.named_parameters()]
    assert names(model, x, [1]) == ["0.weight", "0.bias"]  # layer 1: the first conv
    assert names(model, x, [3, 1]) == ["0.weight", "0.bias", "7.weight", "7.bias"]
    assert names(model, x, ["1"]) == ["1.weight", "1.bias"]  # a module path: its BN
    assert names(model, x, ["3.weight", 2]) == ["3.weight", "3.bias"]
    assert names(model, x, 2) == ["3.weight", "3.bias"]
    with pytest.raises(ValueError, match="layer number 4 out of range 1..3"):
        names(model, x, [4])
    with pytest.raises(ValueError, match="'nope' is neither a layer number"):
        names(model, x, ["nope"])
    with pytest.raises(ValueError, match="'2' selects no trainable parameter"):
        names(model, x, ["2"])  # the ReLU
    model[0].bias.requires_grad_(False)
    assert names(model, x, [1]) == ["0.weight"]


@pytest.mark.parametrize("params", [[2], ["1", "7.bias"]], ids=["layer", "paths"])
def test_blocks_equal_the_dense_submatrix(params):
    model, loss_fn, x, y = conv_bn()
    hess, names = probes.hessian_dense(model, loss_fn, x, y)
    chosen = probes.parameter_names(model, x, params)
    sub = block(hess, names, model, chosen)
    eigenvalues = torch.linalg.eigvalsh(sub).numpy()
    eigs = probes.hessian_eigs(model, loss_fn, x, y, k=2, tol=1e-6, params=params)
    assert eigs["eigenvalues"] == pytest.approx(eigenvalues[::-1][:2].tolist(), rel=1e-4)
    assert sorted(eigs["vectors"][0]) == sorted(chosen)
    trace = probes.hessian_trace(model, loss_fn, x, y, samples=64, params=params)
    assert abs(trace["trace"] - float(sub.trace())) <= 3 * trace["se"]
    density = hessian_density(model, loss_fn, x, y, n_v=30, m=40, params=params, seed=2)
    assert density["n"] == len(eigenvalues) and density["names"] == chosen
    exact = np.array([np.mean(eigenvalues ** k) for k in range(1, 5)])
    assert np.all(np.abs(density["moments"] - exact) <= 3 * density["moments_se"] + 1e-12)
    # the block is not the whole Hessian's top eigenvalue
    whole = float(torch.linalg.eigvalsh(hess)[-1])
    assert eigs["eigenvalues"][0] < whole * (1 - 1e-3)


def test_a_diverged_model_gives_nan_not_an_error():
    model, loss_fn, x, y = TWINS["mlp_bn"]()
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    result = hessian_density(model, loss_fn, x, y, n_v=2, m=5)
    assert math.isnan(result["lambda_max"]) and math.isnan(result["trace"])


def test_bad_arguments_say_what_is_wrong():
    model, loss_fn, x, y = TWINS["mlp_bn"]()
    with pytest.raises(ValueError, match="n_v must be >= 1"):
        hessian_density(model, loss_fn, x, y, n_v=0)
    with pytest.raises(ValueError, match="m must be >= 1"):
        hessian_density(model, loss_fn, x, y, m=0)
    with pytest.raises(ValueError, match="width must be > 0"):
        hessian_density(model, loss_fn, x, y, width=0)
    with pytest.raises(ValueError, match="n_v must be >= 2"):
        Spectrum(n_v=1)


# ---- the instrument in real fits ----------------------------------------------------------------
def test_spectrum_in_a_fit_leaves_training_unchanged_and_equals_the_function():
    from test_instruments import Recorder, images, same_state, trainer, vgg_module

    from bnstudy.instruments import Curvature, Instruments

    inst = Instruments([Spectrum(every=2, log_spaced=False, n_v=2, m=4),
                        Curvature(every=2, log_spaced=False, max_iter=3)])
    rec = Recorder()
    runs = []
    for callbacks in ([inst, rec], []):
        module = vgg_module(momentum=0.9)  # noisy BN, momentum
        tr = trainer(4, callbacks)
        tr.fit(module, images())
        runs.append((module.state_dict(), tr.optimizers[0].state_dict()))
    assert same_state(runs[0][0], runs[1][0]) and same_state(runs[0][1], runs[1][1])
    assert [s for s, _ in inst.history] == [0, 2]
    for step, metrics in inst.history:
        r = rec.steps[step]
        twin = hessian_density(r["net"], module.loss_fn, *r["batch"], n_v=2, m=4,
                               seed=step)  # the instrument's seed: 0 * 1000003 + step
        for key in ("lambda_max", "lambda_min", "trace", "trace_se", "neg_mass"):
            assert metrics[f"spec/{key}"] == pytest.approx(twin[key], rel=1e-6, abs=1e-9)
        assert metrics["spec/hvps"] == 8 and metrics["time/spec"] > 0


def test_the_density_goes_to_wandb_as_a_histogram(tmp_path, monkeypatch):
    import wandb
    import wandb_records
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    from test_instruments import images, trainer, vgg_module

    from bnstudy.instruments import Instruments

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="bnstudy-test")
    inst = Instruments([Spectrum(every=1, log_spaced=False, n_v=2, m=3)])
    trainer(2, [inst], logger=[logger, CSVLogger(tmp_path)]).fit(vgg_module(norm="batch"),
                                                                  images())
    logger.experiment.finish()
    rows = [r for r in wandb_records.history(tmp_path) if "spec/density" in r]
    assert len(rows) == 2
    hist = rows[-1]["spec/density"]
    assert hist["_type"] == "histogram" and len(hist["values"]) == 64
    assert sum(hist["values"]) == pytest.approx(1, abs=1e-6)  # the quadrature's mass
    csv_rows = [r for r in wandb_records.history(tmp_path) if "spec/neg_mass" in r]
    assert len(csv_rows) == 2 and all(0 <= r["spec/neg_mass"] <= 1 for r in csv_rows)


# ---- python -m bnstudy spectrum on real run directories ------------------------------------------
TRAJECTORY_ARGS = ["--trainer.max_steps=6", "--data.num_samples=64", "--data.steps_per_epoch=3",
                   "--model.depth=6", "--trainer.log_every_n_steps=1",
                   "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                   "--trajectory.every_n_train_steps=3", "--trajectory.log_spaced=true"]


@pytest.fixture(scope="session")
def trajectory_runs(tmp_path_factory):
    """Two short DLN fits (no norm, BN) that keep their trajectory as checkpoints, with the
    Spectrum instrument (from a YAML config, in place of the paper's instruments) every 3 steps."""
    from bnstudy.cli import cli_main
    from conftest import REPO

    root = tmp_path_factory.mktemp("trajectory_runs")
    spectrum = root / "spectrum.yaml"
    spectrum.write_text(
        "trainer:\n  callbacks:\n    - class_path: bnstudy.instruments.Instruments\n"
        "      init_args:\n        probes:\n          - class_path: bnstudy.spectrum.Spectrum\n"
        "            init_args: {n_v: 2, m: 6, every: 3, log_spaced: false}\n")
    previous = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "disabled"
    try:
        for norm in ("none", "batch"):
            cli_main(["fit", "--config", str(REPO / "configs" / "dln.yaml"), "--config",
                      str(spectrum), *TRAJECTORY_ARGS, f"--model.norm={norm}",
                      f"--run_dir={root / norm}"])
    finally:
        os.environ["WANDB_MODE"] = previous if previous is not None else "offline"
    return root


def checkpoint_twin(run_dir, step: int):
    """The run's DLN and full batch built by hand (not through the CLI), at the checkpoint of
    `step`: what the command must have measured."""
    import yaml

    from bnstudy.data import GaussianRegressionData
    from bnstudy.modules import DLNModule

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    args = config["model"]["init_args"]
    module = DLNModule(depth=args["depth"], norm=args["norm"], reduction=args["reduction"])
    path = next(p for p in (run_dir / "checkpoints").glob("*.ckpt")
                if torch.load(p, weights_only=True)["global_step"] == step)
    module.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    data = GaussianRegressionData(dim=10, num_samples=64, seed=0, steps_per_epoch=3)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    return module.net, module.loss_fn, x, y


def test_spectrum_command_measures_every_checkpoint_draws_and_logs(trajectory_runs, tmp_path,
                                                                   monkeypatch):
    import wandb
    import wandb_records

    from bnstudy.cli import main
    from bnstudy.landscape_figures import load
    from bnstudy.report import FIGURES, build_report
    from bnstudy.runs import load_runs
    from test_cli import read_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()
    out = tmp_path / "out"
    rc = main(["spectrum", str(trajectory_runs / "none"), str(trajectory_runs / "batch"),
               "--n-v", "2", "--m", "6", "--per-layer", "--out", str(out)])
    assert rc == 0
    for norm in ("none", "batch"):
        folder = trajectory_runs / norm / "landscape"
        data = load(folder / "spectrum.npz")
        # step 0 (the init), the log-spaced 1, 2, 4, every 3 (3, 6), last.ckpt (6): one each
        assert data["steps"].tolist() == [0, 1, 2, 3, 4, 6]
        assert data["density"].shape == (6, 512) and data["nodes"].shape[:2] == (6, 2)
        assert data["layer_lambda_max"].shape == (6, 6)
        twin = hessian_density(*checkpoint_twin(trajectory_runs / norm, 4), n_v=2, m=6)
        k = data["steps"].tolist().index(4)
        for key in ("lambda_max", "trace", "neg_mass"):
            assert data[key][k] == pytest.approx(twin[key], rel=1e-6, abs=1e-12)
        np.testing.assert_allclose(data["density"][k], twin["density"], rtol=1e-6, atol=1e-15)
        # the instrument in the fit measured W^3 (checkpoint step-3) on the same full batch
        logged = {int(r["step"]): float(r["spec/lambda_max"]) for r in
                  read_metrics(trajectory_runs / norm) if r.get("spec/lambda_max")}
        assert sorted(logged) == [0, 3]
        at3 = hessian_density(*checkpoint_twin(trajectory_runs / norm, 3), n_v=2, m=6, seed=3)
        assert logged[3] == pytest.approx(at3["lambda_max"], rel=1e-6)
        layer = probes.hessian_eigs(*checkpoint_twin(trajectory_runs / norm, 6), params=[3])
        assert data["layer_lambda_max"][-1][2] == pytest.approx(layer["eigenvalues"][0],
                                                                rel=1e-6)
        assert (folder / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "spectrum.png").stat().st_size > 10_000
    # the same figures in W&B (offline files), and the report draws the side-by-side figure
    logged = {k for row in wandb_records.history(out) for k in row}
    assert {"spectrum/spectrum", "spectrum/none/spectrum", "spectrum/summary"} <= logged
    spec = next(s for s in FIGURES if s.name == "q_spectrum")
    runs = load_runs([trajectory_runs])
    assert sorted(r.id for r in spec.runs(runs)) == ["batch", "none"]
    report = build_report([], tmp_path / "report", runs=runs, wandb=False, figures=[spec],
                          echo=lambda line: None)
    assert report.figures["q_spectrum"].stat().st_size > 10_000


def test_spectrum_command_says_what_is_wrong_in_one_line(trajectory_runs, tmp_path, capsys):
    from bnstudy.cli import main

    assert main(["spectrum", str(trajectory_runs / "none"), "--steps", "5", "--out",
                 str(tmp_path)]) == 2
    assert "no checkpoint at step(s) [5]" in capsys.readouterr().err
    assert main(["spectrum", str(tmp_path / "nothing")]) == 2
    assert "no run directories" in capsys.readouterr().err
