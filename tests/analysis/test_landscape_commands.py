"""`python -m bnstudy spectrum` and `surface` (bnstudy/analysis/landscape_commands.py) on real run
directories: two short DLN fits (no norm, BN) that keep their trajectory, the commands' npz against
twins built by hand from the checkpoints, the figures, W&B (offline files), Slurm-array parts and
their merge, one-line errors, and the report's q_spectrum and q_surface from the saved data."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from bnstudy import probes
from bnstudy.analysis.figures import FIGURES, load_npz
from bnstudy.analysis.report import build_report
from bnstudy.analysis.runs import load_runs
from bnstudy.cli import cli_main, main
from bnstudy.instruments import hessian_density
from conftest import REPO
from tiny_fits import read_metrics

pytestmark = pytest.mark.slow  # every test reads the runs of two CLI fits

TRAJECTORY_ARGS = ["--trainer.max_steps=6", "--data.num_samples=64", "--data.steps_per_epoch=3",
                   "--model.depth=6", "--trainer.log_every_n_steps=1",
                   "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                   "--trajectory.every_n_train_steps=3", "--trajectory.log_spaced=true"]


@pytest.fixture(scope="session")
def trajectory_runs(tmp_path_factory):
    """Two short DLN fits (no norm, BN) that keep their trajectory as checkpoints, with the
    Spectrum instrument (from a YAML config, in place of the paper's instruments) every 3 steps."""
    root = tmp_path_factory.mktemp("trajectory_runs")
    spectrum = root / "spectrum.yaml"
    spectrum.write_text(
        "trainer:\n  callbacks:\n    - class_path: bnstudy.instruments.Instruments\n"
        "      init_args:\n        probes:\n          - class_path: bnstudy.instruments.Spectrum\n"
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


def loss_at(twin, mode: str = "train") -> float:
    net, loss_fn, x, y = twin
    with torch.no_grad():
        return float(loss_fn(net.train(mode == "train")(x), y))


def test_spectrum_command_measures_every_checkpoint_draws_and_logs(trajectory_runs, tmp_path,
                                                                   monkeypatch):
    import wandb
    import wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()
    out = tmp_path / "out"
    rc = main(["spectrum", str(trajectory_runs / "none"), str(trajectory_runs / "batch"),
               "--n-v", "2", "--m", "6", "--per-layer", "--out", str(out)])
    assert rc == 0
    for norm in ("none", "batch"):
        folder = trajectory_runs / norm / "landscape"
        data = load_npz(folder / "spectrum.npz")
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


def test_spectrum_command_on_a_block_with_an_early_stop(trajectory_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = trajectory_runs / "batch"
    assert main(["spectrum", str(run), "--steps", "0", "6", "--params", "2", "--n-v", "2",
                 "--m", "30", "--tol", "0.1", "--seed", "4", "--out", str(tmp_path)]) == 0
    data = load_npz(run / "landscape" / "spectrum.npz")
    assert data["steps"].tolist() == [0, 6]
    for k, step in enumerate((0, 6)):
        twin = hessian_density(*checkpoint_twin(run, step), n_v=2, m=30, params=[2], tol=0.1,
                               seed=4)
        assert twin["n"] == 100 and int(data["n"]) == 100  # layer 2: a 10 x 10 weight
        assert data["hvps"][k] == twin["hvps"] < 60  # stopped early, as the function does
        assert data["lambda_max"][k] == pytest.approx(twin["lambda_max"], rel=1e-6)


def test_a_run_whose_config_holds_a_number_like_id_bare_still_loads(trajectory_runs, tmp_path,
                                                                   monkeypatch):
    # config.yaml written before its strings were quoted: PyYAML wrote the W&B id 323174e6 bare,
    # and jsonargparse reads that as a float, so the config no longer parsed
    import shutil

    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "old_run"
    shutil.copytree(trajectory_runs / "none", run, ignore=shutil.ignore_patterns("landscape"))
    config = run / "config.yaml"
    text, n = re.subn(r"(\n\s+id: ).*\n", r"\g<1>323174e6\n", config.read_text(), count=1)
    assert n == 1
    config.write_text(text)
    assert main(["spectrum", str(run), "--steps", "6", "--n-v", "2", "--m", "6", "--out",
                 str(tmp_path / "out")]) == 0
    assert load_npz(run / "landscape" / "spectrum.npz")["steps"].tolist() == [6]


def test_spectrum_command_says_what_is_wrong_in_one_line(trajectory_runs, tmp_path, capsys):
    assert main(["spectrum", str(trajectory_runs / "none"), "--steps", "5", "--out",
                 str(tmp_path)]) == 2
    assert "no checkpoint at step(s) [5]" in capsys.readouterr().err
    assert main(["spectrum", str(tmp_path / "nothing")]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_surface_command_draws_the_trajectory_and_splits_into_parts(trajectory_runs, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    runs = [str(trajectory_runs / n) for n in ("none", "batch")]
    out = tmp_path / "out"
    assert main(["surface", *runs, "--grid", "5", "--out", str(out)]) == 0
    folder = trajectory_runs / "batch" / "landscape"
    whole = load_npz(folder / "surface-step6.npz")
    assert str(whole["directions"]) == "pca"  # auto: 6 checkpoints
    assert whole["loss"].shape == (5, 5) and np.isfinite(whole["loss"]).all()
    # the trajectory: one point per checkpoint, the last (the center) at the origin
    assert whole["trajectory_steps"].tolist() == [0, 1, 2, 3, 4, 6]
    np.testing.assert_allclose(whole["trajectory"][-1], [0, 0], atol=1e-9)
    # the grid covers the trajectory
    for axis in range(2):
        coords, path = whole[f"coords{axis}"], whole["trajectory"][:, axis]
        assert coords.min() < path.min() <= path.max() < coords.max()
    assert (folder / "surface-step6.png").stat().st_size > 10_000
    assert (out / "surface.png").stat().st_size > 10_000
    # two Slurm array tasks and a merge give the same grid, bit for bit
    for i in range(2):
        assert main(["surface", runs[1], "--grid", "5", "--part", f"{i}/2", "--out",
                     str(out)]) == 0
    assert sorted(p.name for p in folder.glob("*.part*")) == [
        "surface-step6.part0of2.npz", "surface-step6.part1of2.npz"]
    (folder / "surface-step6.npz").unlink()
    assert main(["surface", runs[1], "--merge", "--out", str(out)]) == 0
    merged = load_npz(folder / "surface-step6.npz")
    assert np.array_equal(merged["loss"], whole["loss"])
    # the report draws the side-by-side figure from the saved data
    spec = next(s for s in FIGURES if s.name == "q_surface")
    report = build_report([], tmp_path / "report", runs=load_runs([trajectory_runs]),
                          wandb=False, figures=[spec], echo=lambda line: None)
    assert report.figures["q_surface"].stat().st_size > 10_000


def test_surface_command_random_directions_and_a_line(trajectory_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = trajectory_runs / "none"
    assert main(["surface", str(run), "--grid", "3", "--directions", "random", "--at", "3",
                 "--out", str(tmp_path)]) == 0
    data = load_npz(run / "landscape" / "surface-step3.npz")
    assert data["coords0"].tolist() == [-1, 0, 1]
    assert data["loss"][1, 1] == pytest.approx(loss_at(checkpoint_twin(run, 3)), rel=1e-6)
    assert main(["surface", str(run), "--line", "0", "6", "--grid", "5", "--out",
                 str(tmp_path)]) == 0
    line = load_npz(run / "landscape" / "line-0-6.npz")
    assert line["coords0"].tolist() == [-0.5, 0, 0.5, 1, 1.5]
    for alpha, step in ((1, 0), (3, 6)):
        assert line["loss"][alpha] == pytest.approx(loss_at(checkpoint_twin(run, step)),
                                                    rel=1e-5)
    assert (tmp_path / "line-0-6.png").stat().st_size > 10_000


def test_surface_command_along_hessian_eigenvectors_in_eval_mode(trajectory_runs, tmp_path,
                                                                 monkeypatch):
    """--directions hessian: the top two eigenvectors at the center, scaled to the weights' norm;
    --mode eval: BN with the checkpoint's running statistics. The grid equals the deep-copy twin
    along those directions, on the checkpoint built by hand."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = trajectory_runs / "batch"
    assert main(["surface", str(run), "--grid", "3", "--span", "0.5", "--directions", "hessian",
                 "--mode", "eval", "--at", "4", "--out", str(tmp_path)]) == 0
    data = load_npz(run / "landscape" / "surface-step4.npz")
    assert str(data["directions"]) == "hessian" and str(data["mode"]) == "eval"
    twin = checkpoint_twin(run, 4)
    eigs = probes.hessian_eigs(*twin, k=2, seed=0)
    np.testing.assert_allclose(data["eigenvalues"], eigs["eigenvalues"], rtol=1e-6)
    net = twin[0]
    scale = float(torch.cat([p.detach().reshape(-1) for p in net.parameters()]).norm())
    directions = [{n: t * scale for n, t in v.items()} for v in eigs["vectors"]]
    grid = [data["coords0"], data["coords1"]]
    np.testing.assert_allclose(data["loss"], probes.loss_surface_bruteforce(
        *twin, directions, grid, mode="eval"), rtol=1e-5)
    assert data["loss"][1, 1] == pytest.approx(loss_at(twin, "eval"), rel=1e-6)
    assert loss_at(twin, "eval") != pytest.approx(loss_at(twin, "train"), rel=1e-3)


def test_surface_merge_refuses_parts_of_different_directions(trajectory_runs, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = str(trajectory_runs / "none")
    for i in range(2):  # each task draws its random directions from another seed
        assert main(["surface", run, "--grid", "3", "--directions", "random", "--at", "2",
                     "--part", f"{i}/2", "--seed", str(i), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["surface", run, "--merge", "--at", "2", "--out", str(tmp_path)]) == 2
    assert "the parts' directions differ (step 2)" in capsys.readouterr().err
    assert not (trajectory_runs / "none" / "landscape" / "surface-step2.npz").exists()


def test_surface_command_says_what_is_wrong_in_one_line(trajectory_runs, tmp_path, capsys):
    run = str(trajectory_runs / "none")
    assert main(["surface", run, "--part", "2/2", "--out", str(tmp_path)]) == 2
    assert "--part I/N needs 0 <= I < N; got 2/2" in capsys.readouterr().err
    assert main(["surface", run, "--at", "7", "--out", str(tmp_path)]) == 2
    assert "no checkpoint at step(s) [7]" in capsys.readouterr().err
