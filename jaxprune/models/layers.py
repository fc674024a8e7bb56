"""Drop-in Linen ``Conv``, ``BatchNorm``, ``max_pool`` that train faster on XLA:CPU; same variables.

:func:`use` picks ``"jaxprune"``, ``"stock"`` or ``"auto"`` (by backend). Why and how:
docs/design/models.md.
"""
import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxprune.errors import UserError

_DN = ("NHWC", "HWIO", "NHWC")

CHOICES = ("auto", "jaxprune", "stock")
_choice = "auto"


def use(choice: str) -> str:
  """Sets the implementation of :class:`Conv` and :func:`max_pool` for every model
  traced from now on (``"auto"``, ``"jaxprune"`` or ``"stock"``; module docstring);
  returns the one in effect on this process's default backend."""
  global _choice  # pylint: disable=global-statement
  if choice not in CHOICES:
    raise UserError(f"layers {choice!r}: use one of {', '.join(CHOICES)}.")
  _choice = choice
  return active()


@contextlib.contextmanager
def chosen(choice_: str):
  """Within the block, :class:`Conv` and :func:`max_pool` run ``choice_`` without asking
  the backend (``"auto"`` would start it): for tracing a model before the backend
  starts (:func:`jaxprune.engine.runtime.config_profile`)."""
  global _choice  # pylint: disable=global-statement
  if choice_ not in CHOICES:
    raise UserError(f"layers {choice_!r}: use one of {', '.join(CHOICES)}.")
  before, _choice = _choice, choice_
  try:
    yield
  finally:
    _choice = before


def choice() -> str:
  """The setting of :func:`use` (``"auto"`` unless changed)."""
  return _choice


def active() -> str:
  """``"jaxprune"`` or ``"stock"``: what :class:`Conv` and :func:`max_pool` run now."""
  if _choice != "auto":
    return _choice
  return "jaxprune" if jax.default_backend() == "cpu" else "stock"


def _conv_lax(x, w, stride, pad):
  return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                  dimension_numbers=_DN)


def _runtime_one(w):
  """1.0 that XLA cannot constant-fold."""
  return lax.stop_gradient(w.reshape(-1)[0] * 0 + 1).astype(w.dtype)


def _dx_stride2_phases(dy, w, x_shape):
  """Input gradient of a 3x3, stride-2, pad-1 conv on even H, W, by phases.

  Input row 2a+p receives output rows only through kernel rows kh with
  2i + kh - 1 = 2a + p: phase 0 from kh=1 (i=a), phase 1 from kh=2 (i=a) and
  kh=0 (i=a+1); columns alike. Each of the 4 phases is a small stride-1 conv.
  """
  n, h, w_, cin = x_shape
  taps = {0: (1,), 1: (2, 0)}  # phase -> kernel taps, ordered by output offset 0, 1
  wt = w.swapaxes(2, 3)  # (3, 3, Cout, Cin)
  rows = []
  for p in (0, 1):
    cols = []
    for q in (0, 1):
      sub = jnp.stack([jnp.stack([wt[ki, kj] for kj in taps[q]]) for ki in taps[p]])
      cols.append(lax.conv_general_dilated(
          dy, sub, (1, 1), ((0, len(taps[p]) - 1), (0, len(taps[q]) - 1)),
          dimension_numbers=_DN))  # (N, H/2, W/2, Cin)
    rows.append(jnp.stack(cols, axis=3))
  return jnp.stack(rows, axis=2).reshape(n, h, w_, cin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, w, stride: int = 1, pad: int = 1):
  """NHWC x HWIO convolution with equal strides and symmetric padding.

  The forward is ``lax.conv_general_dilated``; the backward is the fast one
  described in the module docstring.
  """
  return _conv_lax(x, w, stride, pad)


def _conv2d_fwd(x, w, stride, pad):
  one = _runtime_one(w)
  x = x / one
  return _conv_lax(x, w, stride, pad), (x, w, one)


def _conv2d_bwd(stride, pad, res, dy):
  x, w, one = res
  dy = dy / one
  if (stride == 2 and w.shape[:2] == (3, 3) and pad == 1 and x.shape[1] % 2 == 0
      and x.shape[2] % 2 == 0):
    dx = _dx_stride2_phases(dy, w, x.shape)
  else:
    dx = jax.vjp(lambda x_: _conv_lax(x_, w, stride, pad), x)[1](dy)[0]
  dw = jax.vjp(lambda w_: _conv_lax(x, w_, stride, pad), w)[1](dy)[0]
  return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None,
                          feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated``'s signature over :func:`conv2d` where it applies
  (and with the ``"stock"`` layers, ``lax.conv_general_dilated`` itself)."""
  if active() == "stock":
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers or _DN,
                                    feature_group_count, precision=precision, **kwargs)
  strides = tuple(window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
  pads = [tuple(p) for p in padding]
  simple = (lhs.ndim == 4 and len(set(strides)) == 1 and len(set(pads)) == 1
            and pads[0][0] == pads[0][1] and feature_group_count == 1
            and all(d == 1 for d in (lhs_dilation or (1,)))
            and all(d == 1 for d in (rhs_dilation or (1,))))
  if not simple:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers or _DN,
                                    feature_group_count, precision=precision, **kwargs)
  return conv2d(lhs, rhs, strides[0], pads[0][0])


class Conv(nn.Conv):
  """``nn.Conv`` with the fast backward of :func:`conv2d` (2-D, NHWC).

  Dilated, grouped or asymmetric-padding convs fall back to ``lax``.
  """
  conv_general_dilated: Any = _conv_general_dilated


class BatchNorm(nn.BatchNorm):
  """``nn.BatchNorm`` (its fields and variables) with one-pass train statistics.

  Train mode computes mean and mean of squares in one pass over the batch and moves the
  running averages with ``momentum`` (Flax convention: 0.9 here is PyTorch's 0.1;
  biased variance, as Flax), the affine folded into one multiply-add; eval mode is
  ``nn.BatchNorm``'s expression. With the ``"stock"`` layers (:func:`use`), or any field
  this path does not cover (another axis, ``axis_name``, no scale or bias, a mask, a
  ``param_dtype`` other than float32), it is ``nn.BatchNorm`` itself.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, use_running_average=None, *, mask=None):
    covered = (self.axis in (-1, x.ndim - 1) and self.axis_name is None and self.use_bias
               and self.use_scale and mask is None and self.param_dtype == jnp.float32)
    if active() == "stock" or not covered:
      return super().__call__(x, use_running_average, mask=mask)
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", self.bias_init, (c,), jnp.float32)
    dtype = self.dtype or x.dtype
    xf = x.astype(jnp.float32)
    if use_ra:
      mul = scale * lax.rsqrt(ra_var.value + self.epsilon)
      return ((xf - ra_mean.value) * mul + bias).astype(dtype)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes)
    var = jnp.maximum(jnp.mean(lax.square(xf), axes) - lax.square(mean), 0.0)
    mul = scale * lax.rsqrt(var + self.epsilon)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var)
    return (xf * mul + (bias - mean * mul)).astype(dtype)


def max_pool(x: jax.Array, window: int) -> jax.Array:
  """Non-overlapping ``window x window`` max pooling of NHWC ``x`` (stride = window).

  When the spatial size divides by the window this is a reshape and a max: the
  same values as ``nn.max_pool``, but its gradient avoids XLA's select-and-scatter,
  which is about 5x slower on CPU (LeNet-5's training step: 106 -> 63 ms at batch
  128). Ties split the gradient evenly instead of giving it to the first maximum.
  With the ``"stock"`` layers (:func:`use`) it is ``nn.max_pool``.
  """
  n, h, w, c = x.shape
  if h % window or w % window or active() == "stock":
    return nn.max_pool(x, (window, window), strides=(window, window))
  return jnp.max(x.reshape(n, h // window, window, w // window, window, c), axis=(2, 4))
