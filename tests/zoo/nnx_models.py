"""The zoo in NNX: the twins of :mod:`zoo.linen_models`, same widths, same parameter paths.

Written the way Flax's NNX guides write models: layers built in ``__init__`` from
explicit in/out widths, ``model.train()`` / ``model.eval()`` switching BatchNorm.
Attribute names equal the Linen layer names, so ``nnx.state(model, nnx.Param)``
has the paths of the Linen ``params`` collection (``conv1/kernel``, ``s1b0/bn2/scale``).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune.models import layers
from zoo import counts

CLASSES = counts.CLASSES


def _bn(c, rngs):
  return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)


def _avg_pool(x):
  return nnx.avg_pool(x, (2, 2), strides=(2, 2))


def _max_pool(x, window=2, strides=2, padding="VALID"):
  return nnx.max_pool(x, (window, window), strides=(strides, strides), padding=padding)


class PlainCNN(nnx.Module):
  def __init__(self, c1, c2, *, rngs):
    self.conv1 = nnx.Conv(3, c1, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (3, 3), rngs=rngs)
    self.head = nnx.Linear(c2, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = _avg_pool(nnx.relu(self.conv1(x)))
    x = _avg_pool(nnx.relu(self.conv2(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


class VGG(nnx.Module):
  def __init__(self, c1, c2, c3, c4, hidden, *, rngs):
    widths = (3, c1, c2, c3, c4)
    for i in range(1, 5):
      setattr(self, f"conv{i}", nnx.Conv(widths[i - 1], widths[i], (3, 3), use_bias=False,
                                         rngs=rngs))
      setattr(self, f"bn{i}", _bn(widths[i], rngs))
    self.fc1 = nnx.Linear(16 * c4, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, CLASSES, rngs=rngs)

  def __call__(self, x):
    for i in range(1, 5):
      x = nnx.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
      if i % 2 == 0:
        x = _max_pool(x)
    x = x.reshape((x.shape[0], -1))
    return self.fc2(nnx.relu(self.fc1(x)))


class ResNetBlock(nnx.Module):
  def __init__(self, cin, filters, mid, strides=1, *, rngs):
    self.conv1 = nnx.Conv(cin, mid, (3, 3), strides, use_bias=False, rngs=rngs)
    self.bn1 = _bn(mid, rngs)
    self.conv2 = nnx.Conv(mid, filters, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(filters, momentum=0.9, epsilon=1e-5,
                             scale_init=nnx.initializers.zeros_init(), rngs=rngs)
    if strides != 1 or cin != filters:
      self.conv_proj = nnx.Conv(cin, filters, (1, 1), strides, use_bias=False, rngs=rngs)
      self.norm_proj = _bn(filters, rngs)
    else:
      self.conv_proj = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    residual = x if self.conv_proj is None else self.norm_proj(self.conv_proj(x))
    return nnx.relu(residual + y)


class BottleneckResNetBlock(nnx.Module):
  def __init__(self, cin, filters, a, b, strides=1, *, rngs):
    self.conv1 = nnx.Conv(cin, a, (1, 1), use_bias=False, rngs=rngs)
    self.bn1 = _bn(a, rngs)
    self.conv2 = nnx.Conv(a, b, (3, 3), strides, use_bias=False, rngs=rngs)
    self.bn2 = _bn(b, rngs)
    self.conv3 = nnx.Conv(b, filters, (1, 1), use_bias=False, rngs=rngs)
    self.bn3 = nnx.BatchNorm(filters, momentum=0.9, epsilon=1e-5,
                             scale_init=nnx.initializers.zeros_init(), rngs=rngs)
    if strides != 1 or cin != filters:
      self.conv_proj = nnx.Conv(cin, filters, (1, 1), strides, use_bias=False, rngs=rngs)
      self.norm_proj = _bn(filters, rngs)
    else:
      self.conv_proj = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    residual = x if self.conv_proj is None else self.norm_proj(self.conv_proj(x))
    return nnx.relu(residual + y)




def _make_stem(module, width, rngs):
  module.conv_init = nnx.Conv(3, width, (3, 3), use_bias=False, rngs=rngs)
  module.bn_init = _bn(width, rngs)


def _run_stem(module, x):
  x = nnx.relu(module.bn_init(module.conv_init(x)))
  return _max_pool(x, 3, 2, "SAME")


class ResNetBasic(nnx.Module):
  def __init__(self, stem, s1b0, s1b1, s2, s2b0, s2b1, *, rngs):
    _make_stem(self, stem, rngs)
    self.s1b0 = ResNetBlock(stem, stem, s1b0, rngs=rngs)
    self.s1b1 = ResNetBlock(stem, stem, s1b1, rngs=rngs)
    self.s2b0 = ResNetBlock(stem, s2, s2b0, 2, rngs=rngs)
    self.s2b1 = ResNetBlock(s2, s2, s2b1, rngs=rngs)
    self.head = nnx.Linear(s2, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = _run_stem(self, x)
    for b in (self.s1b0, self.s1b1, self.s2b0, self.s2b1):
      x = b(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


class ResNetBottleneck(nnx.Module):
  def __init__(self, stem, s1_out, s1b0_a, s1b0_b, s1b1_a, s1b1_b,
               s2_out, s2b0_a, s2b0_b, s2b1_a, s2b1_b, *, rngs):
    _make_stem(self, stem, rngs)
    self.s1b0 = BottleneckResNetBlock(stem, s1_out, s1b0_a, s1b0_b, rngs=rngs)
    self.s1b1 = BottleneckResNetBlock(s1_out, s1_out, s1b1_a, s1b1_b, rngs=rngs)
    self.s2b0 = BottleneckResNetBlock(s1_out, s2_out, s2b0_a, s2b0_b, 2, rngs=rngs)
    self.s2b1 = BottleneckResNetBlock(s2_out, s2_out, s2b1_a, s2b1_b, rngs=rngs)
    self.head = nnx.Linear(s2_out, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = _run_stem(self, x)
    for b in (self.s1b0, self.s1b1, self.s2b0, self.s2b1):
      x = b(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


class MobileNetV1(nnx.Module):
  def __init__(self, c0, c1, c2, *, rngs):
    self.conv_stem = nnx.Conv(3, c0, (3, 3), 2, use_bias=False, rngs=rngs)
    self.bn_stem = _bn(c0, rngs)
    self.dw1 = nnx.Conv(c0, c0, (3, 3), 1, feature_group_count=c0, use_bias=False, rngs=rngs)
    self.dw1_bn = _bn(c0, rngs)
    self.pw1 = nnx.Conv(c0, c1, (1, 1), use_bias=False, rngs=rngs)
    self.pw1_bn = _bn(c1, rngs)
    self.dw2 = nnx.Conv(c1, c1, (3, 3), 2, feature_group_count=c1, use_bias=False, rngs=rngs)
    self.dw2_bn = _bn(c1, rngs)
    self.pw2 = nnx.Conv(c1, c2, (1, 1), use_bias=False, rngs=rngs)
    self.pw2_bn = _bn(c2, rngs)
    self.head = nnx.Linear(c2, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn_stem(self.conv_stem(x)))
    x = nnx.relu(self.dw1_bn(self.dw1(x)))
    x = nnx.relu(self.pw1_bn(self.pw1(x)))
    x = nnx.relu(self.dw2_bn(self.dw2(x)))
    x = nnx.relu(self.pw2_bn(self.pw2(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


class InvertedResidual(nnx.Module):
  def __init__(self, cin, expand, out, stride, residual, *, rngs):
    self.expand = nnx.Conv(cin, expand, (1, 1), use_bias=False, rngs=rngs)
    self.expand_bn = _bn(expand, rngs)
    self.dw = nnx.Conv(expand, expand, (3, 3), stride, feature_group_count=expand,
                       use_bias=False, rngs=rngs)
    self.dw_bn = _bn(expand, rngs)
    self.project = nnx.Conv(expand, out, (1, 1), use_bias=False, rngs=rngs)
    self.project_bn = _bn(out, rngs)
    self.residual = residual

  def __call__(self, x):
    y = nnx.relu6(self.expand_bn(self.expand(x)))
    y = nnx.relu6(self.dw_bn(self.dw(y)))
    y = self.project_bn(self.project(y))
    return x + y if self.residual else y


class MobileNetV2(nnx.Module):
  def __init__(self, c0, e1, c2, e2, e3, ch, *, rngs):
    self.conv_stem = nnx.Conv(3, c0, (3, 3), 2, use_bias=False, rngs=rngs)
    self.bn_stem = _bn(c0, rngs)
    self.b1 = InvertedResidual(c0, e1, c0, 1, True, rngs=rngs)
    self.b2 = InvertedResidual(c0, e2, c2, 2, False, rngs=rngs)
    self.b3 = InvertedResidual(c2, e3, c2, 1, True, rngs=rngs)
    self.conv_head = nnx.Conv(c2, ch, (1, 1), use_bias=False, rngs=rngs)
    self.bn_head = _bn(ch, rngs)
    self.head = nnx.Linear(ch, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu6(self.bn_stem(self.conv_stem(x)))
    x = self.b3(self.b2(self.b1(x)))
    x = nnx.relu6(self.bn_head(self.conv_head(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


class DenseNet(nnx.Module):
  def __init__(self, c0, g1, g2, g3, t, *, rngs):
    self.conv_stem = nnx.Conv(3, c0, (3, 3), 2, use_bias=False, rngs=rngs)
    c = c0
    for i, g in enumerate((g1, g2, g3), 1):
      setattr(self, f"layer{i}_bn", _bn(c, rngs))
      setattr(self, f"layer{i}_conv", nnx.Conv(c, g, (3, 3), use_bias=False, rngs=rngs))
      c += g
    self.trans_bn = _bn(c, rngs)
    self.trans_conv = nnx.Conv(c, t, (1, 1), use_bias=False, rngs=rngs)
    self.final_bn = _bn(t, rngs)
    self.head = nnx.Linear(t, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = self.conv_stem(x)
    for i in (1, 2, 3):
      y = getattr(self, f"layer{i}_conv")(nnx.relu(getattr(self, f"layer{i}_bn")(x)))
      x = jnp.concatenate([x, y], axis=-1)
    x = self.trans_conv(nnx.relu(self.trans_bn(x)))
    x = nnx.relu(self.final_bn(_avg_pool(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


class SplitConcat(nnx.Module):
  def __init__(self, left, right, b, r2, c3, *, rngs):
    self.left = left
    self.conv_stem = nnx.Conv(3, left + right, (3, 3), 2, use_bias=False, rngs=rngs)
    self.bn_stem = _bn(left + right, rngs)
    self.pw1 = nnx.Conv(right, b, (1, 1), use_bias=False, rngs=rngs)
    self.pw1_bn = _bn(b, rngs)
    self.dw = nnx.Conv(b, b, (3, 3), feature_group_count=b, use_bias=False, rngs=rngs)
    self.dw_bn = _bn(b, rngs)
    self.pw2 = nnx.Conv(b, r2, (1, 1), use_bias=False, rngs=rngs)
    self.pw2_bn = _bn(r2, rngs)
    self.fuse = nnx.Conv(left + r2, c3, (1, 1), use_bias=False, rngs=rngs)
    self.fuse_bn = _bn(c3, rngs)
    self.head = nnx.Linear(c3, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn_stem(self.conv_stem(x)))
    x1, x2 = jnp.split(x, [self.left], axis=-1)
    y = nnx.relu(self.pw1_bn(self.pw1(x2)))
    y = self.dw_bn(self.dw(y))
    y = nnx.relu(self.pw2_bn(self.pw2(y)))
    x = jnp.concatenate([x1, y], axis=-1)
    x = nnx.relu(self.fuse_bn(self.fuse(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


class UNet(nnx.Module):
  def __init__(self, e1, e2, m, u2, d2, u1, d1, *, rngs):
    def cbr(name, cin, cout):
      setattr(self, name, nnx.Conv(cin, cout, (3, 3), use_bias=False, rngs=rngs))
      setattr(self, name + "_bn", _bn(cout, rngs))

    cbr("enc1", 3, e1)
    cbr("enc2", e1, e2)
    cbr("mid", e2, m)
    self.up2 = nnx.ConvTranspose(m, u2, (2, 2), strides=(2, 2), rngs=rngs)
    cbr("dec2", u2 + e2, d2)
    self.up1 = nnx.ConvTranspose(d2, u1, (2, 2), strides=(2, 2), rngs=rngs)
    cbr("dec1", u1 + e1, d1)
    self.out = nnx.Conv(d1, counts.UNET_OUT, (1, 1), rngs=rngs)

  def _cbr(self, name, x):
    return nnx.relu(getattr(self, name + "_bn")(getattr(self, name)(x)))

  def __call__(self, x):
    s1 = self._cbr("enc1", x)
    s2 = self._cbr("enc2", _max_pool(s1))
    x = self._cbr("mid", _max_pool(s2))
    x = self._cbr("dec2", jnp.concatenate([self.up2(x), s2], axis=-1))
    x = self._cbr("dec1", jnp.concatenate([self.up1(x), s1], axis=-1))
    return self.out(x)


class MLP(nnx.Module):
  def __init__(self, h1, h2, *, rngs):
    self.fc1 = nnx.Linear(768, h1, rngs=rngs)
    self.fc2 = nnx.Linear(h1, h2, rngs=rngs)
    self.fc3 = nnx.Linear(h2, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class ViT(nnx.Module):
  def __init__(self, embed, heads, qk_dim, v_dim, mlp, *, rngs):
    if qk_dim != v_dim:
      raise ValueError("nnx.MultiHeadAttention has one head_dim for q, k and v")
    p = counts.VIT_PATCH
    self.patch = nnx.Conv(3, embed, (p, p), p, padding="VALID", rngs=rngs)
    self.cls = nnx.Param(jnp.zeros((1, 1, embed)))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, counts.VIT_TOKENS, embed)))
    self.ln1 = nnx.LayerNorm(embed, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=embed,
                                       qkv_features=heads * qk_dim, out_features=embed,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(embed, rngs=rngs)
    self.mlp1 = nnx.Linear(embed, mlp, rngs=rngs)
    self.mlp2 = nnx.Linear(mlp, embed, rngs=rngs)
    self.ln_f = nnx.LayerNorm(embed, rngs=rngs)
    self.head = nnx.Linear(embed, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = self.patch(x)
    n, h, w, e = x.shape
    x = x.reshape((n, h * w, e))
    x = jnp.concatenate([jnp.tile(self.cls[...], (n, 1, 1)), x], axis=1)
    x = x + self.pos[...]
    x = x + self.attn(self.ln1(x))
    x = x + self.mlp2(nnx.gelu(self.mlp1(self.ln2(x))))
    return self.head(self.ln_f(x)[:, 0])


class RematBlock(nnx.Module):
  def __init__(self, width, mid, *, rngs):
    self.conv1 = nnx.Conv(width, mid, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = _bn(mid, rngs)
    self.conv2 = nnx.Conv(mid, width, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = _bn(width, rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    return nnx.relu(x + self.bn2(self.conv2(y)))


@nnx.remat
def _remat_call(block, x):
  return block(x)


class RematCNN(nnx.Module):
  def __init__(self, c0, m1, m2, *, rngs):
    self.conv_stem = nnx.Conv(3, c0, (3, 3), 2, use_bias=False, rngs=rngs)
    self.bn_stem = _bn(c0, rngs)
    self.block1 = RematBlock(c0, m1, rngs=rngs)
    self.block2 = RematBlock(c0, m2, rngs=rngs)
    self.head = nnx.Linear(c0, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn_stem(self.conv_stem(x)))
    x = _remat_call(self.block1, x)
    x = _remat_call(self.block2, x)
    return self.head(jnp.mean(x, axis=(1, 2)))


class JaxpruneConv(nnx.Module):
  """nnx.Conv through jaxprune's custom_vjp conv (the function layers.Conv plugs in)."""

  def __init__(self, c1, c2, *, rngs):
    conv = layers._conv_general_dilated  # pylint: disable=protected-access
    self.conv1 = nnx.Conv(3, c1, (3, 3), padding=1, use_bias=False,
                          conv_general_dilated=conv, rngs=rngs)
    self.bn1 = _bn(c1, rngs)
    self.conv2 = nnx.Conv(c1, c2, (3, 3), 2, padding=1, conv_general_dilated=conv, rngs=rngs)
    self.head = nnx.Linear(16 * c2, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = layers.max_pool(nnx.relu(self.conv2(x)), 2)
    return self.head(x.reshape((x.shape[0], -1)))
