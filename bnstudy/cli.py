"""`python -m bnstudy SUBCOMMAND ...` (or `bnstudy SUBCOMMAND ...`): the entry point.

Light on purpose: `--help` and the subcommands that do not train import nothing heavy. fit,
validate and test are the study's LightningCLI (bnstudy/lightning_cli.py), imported only when one
of them runs. Bad input ends in one line, `bnstudy: error: ...`, exit code 2.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys

# name: (module whose main(argv) runs it, one-line help). A subcommand is offered only when its
# module is there, so this table may name subcommands that other branches add.
SUBCOMMANDS = {
    "fit": ("bnstudy.lightning_cli", "train a model; rerunning in its --run_dir resumes it"),
    "validate": ("bnstudy.lightning_cli", "evaluate a model or checkpoint on the validation split"),
    "test": ("bnstudy.lightning_cli", "evaluate a model or checkpoint on the test split"),
    "plot": ("bnstudy.analysis.plot", "plot metrics of runs side by side"),
    "grid": ("bnstudy.study.grid", "expand a W&B grid sweep into one checked command per run"),
    "report": ("bnstudy.analysis.report", "rebuild the paper's figures and claims from runs"),
    "reproduce": ("bnstudy.study.reproduce", "run the mini reproduction"),
    "findings": ("bnstudy.study.findings", "answer the open questions at mini scale"),
}
LIGHTNING = ("fit", "validate", "test")
PROG = "bnstudy"
_LAZY = {"StudyCLI", "cli_main", "default_run_dir", "resume_path", "wandb_run_id",
         "ensure_wandb_mode", "RUN_DIR_ENV"}


def __getattr__(name: str):
    # the LightningCLI parts, importable from here as before, loaded on first use
    if name in _LAZY:
        return getattr(importlib.import_module("bnstudy.lightning_cli"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available() -> dict[str, str]:
    """The subcommands whose module can be imported here: {name: one-line help}."""
    out = {}
    for name, (module, help_line) in SUBCOMMANDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            out[name] = help_line
    return out


def usage() -> str:
    subs = available()
    width = max(map(len, subs)) + 2
    lines = [f"usage: {PROG} SUBCOMMAND [options]   (also: python -m bnstudy SUBCOMMAND ...)", "",
             "How does batch normalization help optimization? Train, measure and report.", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}{help_line}" for name, help_line in subs.items()]
    lines += ["", f"`{PROG} SUBCOMMAND --help` shows the options of one; for fit/validate/test, "
              "give the config first:",
              f"  {PROG} fit --config configs/quickstart.yaml --help   "
              "(the model and data options of that config come first)",
              f"  {PROG} fit --model.help VGGModule                    "
              "(every option of a model or data class)",
              f"  {PROG} fit --config configs/vgg_bn.yaml --print_config  (the merged config)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argv  # None: LightningCLI reads sys.argv itself
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    name = argv[0]
    subs = available()
    if name not in subs:
        hint = "" if name.startswith("-") else f"unknown subcommand {name!r}; "
        print(f"{PROG}: error: {hint}choose one of {', '.join(subs)} "
              f"(`{PROG} --help` lists them)", file=sys.stderr)
        return 2
    if name not in LIGHTNING:
        return importlib.import_module(SUBCOMMANDS[name][0]).main(argv[1:])
    return run_lightning(args, argv)


def run_lightning(args: list[str] | None, argv: list[str]) -> int:
    from jsonargparse import ArgumentError

    from bnstudy.callbacks import FitSummary, Interrupted
    from bnstudy.data import DataNotFoundError
    from bnstudy.lightning_cli import cli_main
    from bnstudy.rundir import UsageError

    if any(a.split("=")[0].endswith(".help") for a in argv):
        sys.argv[0] = PROG  # jsonargparse names the class help after it (help exits: safe)
    if "-h" in argv or "--help" in argv:
        from bnstudy.help import print_config_options

        print_config_options(argv)  # the chosen config's model and data options, first
    try:
        cli = cli_main(args)
    except Interrupted as stop:
        print(f"{PROG}: {stop}; rerun the same command to resume", file=sys.stderr)
        return 128 + stop.signum
    except (UsageError, DataNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only file system, ...
        if os.environ.get("BNSTUDY_DEBUG") or err.filename is None:
            raise
        print(f"{PROG}: error: cannot write {err.filename}: {err.strerror}; files already "
              "written are intact (checkpoints are replaced only once fully written)",
              file=sys.stderr)
        return 2
    except (ArgumentError, ValueError, TypeError) as err:
        if os.environ.get("BNSTUDY_DEBUG") or not _is_config_error(err):
            raise
        print(f"{PROG}: error: {summarize_config_error(str(err))}", file=sys.stderr)
        return 2
    for callback in getattr(cli.trainer, "callbacks", []) if hasattr(cli, "trainer") else []:
        if isinstance(callback, FitSummary):
            callback.print_lines()  # the run directory, what is in it, the next command
    return 0


def summarize_config_error(message: str) -> str:
    """One line naming the key from jsonargparse's nested multi-line error report."""
    group = re.search(r"""(?:Parser key|Problem with given value for) ["'](\w+)["']""", message)
    if m := re.search(r"unrecognized arguments: (\S+)", message):
        return f"unknown key {m.group(1).lstrip('-').split('=')[0]}"
    if m := re.search(r"Option '([^']+)' is not accepted", message):
        cls = re.search(r"class_path '([^']+)'", message)
        prefix = (group.group(1) + ".") if group else ""
        return f"unknown key {prefix}{m.group(1)}" + (f" (not an argument of {cls.group(1)})"
                                                      if cls else "")
    if m := re.search(r"((?:model|data|trainer)\.[\w.]+ must [^\n]+)", message):
        return m.group(1)
    keys = re.findall(r"""Parser key ["']([\w.]+)["']:\s*\n?\s*([^\n]+)""", message)
    if keys:
        key, why = keys[-1]
        if group and group.group(1) != key and not key.startswith(group.group(1) + "."):
            key = f"{group.group(1)}.{key}"
        return f"bad value for {key}: {why.strip()}"
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    return lines[0] if lines else message


def _is_config_error(err: Exception) -> bool:
    from jsonargparse import ArgumentError

    # parse errors, and errors jsonargparse raises while instantiating classes from the config
    tb = err.__traceback__
    while tb is not None:
        if "jsonargparse" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return isinstance(err, ArgumentError)
