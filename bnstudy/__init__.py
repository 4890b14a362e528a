"""bnstudy: how does batch normalization help optimization? A faithful, fast reproduction."""
import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["VGG", "DeepLinear", "NoiseConfig", "make_norm", "resample_noise"]
_WHERE = {"VGG": "bnstudy.models", "DeepLinear": "bnstudy.models", "NoiseConfig": "bnstudy.norms",
          "make_norm": "bnstudy.norms", "resample_noise": "bnstudy.norms"}

# Modules that moved into bnstudy/analysis/ and bnstudy/study/: their old import paths load the
# very same module. (An alias, not a file at the old path: a file there would stop git from
# following the move, and other branches' edits to the moved files would no longer merge.)
MOVED = {"bnstudy.runs": "bnstudy.analysis.runs", "bnstudy.claims": "bnstudy.analysis.claims",
         "bnstudy.plot": "bnstudy.analysis.plot", "bnstudy.report": "bnstudy.analysis.report",
         "bnstudy.reproduce": "bnstudy.study.reproduce",
         "bnstudy.findings": "bnstudy.study.findings", "bnstudy.grid": "bnstudy.study.grid"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


# first: an editable install of an older checkout would otherwise find the old files there
if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())


def __getattr__(name: str):
    # imported on first use, so that `python -m bnstudy --help` does not wait for torch
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
