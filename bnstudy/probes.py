"""The measuring functions, importable from here as before; they live in bnstudy/instruments/."""
from bnstudy.instruments import (NORM_LIKE, WEIGHT_LAYERS, LossFn, activation_modules,
                                 activations, bn_gradient_bound, bn_modules, hessian_dense,
                                 hessian_eigs, hessian_trace, ics, ics_bruteforce, landscape,
                                 landscape_bruteforce, layer_names, measuring, random_direction,
                                 random_landscape, select_layers)

__all__ = ["NORM_LIKE", "WEIGHT_LAYERS", "LossFn", "activation_modules", "activations",
           "bn_gradient_bound", "bn_modules", "hessian_dense", "hessian_eigs", "hessian_trace",
           "ics", "ics_bruteforce", "landscape", "landscape_bruteforce", "layer_names",
           "measuring", "random_direction", "random_landscape", "select_layers"]
