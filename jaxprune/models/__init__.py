"""jaxprune's Flax models (Linen, NHWC in, float32 logits out, a compute ``dtype``) and
the by-name registry configs use (:func:`get_model`, :func:`build_model`)."""

import inspect
from typing import Any

import jax.numpy as jnp

from jaxprune.errors import UserError
from jaxprune.models import external
from jaxprune.models.convnet import ConvNet
from jaxprune.models.convnet import convnet
from jaxprune.models.dnw import continuous_graph
from jaxprune.models.dnw import ContinuousTimeGraphNet
from jaxprune.models.dnw import discrete_graph
from jaxprune.models.dnw import DiscreteTimeGraphNet
from jaxprune.models.dnw import mobilenet_graph
from jaxprune.models.dnw import MobileNetV1Like
from jaxprune.models.dnw import static_graph
from jaxprune.models.dnw import StaticGraphNet
from jaxprune.models.lenet import LeNet300100
from jaxprune.models.lenet import LeNet5
from jaxprune.models.lenet import lenet300_100
from jaxprune.models.lenet import lenet5
from jaxprune.models.resnet import block_type
from jaxprune.models.resnet import cifar_resnet
from jaxprune.models.resnet import cifar_resnet_from_shape
from jaxprune.models.resnet import default_blocks
from jaxprune.models.resnet import default_widths
from jaxprune.models.resnet import imagenet_resnet
from jaxprune.models.resnet import imagenet_resnet_from_shape
from jaxprune.models.resnet import ResidualBlock
from jaxprune.models.resnet import ResNet
from jaxprune.models.resnet import stage_depths
from jaxprune.models.tas_resnet import depth_candidates
from jaxprune.models.tas_resnet import imagenet_depth_candidates
from jaxprune.models.tas_resnet import tas_cifar_resnet
from jaxprune.models.tas_resnet import tas_imagenet_resnet
from jaxprune.models.tas_resnet import TASResNet
from jaxprune.models.tas_resnet import width_candidates
from jaxprune.models.vgg import vgg_like
from jaxprune.models.vgg import VGGLike

MODELS = {
    "cifar_resnet": cifar_resnet,
    "imagenet_resnet": imagenet_resnet,
    "lenet5": lenet5,
    "lenet300_100": lenet300_100,
    "vgg_like": vgg_like,
    "dnw_static": static_graph,
    "dnw_discrete": discrete_graph,
    "dnw_continuous": continuous_graph,
    "dnw_mobilenet": mobilenet_graph,
    "convnet": convnet,
}


def get_model(name: str, num_classes: int, **kwargs: Any):
  """Builds the model registered as `name`.

  Args:
    name: one of ``MODELS`` ("cifar_resnet", "imagenet_resnet", "lenet5",
      "lenet300_100").
    num_classes: classifier outputs.
    **kwargs: the factory's other arguments (e.g. ``depth=56``, ``widths``,
      ``blocks`` for ResNets; ``features`` for LeNets).

  Returns:
    A Flax Linen module.

  Raises:
    UserError: for an unknown name, an unknown or missing argument.
  """
  if name not in MODELS:
    raise UserError(f"Unknown model {name!r}; known models: "
                    f"{', '.join(sorted(MODELS))}.")
  factory = MODELS[name]
  signature = inspect.signature(factory)
  try:
    signature.bind(num_classes=num_classes, **kwargs)
  except TypeError as e:
    accepted = [p for p in signature.parameters if p != "num_classes"]
    raise UserError(f"Bad arguments for model {name!r} ({e}); it accepts "
                    f"{', '.join(accepted)}.") from None
  return factory(num_classes=num_classes, **kwargs)


def build_model(model_cfg, num_classes: int, input_shape=None):
  """The model named by a ``model`` config section.

  A jaxprune model (``name`` in :data:`MODELS`) gets the section's other fields
  (None-valued ones omitted) updated by ``kwargs``; a user's factory
  (``name="<module>:<factory>"``, :mod:`jaxprune.models.external`) gets only ``kwargs``
  and is checked on ``input_shape``.
  """
  fields = model_cfg.to_dict()
  extra = external.parse_kwargs(fields.pop("kwargs", None))
  name = fields.pop("name")
  dtype = fields.pop("dtype", None)
  if dtype not in (None, "float32"):  # compute dtype; parameters stay float32
    fields["dtype"] = jnp.dtype(dtype)
  if external.is_external(name):
    if input_shape is None:
      raise ValueError("build_model needs the input shape for a user model")
    return external.build(name, extra, num_classes, input_shape, fields.get("dtype"))
  kwargs = {k: v for k, v in fields.items() if v is not None}
  return get_model(name, num_classes=num_classes, **{**kwargs, **extra})


__all__ = [
    "MODELS", "get_model", "build_model", "ResNet", "ResidualBlock", "LeNet5", "LeNet300100",
    "cifar_resnet", "imagenet_resnet", "cifar_resnet_from_shape",
    "imagenet_resnet_from_shape", "lenet5", "lenet300_100", "default_widths",
    "default_blocks", "stage_depths", "block_type", "TASResNet",
    "tas_cifar_resnet", "tas_imagenet_resnet", "width_candidates",
    "depth_candidates", "imagenet_depth_candidates",
    "VGGLike", "vgg_like",
    "StaticGraphNet", "DiscreteTimeGraphNet", "ContinuousTimeGraphNet", "MobileNetV1Like",
    "static_graph", "discrete_graph", "continuous_graph", "mobilenet_graph",
    "ConvNet", "convnet",
]
