"""The LightningCLI end to end: every config, composition, overrides, errors, resume, run
directories and W&B offline files. Real fits of tiny models."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bnstudy.cli import cli_main, main
from bnstudy.lightning_cli import parse_only
import wandb_records
from conftest import REPO
from tiny_fits import CONFIGS, TINY_VGG, assert_identical, last, read_metrics, tiny_args


def test_all_paper_configs_exist():
    want = {f"{a}{b}.yaml" for a in ("vgg", "dln")
            for b in ("", "_bn", "_noisy_bn", "_l1", "_l2", "_linf")} | {"quickstart.yaml"}
    assert want <= set(CONFIGS)


def test_one_shared_logger_and_instruments_block_feeds_every_config(tmp_path):
    """configs/common/*.yaml hold the loggers and the paper's instruments once: an edit there
    reaches every paper config (the quickstart keeps its own smaller instruments)."""
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    for name in ("instruments_vgg.yaml", "instruments_dln.yaml"):  # the ICS probe comes first
        path = configs / "common" / name
        path.write_text(path.read_text().replace("every: 100, log_spaced", "every: 7, log_spaced", 1))
    path = configs / "common" / "loggers.yaml"
    path.write_text(path.read_text().replace("project: bnstudy", "project: edited"))
    for config in CONFIGS:
        cfg = parse_only(["fit", "--config", str(configs / config)]).config["fit"]
        assert [lg.init_args.project for lg in cfg.trainer.logger[:1]] == ["edited"], config
        assert cfg.trainer.logger[1].class_path == "bnstudy.loggers.StudyCSVLogger", config
        if config != "quickstart.yaml":
            ics = cfg.trainer.callbacks[0].init_args.probes[0]
            assert (ics.class_path, ics.init_args.every) == ("bnstudy.instruments.ICS", 7), config


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_config_instantiates_with_paper_settings(config, in_tmp):
    cli = cli_main(["--config", str(REPO / "configs" / config)], run=False)
    model, trainer = cli.model, cli.trainer
    norm = yaml.safe_load((REPO / "configs" / config).read_text())["model"]["init_args"]["norm"]
    assert model.hparams.norm == norm
    assert model.hparams.optimizer == "sgd" and model.hparams.momentum == 0
    assert model.hparams.init == "glorot"
    if config.startswith("vgg"):
        assert trainer.max_steps == 15000 and model.lr == 0.1
        assert cli.datamodule.batch_size == 128 and not cli.datamodule.augment
        convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 13  # VGG-16
    elif config.startswith("dln"):
        assert trainer.max_steps == 10000 and model.lr == 1e-6
        linears = [m for m in model.net.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 25 and linears[0].weight.shape == (10, 10)
        assert model.hparams.reduction == "sum"
        assert cli.datamodule.num_samples == 1000


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_config_trains_a_tiny_version(config, in_tmp, tiny_cifar, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = in_tmp / "run"
    cli = cli_main(["fit", *tiny_args(config, tiny_cifar), f"--run_dir={run_dir}"])
    assert cli.trainer.global_step == 3
    rows = read_metrics(run_dir)
    assert torch.isfinite(torch.tensor(last(rows, "train/loss")))
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_configs_compose_and_dotted_overrides_win(in_tmp, capsys):
    extra = in_tmp / "fast.yaml"
    extra.write_text("model:\n  init_args:\n    lr: 0.5\ntrainer:\n  max_steps: 7\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "vgg_bn.yaml"), "--config", str(extra),
              "--model.optimizer=adam", "--seed_everything=123", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["lr"] == 0.5  # from the second file
    assert printed["model"]["init_args"]["optimizer"] == "adam"  # dotted override
    assert printed["model"]["init_args"]["norm"] == "batch"  # from the first file
    assert printed["trainer"]["max_steps"] == 7 and printed["seed_everything"] == 123


@pytest.mark.slow
@pytest.mark.parametrize("arg, message", [
    ("--model.lrr=0.5", "unknown key model.lrr"),
    ("--trainer.max_stepz=3", "unknown key trainer.max_stepz"),
    ("--model.norm=bn", "bad value for model.norm"),
    ("--data.batch_size=abc", "bad value for data.batch_size"),
    ("--model.lr=-1", "model.lr must be > 0"),
])
def test_bad_keys_and_values_fail_with_one_line(arg, message, in_tmp):
    proc = subprocess.run([sys.executable, "-m", "bnstudy", "fit", "--config",
                           str(REPO / "configs" / "quickstart.yaml"), arg],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"bnstudy: error: {errors[0].split('error: ', 1)[1]}"]
    assert message in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_run_directories_never_collide(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    dirs = []
    for _ in range(2):
        cli = cli_main(["fit", *tiny_args("dln.yaml")])
        dirs.append(Path(cli.trainer.default_root_dir))
    assert dirs[0] != dirs[1] and dirs[0].parent == dirs[1].parent == Path("runs/dln")
    assert all((d / "config.yaml").exists() and (d / "metrics.csv").exists() for d in dirs)


def test_a_stored_config_parses_back_with_number_like_strings(in_tmp, monkeypatch):
    # PyYAML writes the string 323174e6 unquoted and jsonargparse read it back as a float, so a
    # run whose W&B id looked like a number had a config.yaml that no longer parsed (CI saw it)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_RUN_ID", "323174e6")
    cli_main(["fit", *tiny_args("dln.yaml"), "--run_dir=r", "--trainer.max_steps=1"])
    stored = Path("r/config.yaml")
    assert "id: '323174e6'" in stored.read_text()
    cfg = parse_only(["fit", "--config", str(stored)]).config
    loggers = {lg.class_path.rsplit(".", 1)[-1]: lg for lg in cfg.fit.trainer.logger}
    assert loggers["StudyWandbLogger"].init_args.id == "323174e6"
    # the id bnstudy draws itself never looks like a number
    from bnstudy.cli import wandb_run_id
    ids = [wandb_run_id(in_tmp / f"d{i}") for i in range(300)]
    assert len(set(ids)) == 300 and all(i[0].isalpha() and len(i) == 8 for i in ids)


def test_the_config_dumper_quotes_every_string_jsonargparse_would_read_otherwise():
    from jsonargparse import get_loader

    from bnstudy.lightning_cli import _dump_config

    strings = ["323174e6", "1e5", "1.5e5", "1.e5", "-2.5E3", "2E+3", ".5e-3", "12", "0x1f",
               "1:30", "true", "null", "~", "1.5", ".inf", "abc", "a1e5", "2026-12-07"]
    data = {"values": strings, "numbers": [1e-6, 0.1, 3, True, None]}
    assert get_loader("yaml")(_dump_config(data)) == data


@pytest.mark.slow
def test_wandb_offline_run_has_config_and_metrics(in_tmp):
    run_dir = in_tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "bnstudy", "fit", *tiny_args("quickstart.yaml"),
                           f"--run_dir={run_dir}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert wandb_records.run_file(run_dir).name == f"run-{run_id}.wandb"
    config = wandb_records.config(run_dir)
    assert config["model"]["init_args"]["norm"] == "batch"  # the full resolved CLI config
    assert config["trainer"]["max_steps"] == 3 and config["run_dir"] == str(run_dir)
    logged = [row for row in wandb_records.history(run_dir) if "train/loss" in row]
    assert [row["trainer/global_step"] for row in logged] == [0, 1, 2]
    csv_losses = [float(r["train/loss"]) for r in read_metrics(run_dir) if r["train/loss"]]
    assert [row["train/loss"] for row in logged] == pytest.approx(csv_losses)  # same numbers
    # one W&B row a step (StudyWandbLogger merges the step's log calls), holding every value
    # metrics.csv has for that step
    rows = [row for row in wandb_records.history(run_dir) if "trainer/global_step" in row]
    steps = [row["trainer/global_step"] for row in rows]
    assert len(steps) == len(set(steps)), steps
    by_step = {row["trainer/global_step"]: row for row in rows}
    for csv_row in read_metrics(run_dir):
        values = {k: float(v) for k, v in csv_row.items() if v and k != "step"}
        assert values == pytest.approx(
            {k: by_step[int(csv_row["step"])].get(k) for k in values}), csv_row
    assert all({"train/loss", "lr-SGD", "train/samples"} <= row.keys() for row in logged)


@pytest.mark.slow
def test_resume_from_last_checkpoint_matches_uninterrupted_run(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = ["--config", str(REPO / "configs" / "quickstart.yaml"), *TINY_VGG,
            "--model.norm=noisy_batch", "--trainer.val_check_interval=5",
            "--trainer.enable_progress_bar=false", "--data.batch_size=16"]
    whole = in_tmp / "whole"
    cli_main(["fit", *base, "--trainer.max_steps=30", f"--run_dir={whole}"])
    parts = in_tmp / "parts"
    cli_main(["fit", *base, "--trainer.max_steps=15", f"--run_dir={parts}"])
    cli = cli_main(["fit", *base, "--trainer.max_steps=30", f"--run_dir={parts}",
                    f"--ckpt_path={parts / 'checkpoints' / 'last.ckpt'}"])
    assert cli.trainer.global_step == 30
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(parts / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert_identical(a[key], b[key], key)
    whole_rows, part_rows = read_metrics(whole), read_metrics(parts)
    assert last(whole_rows, "val/acc") == last(part_rows, "val/acc")
    assert last(whole_rows, "train/loss") == last(part_rows, "train/loss")
    # nothing logged before the interruption was lost
    assert {r["step"] for r in whole_rows} <= {r["step"] for r in part_rows}


@pytest.mark.slow
def test_rerunning_a_run_directory_resumes_it(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli_main(["fit", *tiny_args("dln_bn.yaml"), "--run_dir=again"])
    first_id = Path("again/wandb_id").read_text()
    cli = cli_main(["fit", *tiny_args("dln_bn.yaml"), "--trainer.max_steps=5", "--run_dir=again"])
    assert cli.trainer.global_step == 5
    assert cli.trainer.ckpt_path == str(Path("again/checkpoints/last.ckpt"))
    steps = sorted({int(r["step"]) for r in read_metrics(Path("again")) if r["train/loss"]})
    assert steps == [0, 1, 2, 3, 4] and Path("again/wandb_id").read_text() == first_id


def test_slurm_run_directories(in_tmp, monkeypatch):
    from bnstudy.cli import default_run_dir

    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    first = default_run_dir(["configs/vgg_bn.yaml"])
    assert first == Path("runs/vgg_bn/slurm-123")
    first.mkdir(parents=True)
    # a second fit in the same batch script gets its own directory ...
    assert default_run_dir(["configs/vgg_bn.yaml"]).name.startswith("slurm-123-")
    # ... a requeued job finds its directory again ...
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert default_run_dir(["configs/vgg_bn.yaml"]) == first
    # ... and a later srun step of the job is another run
    monkeypatch.setenv("SLURM_STEP_ID", "2")
    assert default_run_dir(["configs/vgg_bn.yaml"]) == Path("runs/vgg_bn/slurm-123-step2")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert default_run_dir(["configs/dln.yaml"]) == Path("runs/dln/slurm-120_4")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "abc")
    assert default_run_dir(["configs/dln.yaml"]) == Path("runs/sweep-sw1/abc")


def test_resume_picks_the_newest_checkpoint_outside_slurm(in_tmp, monkeypatch):
    import os as _os

    from bnstudy.cli import resume_path

    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    run = in_tmp / "r"
    assert resume_path(run) is None
    (run / "checkpoints").mkdir(parents=True)
    last, hpc = run / "checkpoints" / "last.ckpt", run / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"x")
    assert resume_path(run) == str(last)
    hpc.write_bytes(b"x")
    _os.utime(last, (1, 1))  # the hpc checkpoint is newer: a preempted run outside SLURM now
    assert resume_path(run) == str(hpc)
    _os.utime(hpc, (0, 0))
    assert resume_path(run) == str(last)
