"""The 4-layer CIFAR ConvNet of the ISTA paper (docs/methods/ista.md §5), widths overridable.

A general plain conv stack; notes: docs/design/models.md.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.errors import UserError
from jaxprune.models import layers

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvNet(nn.Module):
  """Conv units (conv, BN, ReLU, optional 2x2 max pool), then fc units, then a classifier.

  Attributes:
    features: output channels of each conv (``conv{i}``, ``bn{i}``, 1-based).
    kernels: kernel size of each conv ("SAME" zero padding, stride 1).
    pools: whether a 2x2 max pool follows each conv unit.
    hidden: widths of the fc layers (``fc{i}``, bias + ReLU, no BN).
    num_classes: classifier (``classifier``) outputs.
    dtype: compute dtype; logits are float32.
  """
  features: Sequence[int] = (96, 192, 192)
  kernels: Sequence[int] = (5, 5, 3)
  pools: Sequence[bool] = (True, True, True)
  hidden: Sequence[int] = (384,)
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    for i, (width, k, pool) in enumerate(zip(self.features, self.kernels, self.pools)):
      pad = k // 2
      x = layers.Conv(width, (k, k), padding=((pad, pad), (pad, pad)), use_bias=False,
                      kernel_init=conv_init, dtype=self.dtype, name=f"conv{i + 1}")(x)
      x = layers.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           dtype=self.dtype, name=f"bn{i + 1}")(x)
      x = nn.relu(x)
      if pool:
        x = layers.max_pool(x, 2)
    x = jnp.reshape(x, (x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"fc{i + 1}")(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return x.astype(jnp.float32)


def convnet(num_classes: int = 10, *, features: Sequence[int] = (96, 192, 192),
            kernels: Sequence[int] = (5, 5, 3), pools: Sequence[bool] | None = None,
            hidden: Sequence[int] = (384,), width_multiplier: float = 1.0,
            dtype: Any = jnp.float32) -> ConvNet:
  """The ISTA paper's CIFAR ConvNet (conv 96-192-192, fc 384), or a pruned/narrower one.

  Args:
    num_classes: classifier outputs.
    features: conv widths.
    kernels: conv kernel sizes (one per conv).
    pools: 2x2 max pool after each conv unit; default all True.
    hidden: fc widths.
    width_multiplier: scales every conv and fc width (rounded, at least 1): the dense
      network of a given parameter budget that ISTA's pruned network is compared with.
    dtype: compute dtype.

  Example:
    >>> model = convnet()
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  """
  features, kernels = tuple(features), tuple(kernels)
  pools = tuple(pools) if pools is not None else (True,) * len(features)
  if not (len(features) == len(kernels) == len(pools)):
    raise UserError(f"ConvNet features {features}, kernels {kernels} and pools {pools} "
                    "need one entry per conv.")
  scale = lambda w: max(1, int(round(w * width_multiplier)))
  features = tuple(scale(int(w)) for w in features)
  hidden = tuple(scale(int(w)) for w in hidden)
  if any(w < 1 for w in features + hidden) or any(k < 1 for k in kernels):
    raise UserError(f"ConvNet widths and kernels must be positive; got {features}, "
                    f"{hidden}, {kernels}.")
  return ConvNet(features=features, kernels=tuple(int(k) for k in kernels),
                 pools=tuple(bool(p) for p in pools), hidden=hidden,
                 num_classes=num_classes, dtype=dtype)


__all__ = ["ConvNet", "convnet"]
