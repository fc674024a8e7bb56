"""Models written the way Flax's docs write them, outside the jaxprune package.

The CLI tests name them as ``--config.model.name=user_models:<factory>`` with this
folder on PYTHONPATH (a user's own module).
"""
from functools import partial
from typing import Any

import flax.linen as nn
from flax import nnx


class LinenCNN(nn.Module):
  """The Flax docs' CNN, with batch norm and a compute ``dtype`` field as in Flax's
  examples (None: the inputs' dtype)."""
  features: int = 16
  num_classes: int = 10
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.features, (3, 3), dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.Conv(2 * self.features, (3, 3), dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
    x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(32, dtype=self.dtype)(x)
    x = nn.relu(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class LinenMLP(nn.Module):
  """No mode flag at all (the Flax docs' MLP)."""
  hidden: int = 32
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


def linen_cnn(num_classes: int, features: int = 16):
  return LinenCNN(features=features, num_classes=num_classes)


def linen_mlp(num_classes: int, hidden: int = 32):
  return LinenMLP(hidden=hidden, num_classes=num_classes)


class NNXCNN(nnx.Module):
  """The Flax NNX docs' CNN (MNIST tutorial shape), with batch norm and dropout."""

  def __init__(self, in_channels: int, features: int, num_classes: int, spatial: int,
               *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_channels, features, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(features, rngs=rngs)
    self.conv2 = nnx.Conv(features, 2 * features, kernel_size=(3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(2 * features, rngs=rngs)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(2 * features * (spatial // 4) ** 2, 32, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.linear2 = nnx.Linear(32, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.bn1(self.conv1(x))))
    x = self.avg_pool(nnx.relu(self.bn2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)
    x = self.dropout(nnx.relu(self.linear1(x)))
    return self.linear2(x)


def nnx_cnn(num_classes: int, in_channels: int = 3, features: int = 16, spatial: int = 32,
            rngs: nnx.Rngs | None = None):
  return NNXCNN(in_channels, features, num_classes, spatial, rngs=rngs or nnx.Rngs(0))


class IgnoresDtype(LinenMLP):
  """Has a ``dtype`` field that its layers never see."""
  dtype: Any = None


def ignores_dtype(num_classes: int):
  return IgnoresDtype(hidden=8, num_classes=num_classes)


def fixed_head_mlp():
  """A factory that does not take num_classes: its head has 10 outputs."""
  return LinenMLP(hidden=8, num_classes=10)


def not_a_model(num_classes: int):
  return {"layers": num_classes}


def broken_factory(num_classes: int):
  raise RuntimeError("the user's factory is broken")



class NNXBlock(nnx.Module):
  """A residual block as the NNX docs write one: ``relu(x + bn(conv(relu(bn(conv(x))))))``."""

  def __init__(self, features: int, dtype=None, *, rngs: nnx.Rngs):
    conv = partial(nnx.Conv, kernel_size=(3, 3), use_bias=False, dtype=dtype, rngs=rngs)
    self.conv1 = conv(features, features)
    self.bn1 = nnx.BatchNorm(features, dtype=dtype, rngs=rngs)
    self.conv2 = conv(features, features)
    self.bn2 = nnx.BatchNorm(features, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    return nnx.relu(x + self.bn2(self.conv2(y)))


class NNXResNet(nnx.Module):
  """A stem, a stage of ``blocks`` residual blocks in an ``nnx.List``, a linear head;
  ``dtype`` is the layers' compute dtype (None: the inputs')."""

  def __init__(self, in_channels: int, features: int, blocks: int, num_classes: int,
               dtype=None, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(in_channels, features, kernel_size=(3, 3), dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([NNXBlock(features, dtype, rngs=rngs) for _ in range(blocks)])
    self.head = nnx.Linear(features, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


def nnx_resnet(num_classes: int, in_channels: int = 3, features: int = 8, blocks: int = 3,
               dtype=None, rngs: nnx.Rngs | None = None):
  return NNXResNet(in_channels, features, blocks, num_classes, dtype,
                   rngs=rngs or nnx.Rngs(0))
