"""Channel surgery: remove groups of channels from any network and get a smaller, runnable one.

Modules: ``remove`` (prune, prune_to), ``rebuild`` (the smaller network from per-leaf
slices), ``rules`` (per-layer rebuild rules, register_rule), ``importance`` (criteria),
``targets`` (channel selection under a FLOPs/params/latency target), ``dead`` (dead
channels measured, folded, removed: shrink, prune_zeros), ``norm_scales`` (ISTA's scales).
"""
from jaxprune.surgery.rebuild import Pruned, Rebuilt, rebuild, slice_tree
from jaxprune.surgery.rules import register_rule, rule_for
from jaxprune.surgery.importance import CRITERIA, group_scores
from jaxprune.surgery.targets import select_channels
from jaxprune.surgery.remove import prune, prune_to
from jaxprune.surgery.norm_scales import ista_rho, ista_scales, rescale_gamma
from jaxprune.surgery.dead import Shrunk, check_equivalence, prune_zeros, shrink
