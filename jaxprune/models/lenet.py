"""LeNet-300-100 and the Caffe LeNet-5 (MNIST baselines), with overridable layer widths.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.errors import UserError
from jaxprune.models import layers


def _check_features(features, expected, name):
  features = tuple(features)
  if len(features) != expected or any(
      not hasattr(f, "__index__") or isinstance(f, bool) or f < 1
      for f in features):
    raise UserError(f"{name} features must be {expected} positive integers; "
                    f"got {features}.")
  return tuple(int(f) for f in features)


class LeNet300100(nn.Module):
  """Fully connected LeNet-300-100: flatten, 300, ReLU, 100, ReLU, classes.

  Attributes:
    features: widths of the two hidden layers.
    num_classes: classifier outputs.
    dtype: compute dtype.
  """
  features: Sequence[int] = (300, 100)
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No batch-dependent layers.
    x = jnp.reshape(jnp.asarray(x, self.dtype), (x.shape[0], -1))
    for i, width in enumerate(self.features):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"fc{i + 1}")(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name=f"fc{len(self.features) + 1}")(x)
    return x.astype(jnp.float32)


class LeNet5(nn.Module):
  """Caffe LeNet-5: conv5x5 20, pool, conv5x5 50, pool, 500, ReLU, classes.

  The Caffe variant has no non-linearity after the convs, only after the
  hidden dense layer; convs are VALID with bias, pools are 2x2 stride 2.

  Attributes:
    features: (conv1 filters, conv2 filters, hidden dense width).
    num_classes: classifier outputs.
    dtype: compute dtype.
  """
  features: Sequence[int] = (20, 50, 500)
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No batch-dependent layers.
    conv1, conv2, hidden = self.features
    x = jnp.asarray(x, self.dtype)
    x = layers.Conv(conv1, (5, 5), padding="VALID", dtype=self.dtype, name="conv1")(x)
    x = layers.max_pool(x, 2)
    x = layers.Conv(conv2, (5, 5), padding="VALID", dtype=self.dtype, name="conv2")(x)
    x = layers.max_pool(x, 2)
    x = jnp.reshape(x, (x.shape[0], -1))
    x = nn.relu(nn.Dense(hidden, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x).astype(jnp.float32)


def lenet300_100(num_classes: int = 10, *, features: Sequence[int] = (300, 100),
                 dtype: Any = jnp.float32) -> LeNet300100:
  """LeNet-300-100; `features` overrides the two hidden widths, `dtype` is the compute
  dtype."""
  return LeNet300100(features=_check_features(features, 2, "LeNet-300-100"),
                     num_classes=num_classes, dtype=dtype)


def lenet5(num_classes: int = 10, *, features: Sequence[int] = (20, 50, 500),
           dtype: Any = jnp.float32) -> LeNet5:
  """Caffe LeNet-5; `features` overrides (conv1, conv2, hidden) widths, `dtype` is the
  compute dtype."""
  return LeNet5(features=_check_features(features, 3, "LeNet-5"),
                num_classes=num_classes, dtype=dtype)


__all__ = ["LeNet300100", "LeNet5", "lenet300_100", "lenet5"]
