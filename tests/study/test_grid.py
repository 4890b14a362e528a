"""The sweep YAMLs, offline: W&B's schema, W&B's grid expansion, the exact command `wandb agent`
would start for every run, that each command parses with bnstudy's CLI and sets the swept values,
and that one run of each sweep trains (a tiny version of it, a few steps)."""
from __future__ import annotations

import csv
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

from bnstudy.cli import main
from bnstudy.lightning_cli import parse_only
from bnstudy.study import grid
from conftest import REPO

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))

# The grids the study needs: the paper's figures and docs/protocol.md section 8's open questions.
REQUIRED = {"fig1_norm_lr", "fig2_noisy_bn", "fig3_ics_vgg", "fig3_ics_dln", "fig4_landscape_vgg",
            "fig5_lp_vgg", "fig5_lp_dln", "q_optimizer", "q_init_vgg", "q_init_dln", "q_seeds"}

# What makes a run tiny: every sweep's command plus these trains in seconds on a CPU.
TINY_COMMON = ["--trainer.max_steps=2", "--trainer.log_every_n_steps=1",
               "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false"]
# VGG-16 and the 25-layer DLN stay as they are: the instruments' layer numbers need them
TINY_IMAGES = ["--data=bnstudy.data.DigitsData", "--data.batch_size=16", "--model.width=0.0625",
               "--trainer.val_check_interval=2",
               "--trainer.limit_val_batches=1"]  # CIFAR-10 cannot be downloaded here: digits
TINY_DLN = ["--data.num_samples=64"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())



@pytest.fixture(scope="module")
def parser():
    """One parser for all commands (building LightningCLI's parser is the slow part)."""
    sweep = load(SWEEPS[0])
    argv = grid.agent_command(sweep, grid.expand(sweep)[0])[4:]
    return parse_only(argv).parser


def parsed_value(config, name: str):
    """The value a dotted sweep parameter ended up with: model.lr is model.init_args.lr."""
    keys = name.split(".")
    if keys[0] in ("model", "data") and len(keys) > 1:
        keys.insert(1, "init_args")
    for key in keys:
        config = config[key]
    return config


def test_every_figure_and_open_question_has_a_sweep():
    assert REQUIRED <= {p.stem for p in SWEEPS}


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_is_valid_and_expands_to_its_full_grid(path):
    sweep = load(path)
    from sweeps import schema_violations_from_proposed_config
    assert schema_violations_from_proposed_config(sweep) == []
    grid.validate(sweep, path.name)  # grid method, bnstudy's command with ${args} last
    command = sweep["command"]
    assert command[:6] == ["${env}", "${interpreter}", "-m", "bnstudy", "fit", "--config"]
    configs = [command[i + 1] for i, c in enumerate(command) if c == "--config"]
    assert configs[0] in ("configs/vgg.yaml", "configs/dln.yaml")
    assert all((REPO / c).is_file() for c in configs)

    runs = grid.expand(sweep)
    params = sweep["parameters"]
    assert len(runs) == math.prod(len(p.get("values", [None])) for p in params.values())
    assert len({tuple(sorted(r.items())) for r in runs}) == len(runs)  # each point once
    for name, spec in params.items():
        values = spec.get("values", [spec.get("value")])
        assert {yaml.safe_dump(r[name]) for r in runs} == {yaml.safe_dump(v) for v in values}
        # YAML 1.1 reads 1e-6 as the string "1e-6": the sweep would pass a string to W&B
        for v in values:
            assert not (isinstance(v, str) and re.fullmatch(r"[-+]?[\d.]+e[-+]?\d+", v)), (name, v)


def test_grid_subcommand_writes_one_agent_command_per_run(tmp_path):
    path = REPO / "sweeps" / "fig1_norm_lr.yaml"
    out = tmp_path / "grid.txt"
    assert main(["grid", str(path), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    sweep = load(path)
    assert lines == [shlex.join(grid.agent_command(sweep, p)[2:]) for p in grid.expand(sweep)]
    assert lines[0] == "-m bnstudy fit --config configs/vgg.yaml --model.lr=0.1 --model.norm=none"
    assert len(set(lines)) == 4
    # a sweep W&B would reject is refused with a message, not expanded
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**sweep, "method": "grid", "parameters": {"model.lr": 0.1}}))
    assert main(["grid", str(bad)]) == 2


def covering_runs(runs: list[dict]) -> list[dict]:
    """A few runs that together hold every value of every parameter (greedy set cover)."""
    missing = {(k, yaml.safe_dump(v)) for r in runs for k, v in r.items()}
    chosen = []
    while missing:
        best = max(runs, key=lambda r: len(missing & {(k, yaml.safe_dump(v)) for k, v in r.items()}))
        missing -= {(k, yaml.safe_dump(v)) for k, v in best.items()}
        chosen.append(best)
    return chosen


# Parsing takes ~0.1 s a command; grids up to this size are parsed run by run, larger ones (the
# open questions, 60-120 runs) through a subset that holds every value of every parameter: the
# CLI parses each --name=value on its own, so the other combinations add no new parse.
PARSE_EVERY_RUN_UP_TO = 24


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_agent_command_parses_and_sets_the_swept_values(path, parser):
    sweep = load(path)
    runs = grid.expand(sweep)
    for params in runs:
        argv = grid.agent_command(sweep, params)
        # what the agent runs on POSIX: /usr/bin/env python -m bnstudy <args>
        assert argv[:4] == ["/usr/bin/env", "python", "-m", "bnstudy"]
        assert argv[4:len(argv) - len(params)] == sweep["command"][4:-1]
        assert argv[len(argv) - len(params):] == [f"--{k}={v}" for k, v in params.items()]
    to_parse = runs if len(runs) <= PARSE_EVERY_RUN_UP_TO else covering_runs(runs)
    for params in to_parse:
        config = parser.parse_args(grid.agent_command(sweep, params)[4:])["fit"]
        for name, value in params.items():
            assert parsed_value(config, name) == value, (path.stem, name)


def _tiny(argv: list[str]) -> list[str]:
    config = argv[argv.index("--config") + 1]
    kind = TINY_DLN if load(REPO / config)["model"]["class_path"].endswith("DLNModule") \
        else TINY_IMAGES
    return argv + TINY_COMMON + kind


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_one_run_of_each_sweep_trains_a_tiny_version(path, tmp_path, monkeypatch):
    """The last grid point (the one furthest from the config's defaults), in this process through
    the CLI's own entry point, with a tiny model and two steps."""
    monkeypatch.chdir(REPO)  # config paths in sweeps are relative to the repository
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sweep = load(path)
    params = grid.expand(sweep)[-1]
    argv = grid.agent_command(sweep, params)[4:]
    run_dir = tmp_path / "run"
    assert main(_tiny(argv) + [f"--run_dir={run_dir}"]) == 0

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for name, value in params.items():
        assert parsed_value(saved, name) == value, name
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1]  # both steps trained
    # the paper configs' instruments measured (steps 0 and 1 are on their schedule)
    for prefix in ("ics/l2/", "ics/cos/", "landscape/beta_eff", "act/"):
        assert any(r.get(k) for r in rows for k in r if k.startswith(prefix)), prefix
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
