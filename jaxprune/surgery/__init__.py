"""Channel surgery: remove groups of channels from a network and get a smaller, runnable one.

- :mod:`jaxprune.surgery.rebuild` — the smaller runnable network (Linen or NNX) from
  per-leaf slices (``rebuild``), the step after the graph's ``kept_slices``.
- :mod:`jaxprune.surgery.zero_gamma` — ISTA's removal of zero-gamma channels
  (``shrink``), its per-layer penalties (``ista_rho``), the gamma-W rescaling
  (``rescale_gamma``) and the masked == shrunk check (``check_equivalence``).
"""
from jaxprune.surgery.zero_gamma import (Shrunk, Unit, check_equivalence, ista_rho,
                                         prunable_scales, rescale_gamma, shrink,
                                         structure)
from jaxprune.surgery.rebuild import Pruned, Rebuilt, rebuild, slice_tree
