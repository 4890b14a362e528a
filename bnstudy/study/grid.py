"""`python -m bnstudy grid SWEEP.yaml [--out FILE]`: the runs of a W&B grid sweep, one per line.

The expansion is W&B's own: the `sweeps` package (the open-source sweep controller) validates the
YAML against the sweep schema and proposes the runs one after another, each knowing the runs
before it, as the server does for `wandb agent`. The command of each run is built the way
`wandb agent` builds it (wandb's `create_sweep_command_args`, then the same macro substitution), so
a grid run on Slurm (slurm/grid.sh, task i = line i) runs exactly what the agent would run.

A line holds the arguments after the interpreter, shell-quoted, e.g.
    -m bnstudy fit --config configs/vgg.yaml --model.lr=0.1 --model.norm=batch
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import warnings
from pathlib import Path

import yaml

# The command every bnstudy sweep uses (docs/cluster.md): the agent fills in /usr/bin/env, python
# and the run's parameters as --name=value.
COMMAND_HEAD = ["${env}", "${interpreter}", "-m", "bnstudy"]


def _sweeps():
    """The `sweeps` package, imported without its pydantic-v1 config warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import sweeps
    return sweeps


class SweepError(ValueError):
    """A sweep YAML that W&B would reject, or that is not a finite grid."""


def load_sweep(path: str | Path) -> dict:
    with open(path) as f:
        sweep = yaml.safe_load(f)
    validate(sweep, str(path))
    return sweep


def validate(sweep: dict, name: str = "sweep") -> None:
    """W&B's schema check, plus what a grid on Slurm needs: method grid, bnstudy's command."""
    if not isinstance(sweep, dict):
        raise SweepError(f"{name}: a sweep must be a YAML mapping")
    try:
        problems = list(_sweeps().schema_violations_from_proposed_config(sweep))
    except (ValueError, TypeError, AssertionError) as err:  # raised for malformed parameters
        problems = [str(err)]
    if sweep.get("method") != "grid":
        problems.append(f"method must be grid (a finite list of runs); got {sweep.get('method')!r}")
    command = sweep.get("command")
    if not (isinstance(command, list) and command[:len(COMMAND_HEAD)] == COMMAND_HEAD
            and command[-1] == "${args}"):
        problems.append(f"command must be {COMMAND_HEAD + ['<subcommand>', '...', '${args}']}; "
                        f"got {command!r}")
    if problems:
        raise SweepError(f"{name}: " + "; ".join(problems))


def expand(sweep: dict) -> list[dict]:
    """The parameters of every run, in the order the sweep controller proposes them:
    [{name: value}, ...]."""
    sweeps = _sweeps()
    runs: list = []
    while (run := sweeps.next_run(sweep, runs, validate=True)) is not None:
        # the controller sees every proposed run as started, and proposes the next one
        runs.append(sweeps.SweepRun(name=f"run-{len(runs)}", state=sweeps.RunState.running,
                                    config=run.config))
    return [{name: item["value"] for name, item in run.config.items()} for run in runs]


def agent_command(sweep: dict, params: dict, interpreter: str = "python") -> list[str]:
    """The argv `wandb agent` starts for a run with these parameters (wandb_agent.Agent.
    _command_run on POSIX: ${env} -> /usr/bin/env, ${interpreter} -> python, ${args} ->
    --name=value for each parameter)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    command = create_sweep_command(copy.deepcopy(sweep["command"]))  # fills ${envvar:X}
    variables = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    variables.update(env=["/usr/bin/env"], interpreter=[interpreter],
                     program=[sweep.get("program", "")])
    argv: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += variables.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


def grid_lines(sweep: dict) -> list[str]:
    """One shell-quoted line per run: the agent's command after `/usr/bin/env python`."""
    return [shlex.join(agent_command(sweep, params)[2:]) for params in expand(sweep)]


def check_lines(lines: list[str], extra: list[str] = ()) -> None:
    """Parse every run's command (plus the extra arguments every run gets) with bnstudy's own CLI
    parser, running nothing: a key the CLI does not know, or a bad value, fails here, naming the
    run, instead of in every array task on the cluster. One parser serves all runs."""
    from jsonargparse import ArgumentError

    from bnstudy.cli import LIGHTNING, summarize_config_error
    from bnstudy.lightning_cli import parse_only

    cli = None
    for i, line in enumerate(lines):
        argv = shlex.split(line)
        if argv[:2] == ["-m", "bnstudy"]:
            argv = argv[2:]
        if not argv or argv[0] not in LIGHTNING:
            raise SweepError(f"run {i}: not a bnstudy fit/validate/test command: {line}")
        try:
            if cli is None:
                cli = parse_only(argv + list(extra))
            else:
                cli.parser.parse_args(argv + list(extra))
        except (ArgumentError, ValueError, TypeError) as err:
            raise SweepError(f"run {i} ({line}): {summarize_config_error(str(err))}") from None


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:  # arguments every run gets (slurm/grid.sh's extra args): checked, not written
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(
        prog="bnstudy grid",
        description="Expand a W&B grid sweep into one line of CLI arguments per run "
                    "(slurm/grid.sh runs line i as array task i). Every run's command is parsed "
                    "with bnstudy's CLI first (nothing runs): an unknown key or a bad value "
                    "fails here, naming the run.",
        epilog="Arguments after -- are added to every run for the check (as slurm/grid.sh "
               "passes them), not written.")
    parser.add_argument("sweep", help="sweep YAML (method: grid), or with --check a grid file")
    parser.add_argument("--out", help="file to write (default: stdout)")
    parser.add_argument("--check", action="store_true",
                        help="SWEEP is a grid file (one command per line): only check it")
    parser.add_argument("--no-check", dest="no_check", action="store_true",
                        help="skip parsing the commands (faster; for a quick look)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            lines = [line for line in Path(args.sweep).read_text().splitlines() if line.strip()]
        else:
            lines = grid_lines(load_sweep(args.sweep))
        if not args.no_check:
            check_lines(lines, extra)
    except (OSError, SweepError, yaml.YAMLError) as err:
        print(f"bnstudy grid: error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print(f"bnstudy grid: {len(lines)} runs parse", file=sys.stderr)
        return 0
    text = "".join(line + "\n" for line in lines)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"bnstudy grid: {len(lines)} runs -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
