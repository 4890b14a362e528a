"""bnstudy: how does batch normalization help optimization? A faithful, fast reproduction."""
import importlib

__version__ = "0.1.0"
__all__ = ["VGG", "DeepLinear", "NoiseConfig", "make_norm", "resample_noise"]
_WHERE = {"VGG": "bnstudy.models", "DeepLinear": "bnstudy.models", "NoiseConfig": "bnstudy.norms",
          "make_norm": "bnstudy.norms", "resample_noise": "bnstudy.norms"}


def __getattr__(name: str):
    # imported on first use, so that `python -m bnstudy --help` does not wait for torch
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
