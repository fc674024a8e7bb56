"""Optax transforms of the pruning methods and the shared leaf selection.

Names (functions are what DESIGN.md's public API calls; modules have their own names so that
no function hides a module):

- ``optim.ista(...)``, ``optim.autoprune(...)``: the transform factories (functions);
- ``jaxprune.optim.ista_lib``, ``jaxprune.optim.autoprune_lib``: their modules
  (``import jaxprune.optim.autoprune_lib as ap; ap.effective_params``);
- ``jaxprune.optim.selection``: :func:`leaf_path` and :func:`select`, one path convention for
  Linen params, NNX state (trailing ``value`` dropped), ``nnx.as_pure`` / ``nnx.to_pure_dict``
  trees and plain dicts;
- ``jaxprune.optim.sgd_lib``: the recipes' SGD (``optim.sgd``, ``optim.learning_rate_schedule``).

Deprecated: the old module paths ``jaxprune.optim.autoprune`` / ``.ista`` / ``.sgd`` stay
importable for ``importlib.import_module(...)`` and ``from jaxprune.optim.autoprune import
effective_params`` (they name the ``*_lib`` modules in ``sys.modules``), but the attribute
``jaxprune.optim.autoprune`` (and so ``import jaxprune.optim.autoprune as ap``) is the function.
Use the ``*_lib`` names.
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
