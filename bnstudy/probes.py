"""The measuring functions, importable from here as before; they live in bnstudy/instruments/."""
from bnstudy.instruments import (NORM_LIKE, WEIGHT_LAYERS, LossFn, Params, activation_modules,
                                 activations, bn_gradient_bound, bn_modules,
                                 filter_normalized_direction, gradient_projections, hessian_dense,
                                 hessian_density, hessian_density_dense, hessian_eigs,
                                 hessian_trace, ics, ics_bruteforce, interpolate, landscape,
                                 landscape_bruteforce, layer_names, loss_surface,
                                 loss_surface_bruteforce, measuring, merge_surfaces,
                                 parameter_names, pca_directions, project, random_direction,
                                 random_landscape, select_layers)

__all__ = ["NORM_LIKE", "WEIGHT_LAYERS", "LossFn", "Params", "activation_modules", "activations",
           "bn_gradient_bound", "bn_modules", "filter_normalized_direction",
           "gradient_projections", "hessian_dense", "hessian_density", "hessian_density_dense",
           "hessian_eigs", "hessian_trace", "ics", "ics_bruteforce", "interpolate", "landscape",
           "landscape_bruteforce", "layer_names", "loss_surface", "loss_surface_bruteforce",
           "measuring", "merge_surfaces", "parameter_names", "pca_directions", "project",
           "random_direction", "random_landscape", "select_layers"]
