"""Channel surgery: remove groups of channels from any network and get a smaller, runnable one.

- :mod:`jaxprune.surgery.prune` — ``prune(model, variables, input_shape, keep)``: the
  one mechanism (graph groups -> per-leaf slices -> rebuilt network), and
  ``prune_to``: a criterion and a FLOPs/params target in one call.
- :mod:`jaxprune.surgery.rebuild` — the smaller Linen or NNX network from per-leaf
  slices.
- :mod:`jaxprune.surgery.importance` — group criteria: L1, L2, BN scale, Taylor, random.
- :mod:`jaxprune.surgery.pruner` — targets and rankings (local, global, ``round_to``).
- :mod:`jaxprune.surgery.zero_gamma` — ISTA on the same graph: the scales it may
  sparsify (``ista_scales``), removal of zero-gamma channels with their constants
  folded (``shrink``), the per-layer penalties (``ista_rho``), the gamma-W rescaling
  (``rescale_gamma``) and the masked == shrunk check (``check_equivalence``).
"""
from jaxprune.surgery.rebuild import Pruned, Rebuilt, rebuild, slice_tree
from jaxprune.surgery.rules import register_rule, rule_for
from jaxprune.surgery.importance import CRITERIA, group_scores
from jaxprune.surgery.pruner import select_channels
from jaxprune.surgery.prune import prune, prune_to, prune_zeros
from jaxprune.surgery.zero_gamma import (Shrunk, check_equivalence, ista_rho, ista_scales,
                                         rescale_gamma, shrink)
