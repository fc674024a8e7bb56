"""Optax transforms of the pruning methods and the shared leaf selection."""
from jaxprune.optim.autoprune import AutoPruneState, autoprune
from jaxprune.optim.selection import leaf_path, select
from jaxprune.optim.sgd import learning_rate_schedule, sgd
from jaxprune.optim.ista import IstaState, ista, zero_fraction
