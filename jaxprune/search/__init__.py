"""TAS search on any model: the supernet is the user's own network, searched over the
channel groups of its dependency graph (:class:`SearchSpace`)."""
from jaxprune.search.space import rounded_candidates
from jaxprune.search.space import SearchSpace

__all__ = ["SearchSpace", "rounded_candidates"]
