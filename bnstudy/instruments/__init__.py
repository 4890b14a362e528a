"""The study's instruments, one module per quantity (Cockpit's design): each holds the quantity's
measurement as plain PyTorch (point it at any nn.Module, no Lightning needed), its brute-force
twin (the definition written out naively, for tests and benchmarks) and the `Probe` that logs it
during training; one Lightning callback, `Instruments`, runs the probes on their schedules.

  covariate_shift   ics, ics_bruteforce, ICS                  internal covariate shift (Def. 2.1)
  loss_landscape    landscape, random_landscape, landscape_bruteforce, Landscape, RandomLandscape
  activation_stats  activations, activation_modules, ActivationStats
  curvature         hessian_eigs, hessian_trace, hessian_dense (the twin), Curvature
  theorem41         bn_modules, bn_gradient_bound, BNGradientBound

Shared machinery: state (`measuring`: the model left as found), trace (forward order, layer
names and numbers), vectors, distributed (DDP averages), hvp (Hessian-vector products, Lanczos,
power iteration), probe (Probe, Step, layer keys), callback (Instruments). The definitions are in
docs/protocol.md section 3 and docs/instruments.md.
"""
from bnstudy.instruments.activation_stats import ActivationStats, activation_modules, activations
from bnstudy.instruments.covariate_shift import ICS, ics, ics_bruteforce
from bnstudy.instruments.curvature import Curvature, hessian_dense, hessian_eigs, hessian_trace
from bnstudy.instruments.loss_landscape import (Landscape, RandomLandscape, landscape,
                                                landscape_bruteforce, random_direction,
                                                random_landscape)
from bnstudy.instruments.probe import Probe, Step, layer_key, layer_keys
from bnstudy.instruments.state import measuring
from bnstudy.instruments.theorem41 import BNGradientBound, bn_gradient_bound, bn_modules
from bnstudy.instruments.trace import NORM_LIKE, WEIGHT_LAYERS, LossFn, layer_names, select_layers

__all__ = ["Instruments", "Probe", "Step", "ICS", "Landscape", "RandomLandscape",
           "ActivationStats", "Curvature", "BNGradientBound", "layer_key", "layer_keys",
           "measuring", "layer_names", "select_layers", "ics", "ics_bruteforce", "landscape",
           "random_direction", "random_landscape", "landscape_bruteforce", "activation_modules",
           "activations", "hessian_eigs", "hessian_trace", "hessian_dense", "bn_modules",
           "bn_gradient_bound", "WEIGHT_LAYERS", "NORM_LIKE", "LossFn"]


def __getattr__(name: str):
    # the callback needs Lightning and the measurements do not: it is imported on first use, so
    # that `from bnstudy import probes` stays as light as torch
    if name == "Instruments":
        from bnstudy.instruments.callback import Instruments

        globals()["Instruments"] = Instruments
        return Instruments
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
