"""Per-layer rebuild rules: a layer's size attributes from its pruned variables' shapes.

One small function per layer type, in a registry a user extends with :func:`register_rule`.
"""
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import nnx

from jaxprune.errors import UserError

Rule = Callable[..., dict[str, Any]]

# {layer class: rule}; a layer takes the rule of the first class of its MRO found here.
RULES: dict[type, Rule] = {}


def register_rule(layer_type: type, rule: Rule | None = None):
  """Registers ``rule(layer, shape, inputs) -> {attribute: value}`` for ``layer_type``.

  The rebuild calls the rule of every layer of that type (or a subclass) in the pruned
  network and sets the attributes it returns before the layer runs. ``shape(name)`` is
  the pruned shape of the layer's own variable ``name`` (``"kernel"``; a submodule's:
  ``"query/kernel"``), ``shape(name, old=True)`` the original's; None when it has no
  such variable. ``inputs`` are the layer's positional call arguments (Linen; as
  ``jax.ShapeDtypeStruct`` s during the check) or ``()`` (NNX). Works for Linen and NNX
  classes; a later registration replaces an earlier one. Also a decorator.

  Example:
    >>> @surgery.register_rule(MyBlock)            # MyBlock(cfg={"width": 16, ...})
    ... def _(layer, shape, inputs):
    ...   return {"cfg": {**layer.cfg, "width": shape("w")[-1]}}
  """
  if not isinstance(layer_type, type):
    raise UserError(f"register_rule: layer_type must be a class, got "
                    f"{type(layer_type).__name__}")
  if rule is None:
    return lambda fn: register_rule(layer_type, fn)
  if not callable(rule):
    raise UserError(f"register_rule: the rule for {layer_type.__name__} must be a "
                    f"function (layer, shape, inputs) -> dict, got {type(rule).__name__}")
  RULES[layer_type] = rule
  return rule


def rule_for(layer: Any) -> Rule | None:
  """The registered rule of ``layer``'s type (its nearest registered base), or None."""
  for cls in type(layer).__mro__:
    if cls in RULES:
      return RULES[cls]
  return None


def _ints(values) -> tuple[int, ...]:
  return tuple(int(v) for v in values)


# ---------------------------------------------------------------------------------
# Linen.


@register_rule(nn.MultiHeadDotProductAttention)
def _linen_attention(layer, shape, inputs):
  del layer, inputs
  q, o = shape("query/kernel"), shape("out/kernel")
  out = {}
  if q is not None:
    out.update(num_heads=int(q[-2]), qkv_features=int(q[-2] * q[-1]))
  if o is not None:
    out["out_features"] = int(o[-1])
  return out


@register_rule(nn.Embed)
def _linen_embed(layer, shape, inputs):
  del layer, inputs
  e = shape("embedding")
  return {} if e is None else {"num_embeddings": int(e[0]), "features": int(e[1])}


@register_rule(nn.GroupNorm)
def _linen_group_norm(layer, shape, inputs):
  s = shape("scale") or shape("bias")
  old = shape("scale", old=True) or shape("bias", old=True)
  if s is None or layer.num_groups is None:
    return {}
  size = old[-1] // layer.num_groups
  if s[-1] % size:
    raise UserError(f"rebuild: GroupNorm {'/'.join(layer.path)} keeps {s[-1]} "
                    f"channels, not whole groups of {size}.")
  # From the input where it holds whole groups: before a user layer upstream has its
  # width inferred, the input has the old width -- a shape mismatch, not a crash.
  n = inputs[0].shape[-1] if inputs and hasattr(inputs[0], "shape") else s[-1]
  return {"num_groups": int((n if n % size == 0 else s[-1]) // size)}


@register_rule(nn.Einsum)
def _linen_einsum(layer, shape, inputs):
  del layer, inputs
  k = shape("kernel")
  return {} if k is None else {"shape": _ints(k)}


@register_rule(nn.DenseGeneral)
def _linen_dense_general(layer, shape, inputs):
  del inputs
  k, f = shape("kernel"), layer.features
  if k is None:
    return {}
  n = 1 if isinstance(f, int) else len(f)
  return {"features": int(k[-1]) if isinstance(f, int) else _ints(k[-n:])}


@register_rule(nn.Dense)
def _linen_dense(layer, shape, inputs):
  del layer, inputs
  k = shape("kernel")
  return {} if k is None else {"features": int(k[-1])}


@register_rule(nn.ConvTranspose)
def _linen_conv_transpose(layer, shape, inputs):
  del inputs
  k = shape("kernel")
  return {} if k is None else {"features": int(k[-2] if layer.transpose_kernel else k[-1])}


def _linen_conv(layer, shape, inputs):
  k = shape("kernel")
  if k is None:
    return {}
  out = {"features": int(k[-1])}
  if getattr(layer, "feature_group_count", 1) != 1 and inputs and hasattr(inputs[0], "shape"):
    out["feature_group_count"] = int(inputs[0].shape[-1] // k[-2])
  return out


register_rule(nn.Conv, _linen_conv)
register_rule(nn.ConvLocal, _linen_conv)


# ---------------------------------------------------------------------------------
# NNX.


@register_rule(nnx.MultiHeadAttention)
def _nnx_attention(layer, shape, inputs):
  del layer, inputs
  q, k, o = shape("query/kernel"), shape("key/kernel"), shape("out/kernel")
  return dict(in_features=q[0], num_heads=q[-2], head_dim=q[-1],
              qkv_features=q[-2] * q[-1], in_kv_features=k[0], num_kv_heads=k[-2],
              out_features=o[-1])


@register_rule(nnx.Embed)
def _nnx_embed(layer, shape, inputs):
  del layer, inputs
  e = shape("embedding")
  return {"num_embeddings": e[0], "features": e[1]}


def _norm_width(shape):
  return shape("scale") or shape("bias") or shape("mean") or shape("var")


def _nnx_norm(layer, shape, inputs):
  del inputs
  s = _norm_width(shape)
  if s is None or len(s) != 1 or not isinstance(getattr(layer, "num_features", None), int):
    return {}
  return {"num_features": s[0]}


for _norm in (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.InstanceNorm):
  register_rule(_norm, _nnx_norm)


@register_rule(nnx.GroupNorm)
def _nnx_group_norm(layer, shape, inputs):
  s = _norm_width(shape)
  if s is None or len(s) != 1:
    return _nnx_norm(layer, shape, inputs)
  if s[0] % layer.group_size:  # (it keeps no num_features)
    raise UserError(f"rebuild: a GroupNorm keeps {s[0]} channels, not whole groups "
                    f"of {layer.group_size}.")
  return {"num_groups": s[0] // layer.group_size}


@register_rule(nnx.Einsum)
def _nnx_einsum(layer, shape, inputs):
  del layer, inputs
  k, b = shape("kernel"), shape("bias")
  if k is None:
    return {}
  return {"kernel_shape": k, **({"bias_shape": b} if b is not None else {})}


@register_rule(nnx.LinearGeneral)
def _nnx_linear_general(layer, shape, inputs):
  del inputs
  k = shape("kernel")
  if k is None:
    return {}
  n_in, n_out = len(layer.in_features), len(layer.out_features)
  return {"in_features": k[len(k) - n_in - n_out:len(k) - n_out],
          "out_features": k[len(k) - n_out:]}


@register_rule(nnx.Linear)
def _nnx_linear(layer, shape, inputs):
  del layer, inputs
  k = shape("kernel")
  return {} if k is None else {"in_features": k[-2], "out_features": k[-1]}


@register_rule(nnx.ConvTranspose)
def _nnx_conv_transpose(layer, shape, inputs):
  del inputs
  k = shape("kernel")
  if k is None:
    return {}
  i, o = (k[-1], k[-2]) if layer.transpose_kernel else (k[-2], k[-1])
  return {"in_features": i, "out_features": o, "kernel_shape": k}


@register_rule(nnx.Conv)
def _nnx_conv(layer, shape, inputs):
  del inputs
  k = shape("kernel")
  if k is None:
    return {}
  groups = layer.feature_group_count
  if groups != 1:
    # Whole groups go: the per-group output width stays (depthwise: the multiplier).
    per_group = layer.out_features // groups
    groups = k[-1] // per_group
  return {"in_features": k[-2] * groups, "out_features": k[-1],
          "feature_group_count": groups, "kernel_shape": k}
