"""The CIFAR VGG-like network (13 conv + BN, 2 dense; no dropout), with overridable widths.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.errors import UserError
from jaxprune.models import layers

# Filters per conv, grouped by pooling block.
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
DEFAULT_FEATURES = tuple(f for block in VGG_BLOCKS for f in block) + (512,)


class VGGLike(nn.Module):
  """13 conv-BN-ReLU layers in 5 pooled blocks, dense-BN-ReLU, classifier.

  Attributes:
    features: 13 conv widths then the hidden dense width (14 numbers).
    num_classes: classifier outputs.
    dtype: compute dtype of convs and matmuls (parameters, batch-norm statistics and
      logits are float32).
  """
  features: Sequence[int] = DEFAULT_FEATURES
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda name: layers.BatchNorm(use_running_average=not train, momentum=0.9,
                                         epsilon=1e-5, dtype=self.dtype, name=name)
    x = jnp.asarray(x, self.dtype)
    i = 0
    for block in VGG_BLOCKS:
      for _ in block:
        i += 1
        x = layers.Conv(self.features[i - 1], (3, 3), padding=((1, 1), (1, 1)),
                        use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
        x = nn.relu(norm(f"bn{i}")(x))
      x = layers.max_pool(x, 2)
    x = jnp.reshape(x, (x.shape[0], -1))
    x = nn.Dense(self.features[-1], dtype=self.dtype, name="fc1")(x)
    x = nn.relu(norm("bn_fc1")(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x).astype(jnp.float32)


def vgg_like(num_classes: int = 10, *, features: Sequence[int] = DEFAULT_FEATURES,
             dtype: Any = jnp.float32) -> VGGLike:
  """The CIFAR VGG-like network; ``features`` overrides the 13 conv + 1 dense widths,
  ``dtype`` is the compute dtype."""
  features = tuple(features)
  if len(features) != len(DEFAULT_FEATURES) or any(
      not hasattr(f, "__index__") or isinstance(f, bool) or f < 1 for f in features):
    raise UserError(f"VGG-like features must be {len(DEFAULT_FEATURES)} positive "
                    f"integers (13 convs, 1 dense); got {features}.")
  return VGGLike(features=tuple(int(f) for f in features), num_classes=num_classes,
                 dtype=dtype)


__all__ = ["VGGLike", "vgg_like", "VGG_BLOCKS", "DEFAULT_FEATURES"]
