"""Run directories that protect their runs, one-line errors for bad input, and a CLI that explains
itself. Real processes, real corrupted files. (Signals, a failing write and the progress bar are
tested with their callbacks in tests/callbacks/.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bnstudy.cli import cli_main, main
from conftest import REPO
from tiny_fits import ENV, TINY, bnstudy, fit, one_error_line, rows


# -- the CLI explains itself ------------------------------------------------------------------

@pytest.mark.slow
def test_help_lists_every_subcommand_without_importing_torch():
    code = ("import sys, io, contextlib\nfrom bnstudy.cli import main, available\n"
            "out = io.StringIO()\nwith contextlib.redirect_stdout(out): rc = main(['--help'])\n"
            "assert rc == 0 and 'torch' not in sys.modules and 'lightning' not in sys.modules\n"
            "print(out.getvalue()); print('SUBS', ' '.join(available()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text, subs = proc.stdout.rsplit("SUBS", 1)
    assert text.startswith("usage: bnstudy ")
    subs = subs.split()
    assert {"fit", "validate", "test", "plot", "grid"} <= set(subs)
    for name in subs:  # one line each, with its help
        assert re.search(rf"^  {name}\s+\S", text, re.M), name
    assert "predict" not in subs
    unknown = bnstudy("fitt")
    assert unknown.returncode == 2 and "unknown subcommand 'fitt'" in unknown.stderr


@pytest.mark.slow
def test_fit_help_leads_with_the_configs_model_and_data_options():
    proc = bnstudy("fit", "--config", "configs/quickstart.yaml", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    model, data, usage = (out.index("== model: bnstudy.modules.VGGModule =="),
                          out.index("== data: bnstudy.data.DigitsData =="),
                          out.index("usage: bnstudy"))
    assert model < data < usage  # the config's options first, LightningCLI's full list after
    assert "--model.norm" in out[model:data] and "--data.batch_size" in out[data:usage]
    assert "default: 0.25" in out[model:data]  # the value in this config (the class says 1.0)
    assert "num_classes_of(data) --> model.init_args.num_classes" in out  # where links come from
    assert "functools.partial" not in out
    short = bnstudy("fit", "--model.help", "VGGModule")  # short class names work
    assert short.returncode == 0 and "--model.norm" in short.stdout, short.stderr[-800:]
    assert short.stdout.startswith("usage: bnstudy")


# -- a run directory protects its run ----------------------------------------------------------

HOLD_LOCK = """
import sys, time
from bnstudy.rundir import RunLock
lock = RunLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(600)
"""


@pytest.mark.slow
def test_lock_refuses_a_second_process_and_a_dead_holders_lock_is_taken_over(quiet):
    run_dir = quiet / "locked"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = bnstudy("fit", *TINY, "--trainer.max_steps=2", f"--run_dir={run_dir}")
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2
        assert f"is in use by pid {holder.pid} on host {os.uname().nodename}" in line
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / ".lock").read_text().split()[0] == str(holder.pid)  # stale, left behind
    cli = fit(run_dir, steps=2)  # taken over
    assert cli.trainer.global_step == 2
    assert (run_dir / ".lock").read_text().split()[0] == str(os.getpid())


def run_files(run_dir):
    """Every file of a run directory with its bytes, except wandb's own debug logs: wandb's
    service process outlives the run and may still append its last lines to them."""
    return {p: p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and not (p.parent.name == "logs" and "wandb" in p.parts)}


@pytest.mark.slow
def test_resume_with_another_config_is_refused_before_anything_is_written(quiet, capsys):
    import wandb

    run_dir = quiet / "run"
    fit(run_dir, steps=3)
    # wandb.finish() can return before W&B's service has written the run file's last records
    # (the CI saw them land after the snapshot); tearing the service down waits for them
    wandb.teardown()
    before = run_files(run_dir)
    rc = main(["fit", *TINY, "--trainer.max_steps=5", f"--run_dir={run_dir}",
               "--model.norm=none", "--model.lr=0.05"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert "model.init_args.lr (0.1 -> 0.05), model.init_args.norm ('batch' -> 'none')" in line
    assert "--resume_allow" in line and "--run_dir" in line
    assert run_files(run_dir) == before
    # a documented override for a change the user knows is safe
    rc = main(["fit", *TINY, "--trainer.enable_progress_bar=false", "--trainer.max_steps=5",
               f"--run_dir={run_dir}", "--model.lr=0.05", "--resume_allow=[model.init_args.lr]"])
    assert rc == 0
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


@pytest.mark.slow
def test_a_randomly_seeded_run_resumes_with_its_own_seed(quiet):
    """seed_everything: true draws a seed; a resume (a Slurm requeue too) keeps that seed instead
    of drawing another, which the config check would refuse."""
    run_dir = quiet / "run"
    fit(run_dir, "--seed_everything=true", steps=3)
    seed = yaml.safe_load((run_dir / "config.yaml").read_text())["seed_everything"]
    assert isinstance(seed, int) and not isinstance(seed, bool)
    fit(run_dir, "--seed_everything=true", steps=5)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed_everything"] == seed
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_removing_a_run_that_never_started_spares_its_neighbours(tmp_path):
    """A failed start removes its run directory and the parents it created while they are empty;
    a run another process started meanwhile in one of those parents stays."""
    from bnstudy.rundir import remove_new_run_dir

    ours, theirs = tmp_path / "runs" / "a" / "run1", tmp_path / "runs" / "b" / "run2"
    for d in (ours, theirs):
        d.mkdir(parents=True)
        (d / "metrics.csv").write_text("step\n0\n")
    remove_new_run_dir(ours, created=tmp_path / "runs")
    assert not (tmp_path / "runs" / "a").exists()
    assert (theirs / "metrics.csv").read_text() == "step\n0\n"
    remove_new_run_dir(theirs, created=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def _checkpoint_of(run_dir: Path, *extra: str) -> Path:
    fit(run_dir, *extra, steps=1)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_bad_checkpoints_are_one_line_and_leave_nothing_behind(quiet, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # a W&B run would leave files in the run dir
    good = _checkpoint_of(quiet / "good")
    dln = cli_main(["fit", "--config", str(REPO / "configs" / "dln.yaml"),
                    "--trainer.max_steps=1", "--data.num_samples=16", "--run_dir=dln",
                    "--trainer.enable_progress_bar=false"]).trainer
    assert dln.global_step == 1
    data = good.read_bytes()
    bad = {
        "missing.ckpt": (None, "does not exist"),
        "truncated.ckpt": (data[: len(data) // 2], "truncated or damaged"),
        "random.ckpt": (os.urandom(4096), "not a PyTorch checkpoint"),
        "notes.ckpt": (b"these are my notes\n" * 20, "not a PyTorch checkpoint"),
    }
    for name, (content, message) in bad.items():
        if content is not None:
            (quiet / name).write_bytes(content)
    cases = [(name, [], message) for name, (_, message) in bad.items()]
    cases += [(str(good), ["--model.norm=none"], "it was trained with norm='batch' "
                                                 "(this config: 'none')"),
              ("dln/checkpoints/last.ckpt", [], "is from a DLNModule, not a VGGModule")]
    for i, (path, extra, message) in enumerate(cases):
        for sub in ("fit", "test") if i == 1 else ("fit",):
            run_dir = quiet / f"new{i}{sub}"
            rc = main([sub, *TINY, *extra, f"--ckpt_path={path}", f"--run_dir={run_dir}"])
            line = one_error_line(capsys.readouterr().err)
            assert rc == 2 and message in line and path in line, (sub, path, line)
            assert not run_dir.exists(), (sub, path)  # no directory, no W&B run


@pytest.mark.slow
def test_data_root_without_data_and_unwritable_run_dir(quiet, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["fit", "--config", str(REPO / "configs" / "vgg_bn.yaml"), f"--data.root={empty}",
               "--data.download=false", "--model.width=0.0625", "--run_dir=nodata"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "CIFAR-10 not found under" in line and str(empty) in line
    assert not Path("nodata").exists()
    # a run directory that cannot be made: below a file, and (not as root, who may write
    # anywhere) below a read-only directory
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc = main(["fit", *TINY, "--trainer.max_steps=2", f"--run_dir={afile / 'run'}"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"run directory {afile / 'run'}: {afile} is not a directory" in line
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        rc = main(["fit", *TINY, "--trainer.max_steps=2", f"--run_dir={ro / 'run'}"])
        line = one_error_line(capsys.readouterr().err)
        assert rc == 2 and f"run directory {ro / 'run'} is not writable" in line


# -- tidy outputs ------------------------------------------------------------------------------

def documented_columns() -> list[str]:
    """The metrics.csv columns the README lists (its table under 'metrics.csv columns')."""
    text = (REPO / "README.md").read_text()
    table = text.split("metrics.csv columns", 1)[1].split("\n\n", 2)[1]
    cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return [name for cell in cells for name in re.findall(r"`([^`]+)`", cell)]


def _pattern(doc: str) -> re.Pattern:
    regex = re.escape(doc).replace("NN", r"\d\d").replace("<name>", r"[\w./-]+")
    regex = re.sub(r"\\\{([^}]*)\\\}", lambda m: "(" + m.group(1).replace(",", "|")
                   .replace("\\", "") + ")", regex)
    return re.compile(regex + "$")


@pytest.mark.slow
def test_metrics_csv_one_row_per_step_and_columns_as_documented(quiet):
    run_dir = quiet / "run"
    fit(run_dir, steps=12)
    cli_main(["test", *TINY, "--trainer.enable_progress_bar=false",
              f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"--run_dir={run_dir}"])
    found = rows(run_dir)
    steps = [int(r["step"]) for r in found]
    assert steps == sorted(set(steps))  # one row per step, in order
    assert "train/loss" in found[0] and found[0]["train/loss"] and found[0]["lr-SGD"]
    columns = set(found[0])
    documented = documented_columns()
    patterns = {doc: _pattern(doc) for doc in documented}
    undocumented = sorted(c for c in columns if not any(p.match(c) for p in patterns.values()))
    assert undocumented == []
    conditional = {doc for doc in documented  # not in a short healthy fit without this probe
                   if doc.startswith(("landscape_random/", "train/device/", "diverged_step",
                                       "val/acc_noise", "val/loss_noise", "curv/", "thm41/"))}
    unseen = [doc for doc, p in patterns.items()
              if doc not in conditional and not any(p.match(c) for c in columns)]
    assert unseen == []
    assert (run_dir / "config.yaml").read_text().count("ckpt_path: null") == 1  # fit's, kept


# -- sweeps are checked before anything is submitted -----------------------------------------

@pytest.mark.slow
def test_grid_catches_a_parameter_the_cli_does_not_know(tmp_path, capsys, monkeypatch):
    sweep = tmp_path / "typo.yaml"
    sweep.write_text(yaml.safe_dump({
        "method": "grid", "parameters": {"model.nrom": {"values": ["none", "batch"]}},
        "command": ["${env}", "${interpreter}", "-m", "bnstudy", "fit", "--config",
                    "configs/quickstart.yaml", "${args}"]}))
    # slurm/grid.sh parses every run's command before sbatch: nothing is submitted
    runs = tmp_path / "runs"
    sh = subprocess.run(["bash", "slurm/grid.sh", str(sweep)], cwd=REPO, capture_output=True,
                        text=True, timeout=300,
                        env={**{k: v for k, v in ENV.items() if not k.startswith("SLURM_")},
                             "BNSTUDY_PYTHON": sys.executable, "BNSTUDY_RUNS": str(runs)})
    line = one_error_line(sh.stderr, "bnstudy grid: error: ")
    assert sh.returncode == 2 and "sbatch" not in sh.stderr
    assert "run 0 (-m bnstudy fit --config configs/quickstart.yaml --model.nrom=none)" in line
    assert "unknown key model.nrom (not an argument of bnstudy.modules.VGGModule)" in line
    assert not (runs / "grid.txt").exists()
    monkeypatch.chdir(REPO)  # the sweep's config paths are relative to the repository, as on the cluster
    # a grid file, and extra arguments every run gets, are checked the same way
    good = tmp_path / "grid.txt"
    good.write_text("-m bnstudy fit --config configs/quickstart.yaml --model.norm=none\n")
    assert main(["grid", "--check", str(good), "--", "--trainer.max_steps=3"]) == 0
    assert "1 runs parse" in capsys.readouterr().err
    assert main(["grid", "--check", str(good), "--", "--trainer.max_stepz=3"]) == 2
    line = one_error_line(capsys.readouterr().err, "bnstudy grid: error: ")
    assert "unknown key trainer.max_stepz" in line


def test_config_check_ignores_new_options_paths_and_checkpoint_cadence():
    """A run made by an older bnstudy (no such key stored), moved or named by another path, or
    resumed with another last.ckpt cadence is the same run; a changed setting is not."""
    from bnstudy.rundir import config_differences

    stored = {"run_dir": "runs/a", "model": {"init_args": {"lr": 0.1}},
              "last_checkpoint": {"every_n_train_steps": 100},
              "trainer": {"default_root_dir": "runs/a", "logger": [{"init_args": {"save_dir": "runs/a"}}]}}
    current = {"run_dir": "/abs/runs/a", "model": {"init_args": {"lr": 0.1, "compile": False}},
               "last_checkpoint": {"every_n_train_steps": None, "every_minutes": 10.0},
               "trainer": {"default_root_dir": "/abs/runs/a",
                           "logger": [{"init_args": {"save_dir": "/abs/runs/a"}}]}}
    assert config_differences(stored, current, []) == []
    current["model"]["init_args"]["lr"] = 0.5
    assert config_differences(stored, current, []) == ["model.init_args.lr"]
    # Lightning's WandbLogger and bnstudy's StudyWandbLogger log the same run; another class not
    current["model"]["init_args"]["lr"] = 0.1
    stored["trainer"]["logger"][0]["class_path"] = "lightning.pytorch.loggers.WandbLogger"
    current["trainer"]["logger"][0]["class_path"] = "bnstudy.loggers.StudyWandbLogger"
    assert config_differences(stored, current, []) == []
    current["trainer"]["logger"][0]["class_path"] = "lightning.pytorch.loggers.CSVLogger"
    assert config_differences(stored, current, []) == ["trainer.logger.0.class_path"]
