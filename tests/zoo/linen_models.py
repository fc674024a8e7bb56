"""The zoo in Linen, written the way Flax's examples write models (not jaxprune's).

Every model takes its widths as explicit fields, so a pruned network is the same
code with smaller numbers, and names its layers so that the NNX twins in
:mod:`zoo.nnx_models` have the same parameter paths. ``__call__(x, train=True)``
as in Flax's examples/imagenet (BatchNorm: running averages when not training).
"""
import functools

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.models import layers
from zoo import counts

CLASSES = counts.CLASSES


def _bn(train, name, **kw):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      name=name, **kw)


class PlainCNN(nn.Module):
  c1: int
  c2: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = nn.relu(nn.Conv(self.c1, (3, 3), name="conv1")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(self.c2, (3, 3), name="conv2")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(CLASSES, name="head")(x)


class VGG(nn.Module):
  c1: int
  c2: int
  c3: int
  c4: int
  hidden: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i, c in enumerate((self.c1, self.c2, self.c3, self.c4), 1):
      x = nn.Conv(c, (3, 3), use_bias=False, name=f"conv{i}")(x)
      x = nn.relu(_bn(train, f"bn{i}")(x))
      if i % 2 == 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
    return nn.Dense(CLASSES, name="fc2")(x)


class ResNetBlock(nn.Module):
  """Flax examples/imagenet's ResNetBlock, with the middle width explicit."""
  filters: int
  mid: int
  strides: tuple = (1, 1)
  train: bool = True

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not self.train,
                             momentum=0.9, epsilon=1e-5)
    residual = x
    y = conv(self.mid, (3, 3), self.strides, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.filters, (3, 3), name="conv2")(y)
    y = norm(scale_init=nn.initializers.zeros_init(), name="bn2")(y)
    if residual.shape != y.shape:
      residual = conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class BottleneckResNetBlock(nn.Module):
  """Flax examples/imagenet's BottleneckResNetBlock with explicit widths a, b, out."""
  filters: int  # output width (Flax: 4 * filters)
  a: int
  b: int
  strides: tuple = (1, 1)
  train: bool = True

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not self.train,
                             momentum=0.9, epsilon=1e-5)
    residual = x
    y = nn.relu(norm(name="bn1")(conv(self.a, (1, 1), name="conv1")(x)))
    y = nn.relu(norm(name="bn2")(conv(self.b, (3, 3), self.strides, name="conv2")(y)))
    y = conv(self.filters, (1, 1), name="conv3")(y)
    y = norm(scale_init=nn.initializers.zeros_init(), name="bn3")(y)
    if residual.shape != y.shape:
      residual = conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


def _stem(x, width, train):
  x = nn.Conv(width, (3, 3), use_bias=False, name="conv_init")(x)
  x = nn.relu(_bn(train, "bn_init")(x))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")


class ResNetBasic(nn.Module):
  stem: int
  s1b0: int
  s1b1: int
  s2: int
  s2b0: int
  s2b1: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = _stem(x, self.stem, train)
    x = ResNetBlock(self.stem, self.s1b0, train=train, name="s1b0")(x)
    x = ResNetBlock(self.stem, self.s1b1, train=train, name="s1b1")(x)
    x = ResNetBlock(self.s2, self.s2b0, (2, 2), train=train, name="s2b0")(x)
    x = ResNetBlock(self.s2, self.s2b1, train=train, name="s2b1")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(CLASSES, name="head")(x)


class ResNetBottleneck(nn.Module):
  stem: int
  s1_out: int
  s1b0_a: int
  s1b0_b: int
  s1b1_a: int
  s1b1_b: int
  s2_out: int
  s2b0_a: int
  s2b0_b: int
  s2b1_a: int
  s2b1_b: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = _stem(x, self.stem, train)
    for stage, strides in (("s1", (1, 1)), ("s2", (2, 2))):
      out = getattr(self, stage + "_out")
      for i in (0, 1):
        name = f"{stage}b{i}"
        x = BottleneckResNetBlock(out, getattr(self, name + "_a"), getattr(self, name + "_b"),
                                  strides if i == 0 else (1, 1), train=train, name=name)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(CLASSES, name="head")(x)


class MobileNetV1(nn.Module):
  c0: int
  c1: int
  c2: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.c0, (3, 3), (2, 2), use_bias=False, name="conv_stem")(x)
    x = nn.relu(_bn(train, "bn_stem")(x))
    cin = self.c0
    for i, (cout, stride) in enumerate(((self.c1, 1), (self.c2, 2)), 1):
      x = nn.Conv(cin, (3, 3), (stride, stride), feature_group_count=cin, use_bias=False,
                  name=f"dw{i}")(x)
      x = nn.relu(_bn(train, f"dw{i}_bn")(x))
      x = nn.Conv(cout, (1, 1), use_bias=False, name=f"pw{i}")(x)
      x = nn.relu(_bn(train, f"pw{i}_bn")(x))
      cin = cout
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(CLASSES, name="head")(x)


class InvertedResidual(nn.Module):
  """MobileNetV2's block: expand 1x1, depthwise 3x3, linear 1x1 projection."""
  expand: int
  out: int
  stride: int
  residual: bool
  train: bool = True

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.expand, (1, 1), use_bias=False, name="expand")(x)
    y = nn.relu6(_bn(self.train, "expand_bn")(y))
    y = nn.Conv(self.expand, (3, 3), (self.stride, self.stride),
                feature_group_count=self.expand, use_bias=False, name="dw")(y)
    y = nn.relu6(_bn(self.train, "dw_bn")(y))
    y = nn.Conv(self.out, (1, 1), use_bias=False, name="project")(y)
    y = _bn(self.train, "project_bn")(y)  # linear bottleneck: no activation
    return x + y if self.residual else y


class MobileNetV2(nn.Module):
  c0: int
  e1: int
  c2: int
  e2: int
  e3: int
  ch: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.c0, (3, 3), (2, 2), use_bias=False, name="conv_stem")(x)
    x = nn.relu6(_bn(train, "bn_stem")(x))
    x = InvertedResidual(self.e1, self.c0, 1, True, train, name="b1")(x)
    x = InvertedResidual(self.e2, self.c2, 2, False, train, name="b2")(x)
    x = InvertedResidual(self.e3, self.c2, 1, True, train, name="b3")(x)
    x = nn.Conv(self.ch, (1, 1), use_bias=False, name="conv_head")(x)
    x = nn.relu6(_bn(train, "bn_head")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(CLASSES, name="head")(x)


class DenseNet(nn.Module):
  c0: int
  g1: int
  g2: int
  g3: int
  t: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.c0, (3, 3), (2, 2), use_bias=False, name="conv_stem")(x)
    for i, g in enumerate((self.g1, self.g2, self.g3), 1):
      y = nn.relu(_bn(train, f"layer{i}_bn")(x))
      y = nn.Conv(g, (3, 3), use_bias=False, name=f"layer{i}_conv")(y)
      x = jnp.concatenate([x, y], axis=-1)
    x = nn.relu(_bn(train, "trans_bn")(x))
    x = nn.Conv(self.t, (1, 1), use_bias=False, name="trans_conv")(x)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(_bn(train, "final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(CLASSES, name="head")(x)


class SplitConcat(nn.Module):
  """ShuffleNetV2-like unit: split the channels, transform one part, concatenate."""
  left: int
  right: int
  b: int
  r2: int
  c3: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.left + self.right, (3, 3), (2, 2), use_bias=False, name="conv_stem")(x)
    x = nn.relu(_bn(train, "bn_stem")(x))
    x1, x2 = jnp.split(x, [self.left], axis=-1)
    y = nn.relu(_bn(train, "pw1_bn")(nn.Conv(self.b, (1, 1), use_bias=False, name="pw1")(x2)))
    y = nn.Conv(self.b, (3, 3), feature_group_count=self.b, use_bias=False, name="dw")(y)
    y = _bn(train, "dw_bn")(y)
    y = nn.relu(_bn(train, "pw2_bn")(nn.Conv(self.r2, (1, 1), use_bias=False, name="pw2")(y)))
    x = jnp.concatenate([x1, y], axis=-1)
    x = nn.relu(_bn(train, "fuse_bn")(nn.Conv(self.c3, (1, 1), use_bias=False, name="fuse")(x)))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(CLASSES, name="head")(x)


class UNet(nn.Module):
  e1: int
  e2: int
  m: int
  u2: int
  d2: int
  u1: int
  d1: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    def cbr(x, c, name):
      x = nn.Conv(c, (3, 3), use_bias=False, name=name)(x)
      return nn.relu(_bn(train, name + "_bn")(x))

    s1 = cbr(x, self.e1, "enc1")
    s2 = cbr(nn.max_pool(s1, (2, 2), strides=(2, 2)), self.e2, "enc2")
    x = cbr(nn.max_pool(s2, (2, 2), strides=(2, 2)), self.m, "mid")
    x = nn.ConvTranspose(self.u2, (2, 2), strides=(2, 2), name="up2")(x)
    x = cbr(jnp.concatenate([x, s2], axis=-1), self.d2, "dec2")
    x = nn.ConvTranspose(self.u1, (2, 2), strides=(2, 2), name="up1")(x)
    x = cbr(jnp.concatenate([x, s1], axis=-1), self.d1, "dec1")
    return nn.Conv(counts.UNET_OUT, (1, 1), name="out")(x)


class MLP(nn.Module):
  h1: int
  h2: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.h1, name="fc1")(x))
    x = nn.relu(nn.Dense(self.h2, name="fc2")(x))
    return nn.Dense(CLASSES, name="fc3")(x)


class ViT(nn.Module):
  """One pre-LN encoder block with a cls token (big_vision / Flax ViT layout)."""
  embed: int
  heads: int
  qk_dim: int
  v_dim: int
  mlp: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    if self.qk_dim != self.v_dim:
      raise ValueError("nn.MultiHeadDotProductAttention has one head_dim for q, k and v")
    p = counts.VIT_PATCH
    x = nn.Conv(self.embed, (p, p), (p, p), padding="VALID", name="patch")(x)
    n, h, w, e = x.shape
    x = x.reshape((n, h * w, e))
    cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, e))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    pos = self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], e))
    x = x + pos
    y = nn.LayerNorm(name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads,
                                        qkv_features=self.heads * self.qk_dim,
                                        out_features=e, deterministic=True, name="attn")(y)
    x = x + y
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.gelu(nn.Dense(self.mlp, name="mlp1")(y))
    x = x + nn.Dense(e, name="mlp2")(y)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(CLASSES, name="head")(x[:, 0])


class RematBlock(nn.Module):
  width: int
  mid: int
  train: bool = True

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.mid, (3, 3), use_bias=False, name="conv1")(x)
    y = nn.relu(_bn(self.train, "bn1")(y))
    y = nn.Conv(self.width, (3, 3), use_bias=False, name="conv2")(y)
    return nn.relu(x + _bn(self.train, "bn2")(y))


class RematCNN(nn.Module):
  c0: int
  m1: int
  m2: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.c0, (3, 3), (2, 2), use_bias=False, name="conv_stem")(x)
    x = nn.relu(_bn(train, "bn_stem")(x))
    block = nn.remat(RematBlock)
    x = block(self.c0, self.m1, train, name="block1")(x)
    x = block(self.c0, self.m2, train, name="block2")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(CLASSES, name="head")(x)


class JaxpruneConv(nn.Module):
  """jaxprune's own layers: Conv (custom_vjp conv2d), BatchNorm and max_pool."""
  c1: int
  c2: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = layers.Conv(self.c1, (3, 3), padding=1, use_bias=False, name="conv1")(x)
    x = layers.BatchNorm(use_running_average=not train, name="bn1")(x)
    x = nn.relu(x)
    x = nn.relu(layers.Conv(self.c2, (3, 3), (2, 2), padding=1, name="conv2")(x))
    x = layers.max_pool(x, 2)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(CLASSES, name="head")(x)
