"""Channel surgery: remove groups of channels from any network and get a smaller, runnable one
(remove: prune, prune_to; rebuild; rules: register_rule; importance; targets; blocks: skippable
residual blocks; dead: shrink, prune_zeros; norm_scales: ISTA's scales). Design:
docs/design/surgery.md."""
from jaxprune.surgery.rebuild import Pruned, Rebuilt, masked_original, rebuild, slice_tree
from jaxprune.surgery.rules import register_rule, rule_for
from jaxprune.surgery.importance import CRITERIA, group_scores
from jaxprune.surgery.targets import select_blocks_and_channels, select_channels
from jaxprune.surgery.remove import prune, prune_to, remove_blocks
from jaxprune.surgery.norm_scales import ista_rho, ista_scales, rescale_gamma
from jaxprune.surgery.dead import Shrunk, check_equivalence, prune_zeros, shrink
