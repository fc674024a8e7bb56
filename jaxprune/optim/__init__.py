"""Optax transforms of the methods (``ista``, ``autoprune``, ``sgd``) and the one leaf selection.

The factories are functions; their modules are the ``*_lib`` names (docs/design/kernels.md).
"""
import sys

from jaxprune.optim import autoprune_lib, ista_lib, selection, sgd_lib
from jaxprune.optim.autoprune_lib import (AutoPruneState, autoprune, autoprune_value_and_grad,
                                          effective_model, effective_params, find_state, gates,
                                          kept_fractions, masks)
from jaxprune.optim.ista_lib import IstaState, batchnorm_scales, ista, zero_fraction
from jaxprune.optim.selection import leaf_path, paths, select
from jaxprune.optim.sgd_lib import learning_rate_schedule, sgd

# Deprecation path for the module names these transforms had before (see the docstring).
sys.modules.setdefault(__name__ + ".autoprune", autoprune_lib)
sys.modules.setdefault(__name__ + ".ista", ista_lib)
sys.modules.setdefault(__name__ + ".sgd", sgd_lib)

__all__ = ["AutoPruneState", "IstaState", "autoprune", "autoprune_lib", "autoprune_value_and_grad",
           "batchnorm_scales", "effective_model", "effective_params", "find_state", "gates",
           "ista", "ista_lib", "kept_fractions", "learning_rate_schedule", "leaf_path", "masks",
           "paths", "select", "selection", "sgd", "sgd_lib", "zero_fraction"]
