"""The house moved (bnstudy/instruments/, callbacks/, analysis/, study/): every old import path
still works, configs still name the old public class paths, and a run directory written by the
code before the move resumes after it as a run that never stopped.

tests/fixtures/dln_bn_run_before_the_house was made by the code before the move (commit 6228fc5):
    python -m bnstudy fit --config configs/dln_bn.yaml --trainer.max_steps=4 \\
        --trainer.enable_progress_bar=false --trainer.enable_model_summary=false \\
        --trainer.log_every_n_steps=1 --data.num_samples=64 --data.steps_per_epoch=2 \\
        --trainer.check_val_every_n_epoch=1 --run_dir=/tmp/fixture_run   (WANDB_MODE=disabled)
(its .lock removed): config.yaml, metrics.csv of steps 0-4, last.ckpt and the best checkpoint,
with the paper's DLN instruments, Curvature's warm start among them. It stops at an epoch's end:
a DLN run stopped mid-epoch (step 3 here) and resumed does not end bit for bit where an
uninterrupted one does, on the code before the move too (a known difference, not the move's).
Since Lanczos' arithmetic changed (2026-12-03), Curvature's vector and eigenvalue compare to float
rounding; everything else bit for bit."""
from __future__ import annotations

import importlib
import shutil

import pytest
import torch
import yaml

import bnstudy
from bnstudy.cli import cli_main
from conftest import REPO
from tiny_fits import assert_identical, read_metrics

FIXTURE = REPO / "tests" / "fixtures" / "dln_bn_run_before_the_house"
ARGS = ["--config", str(REPO / "configs" / "dln_bn.yaml"), "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
        "--data.num_samples=64", "--data.steps_per_epoch=2", "--trainer.check_val_every_n_epoch=1",
        # the code before the move computed nn.Linear's row-major products: bit for bit needs
        # the same rounding (the feature-major default sums in another order)
        "--model.init_args.feature_major=false"]
# wall-clock time and ThroughputMonitor's counts (which restart at a resume), not what was computed
TIMING = ("time/", "train/time", "train/batches", "train/samples", "validate/", "_per_sec")


@pytest.mark.parametrize("old, new", list(bnstudy.MOVED.items()))
def test_old_module_paths_load_the_moved_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_names_keep_working():
    from jsonargparse._util import get_import_path

    from bnstudy import callbacks, instruments, probes, report
    from bnstudy.instruments.covariate_shift import ICS, ics

    assert probes.ics is instruments.ics is ics and probes.measuring is instruments.measuring
    assert instruments.ICS is ICS and report.FIGURES and report.build_report
    assert callbacks.StepEndSignals.__module__ == "bnstudy.callbacks.step_end_signals"
    assert not hasattr(callbacks, "RequeueAtStepEnd")  # the dead alias is gone
    for name in ("Instruments", "ICS", "Landscape", "RandomLandscape", "ActivationStats",
                 "Curvature", "BNGradientBound", "Probe", "Spectrum"):  # what config.yaml holds
        assert get_import_path(getattr(instruments, name)) == f"bnstudy.instruments.{name}"
    assert set(instruments.__all__) <= set(dir(instruments)) | {"Instruments"}


def contains(new, old) -> bool:
    """`new` holds everything `old` holds (dicts may have more keys: options added since)."""
    if isinstance(old, dict):
        return isinstance(new, dict) and all(k in new and contains(new[k], v) for k, v in old.items())
    if isinstance(old, list):
        return isinstance(new, list) and len(new) == len(old) and all(map(contains, new, old))
    return new == old


@pytest.mark.slow
def test_a_run_directory_written_before_the_move_resumes_as_one_never_stopped(in_tmp,
                                                                             monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    old = in_tmp / "old"
    shutil.copytree(FIXTURE, old)
    stored = yaml.safe_load((old / "config.yaml").read_text())
    assert torch.load(old / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"][
        "Instruments"]["curv"]["vectors"]  # the warm start of the code before the move
    # the instruments as the code before the move ran them (the paper configs have more since:
    # Curvature's cold check, Theorem 4.1's probe), with the options added since at defaults
    pinned = in_tmp / "instruments_before.yaml"
    pinned.write_text(yaml.safe_dump(stored["trainer"]["callbacks"]))
    pin = f"--trainer.callbacks={pinned}"
    cli = cli_main(["fit", *ARGS, pin, "--trainer.max_steps=6", f"--run_dir={old}"])
    assert cli.trainer.global_step == 6
    assert cli.trainer.ckpt_path == str(old / "checkpoints" / "last.ckpt")  # resumed, not anew
    whole = in_tmp / "whole"
    cli_main(["fit", *ARGS, pin, "--trainer.max_steps=6", f"--run_dir={whole}"])
    # new configs write the same class paths and values as the old one; options added since
    # (with defaults that keep the old behaviour) are the only difference
    written = yaml.safe_load((whole / "config.yaml").read_text())
    assert contains(written["trainer"]["callbacks"], stored["trainer"]["callbacks"])
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(old / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert_identical(a["state_dict"][key], b["state_dict"][key], key)
    # Lanczos' arithmetic changed after the fixture was written (its basis as flat vectors, a
    # block of matrix-vector products, since 2026-12-03): Curvature's warm-start vector is the
    # same to float rounding (1e-6 of a unit vector; its BN-bias entries are themselves of that
    # size), not bit for bit. Everything else the instruments keep is.
    ours, theirs = a["callbacks"]["Instruments"], b["callbacks"]["Instruments"]
    assert ours.keys() == theirs.keys()
    for name in ours:
        for key in ours[name]:
            if (name, key) != ("curv", "vectors"):
                assert_identical(ours[name][key], theirs[name][key], f"Instruments.{name}.{key}")
    for x, y in zip(ours["curv"]["vectors"], theirs["curv"]["vectors"], strict=True):
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-6)
    whole_rows, old_rows = read_metrics(whole), read_metrics(old)
    assert [r["step"] for r in old_rows] == [r["step"] for r in whole_rows]
    # the columns the code before the move wrote (new quantities, such as ics/rel, start at 4)
    before = (FIXTURE / "metrics.csv").read_text().splitlines()[0].split(",")
    columns = [c for c in whole_rows[0] if c in before and not any(t in c for t in TIMING)]
    assert "curv/lambda_max" in columns and "ics/l2/layer09" in columns
    for column in columns:  # steps 0-3 by the code before the move, 4-6 by this code
        # as numbers: the rows a resume keeps are rewritten ("0" may come back as "0.0")
        old_values = [float(r[column]) if r[column] else "" for r in old_rows]
        whole_values = [float(r[column]) if r[column] else "" for r in whole_rows]
        if column.endswith(("/dmean", "/dvar")):
            # the step-to-step change at the first step after a resume (4) needs step 3's
            # activations, which ActivationStats keeps in memory only: missing there, as before
            resumed_at = [r["step"] for r in old_rows].index("4")
            assert old_values[resumed_at] == "" and whole_values[resumed_at] != "", column
            old_values[resumed_at] = whole_values[resumed_at] = ""
        if column in ("curv/lambda_max", "curv/residual"):  # Lanczos' rounding, as above
            assert [v == "" for v in old_values] == [v == "" for v in whole_values], column
            assert [v for v in old_values if v != ""] == pytest.approx(
                [v for v in whole_values if v != ""], rel=1e-6 if column.endswith("max") else 1e-4)
            continue
        # the fixture's own rows (steps 0-3) were computed on another machine, whose vector
        # width may sum the float64 norms in another order (145439.10021104207 against ...204
        # was seen): to float rounding; the rows this machine wrote after the resume, bit for bit
        fixture = [r["step"] for r in old_rows].index("4")
        ours, theirs = old_values[:fixture], whole_values[:fixture]
        assert [v == "" for v in ours] == [v == "" for v in theirs], column
        assert [v for v in ours if v != ""] == pytest.approx([v for v in theirs if v != ""],
                                                             rel=1e-6), column
        assert old_values[fixture:] == whole_values[fixture:], column
