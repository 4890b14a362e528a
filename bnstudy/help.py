"""`fit --help` with a config: the model and data options of that config first (their values in
the config, their help), before LightningCLI's full list (which starts with 400 lines of Trainer
options and shows the model only as `--model CONFIG | CLASS_PATH_OR_NAME`)."""
from __future__ import annotations

import sys

from jsonargparse import ArgumentParser

LINKED = {"num_classes", "in_channels", "image_size", "dim"}  # set from the data (lightning_cli)


def _chosen(argv: list[str]):
    """The parsed config of these arguments (without --help), or None when they do not parse."""
    from bnstudy.lightning_cli import parse_only

    args = [a for a in argv if a not in ("-h", "--help")]
    try:
        return parse_only(args).config[args[0]]
    except Exception:  # incomplete or wrong arguments: --help then shows the full list only
        return None


def print_config_options(argv: list[str]) -> None:
    cfg = _chosen(argv)
    if cfg is None or cfg.get("model") is None:
        print("No model chosen yet: give --config FILE before --help to see its model and data "
              "options first, or list a class's options with --model.help VGGModule / "
              "--data.help DigitsData.\n")
        return
    from jsonargparse._util import import_object

    print("Model and data options of this config (set any with --model.NAME=VALUE or "
          "--data.NAME=VALUE; all options follow):\n")
    for key in ("model", "data"):
        section = cfg.get(key)
        if section is None or not section.get("class_path"):
            continue
        cls = import_object(section.class_path)
        parser = ArgumentParser(prog=f"--{key}", add_help=False, exit_on_error=False)
        parser.add_class_arguments(cls, key, fail_untyped=False, sub_configs=True, skip=LINKED)
        values = {f"{key}.{k}": v for k, v in dict(section.get("init_args") or {}).items()
                  if f"{key}.{k}" in {a.dest for a in parser._actions}}
        try:
            parser.set_defaults(values)
        except Exception:
            pass
        text = parser.format_help()
        body = text.split("\n\n", 1)[1] if text.startswith("usage:") else text
        print(f"== {key}: {section.class_path} ==")
        print(body.rstrip())
        linked = [k for k in LINKED if k in getattr(cls.__init__, "__code__").co_varnames]
        if key == "model" and linked:
            print(f"  ({', '.join(linked)}: taken from the data module, see Linked arguments)")
        print()
    sys.stdout.flush()
