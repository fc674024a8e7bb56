"""TAS search spaces: one protocol (:class:`Space`), the official ResNet supernet's
(:class:`ResNetSpace`) and any model's, over its channel groups (:class:`SearchSpace`)."""
from jaxprune.search.base import depth_candidates
from jaxprune.search.base import imagenet_depth_candidates
from jaxprune.search.base import Selection
from jaxprune.search.base import Space
from jaxprune.search.base import width_candidates
from jaxprune.search.resnet import ResNetSpace
from jaxprune.search.resnet import tas_argmax_cost
from jaxprune.search.resnet import tas_argmax_cost_traced
from jaxprune.search.resnet import tas_expected_cost
from jaxprune.search.space import rounded_candidates
from jaxprune.search.space import SearchSpace

__all__ = ["ResNetSpace", "SearchSpace", "Selection", "Space", "depth_candidates",
           "imagenet_depth_candidates", "rounded_candidates", "tas_argmax_cost",
           "tas_argmax_cost_traced", "tas_expected_cost", "width_candidates"]
