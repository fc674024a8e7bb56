"""Analytic FLOPs and parameter counts of any Linen model.

One counter serves every model in jaxprune and any model a user brings: it
traces ``model.apply`` once under :func:`jax.eval_shape` (no arithmetic is run)
and records every ``nn.Conv`` and ``nn.Dense`` call (subclasses included) with
``nn.intercept_methods``. The convention is the official TAS counter's (tas.md
§5): FLOPs are multiply-accumulates of conv and dense layers plus one add per
output element for a layer with a bias; batch norm, activations and pooling are
not counted. Numbers are per example.

This module must not hold per-architecture tables: a pruned or searched network
is counted by building it and tracing it like any other.
"""

from collections.abc import Mapping, Sequence
import inspect
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UserError


def _accepts_train(model: nn.Module) -> bool:
  try:
    parameters = inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    return False
  return "train" in parameters or any(
      p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _example_batch(input_shape: Sequence[int], batched: bool | None):
  shape = tuple(int(d) for d in input_shape)
  if batched is None:
    # A leading 1 on a multi-axis shape is read as a batch of one example.
    batched = len(shape) >= 2 and shape[0] == 1
  if batched:
    if not shape or shape[0] != 1:
      raise UserError(f"input_shape {shape} must have a batch of 1 to be "
                      "counted per example; pass one example's shape, e.g. "
                      "(32, 32, 3).")
    return shape
  return (1,) + shape


def _layer_record(module, args, out):
  """MACs and bias adds of one conv/dense call, or None for other modules."""
  if isinstance(module, nn.Conv):
    kind = "conv"
    kernel_size = module.kernel_size
    if isinstance(kernel_size, int):
      kernel_size = (kernel_size,)
    in_features = args[0].shape[-1]
    groups = module.feature_group_count
    # Every output element is a dot product over k_h*k_w*(C_in/groups) inputs.
    kernel_shape = tuple(kernel_size) + (in_features // groups, module.features)
    macs_per_output = math.prod(kernel_size) * (in_features // groups)
  elif isinstance(module, nn.Dense):
    kind = "dense"
    in_features = args[0].shape[-1]
    kernel_shape = (in_features, module.features)
    macs_per_output = in_features
  else:
    return None
  outputs = math.prod(out.shape)
  macs = outputs * macs_per_output
  bias_adds = outputs if module.use_bias else 0
  return {
      "name": "/".join(str(p) for p in module.path),
      "kind": kind,
      "in_shape": tuple(args[0].shape),
      "out_shape": tuple(out.shape),
      "kernel_shape": kernel_shape,
      "macs": macs,
      "bias_adds": bias_adds,
      "flops": macs + bias_adds,
  }


def count_layers(model: nn.Module, variables: Mapping[str, Any],
                 input_shape: Sequence[int], *,
                 batched: bool | None = None,
                 dtype: Any = jnp.float32) -> list[dict[str, Any]]:
  """Per-layer FLOPs of every conv and dense call, in call order.

  Args:
    model: a Linen module, called as ``model.apply(variables, x)`` plus
      ``train=False`` when its ``__call__`` takes ``train``.
    variables: its variables (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
      ``jax.eval_shape(model.init, ...)``).
    input_shape: shape of one example without the batch axis, e.g. (32, 32, 3);
      a leading batch of 1 is accepted.
    batched: whether `input_shape` starts with the batch axis; None guesses
      (a leading 1 on a shape of two or more axes is a batch).
    dtype: dtype of the dummy input.

  Returns:
    One dict per call: ``name`` (module path), ``kind`` ("conv" or "dense"),
    ``in_shape``, ``out_shape`` (with the batch axis of 1), ``kernel_shape``,
    ``macs``, ``bias_adds`` and ``flops`` = macs + bias_adds.
  """
  x = jax.ShapeDtypeStruct(_example_batch(input_shape, batched), dtype)
  kwargs = {"train": False} if _accepts_train(model) else {}
  records = []
  active = set()

  def interceptor(next_fun, args, kw, context):
    module = context.module
    if context.method_name != "__call__" or id(module) in active:
      # A subclass calling super().__call__() is still one layer.
      return next_fun(*args, **kw)
    active.add(id(module))
    try:
      out = next_fun(*args, **kw)
    finally:
      active.discard(id(module))
    record = _layer_record(module, args, out)
    if record is not None:
      records.append(record)
    return out

  def apply(v, inputs):
    with nn.intercept_methods(interceptor):
      return model.apply(v, inputs, **kwargs)

  jax.eval_shape(apply, variables, x)
  return records


def count_params(variables: Mapping[str, Any]) -> int:
  """Number of entries in ``variables["params"]`` (BN statistics excluded)."""
  params = variables.get("params", {})
  return int(sum(math.prod(np.shape(leaf))
                 for leaf in jax.tree.leaves(params)))


def count(model: nn.Module, variables: Mapping[str, Any],
          input_shape: Sequence[int], *,
          batched: bool | None = None) -> dict[str, int]:
  """FLOPs (multiply-accumulates + bias adds) per example and parameters.

  Convention of the official TAS counter (tas.md §5): CIFAR-10 ResNet-20 gives
  40.81M FLOPs.

  Args:
    model: any Linen model made of ``nn.Conv``/``nn.Dense`` (grouped convs
      included) plus uncounted layers (norms, activations, pooling).
    variables: its variables, concrete or abstract.
    input_shape: shape of one example, e.g. (32, 32, 3); a leading batch of 1
      is accepted.
    batched: see :func:`count_layers`.

  Returns:
    ``{"flops": int, "params": int}``.

  Example:
    >>> model = models.cifar_resnet(20)
    >>> variables = jax.eval_shape(model.init, jax.random.key(0),
    ...                            jnp.zeros((1, 32, 32, 3)))
    >>> flops.count(model, variables, (32, 32, 3))["flops"]
    40813194
  """
  layers = count_layers(model, variables, input_shape, batched=batched)
  return {"flops": int(sum(layer["flops"] for layer in layers)),
          "params": count_params(variables)}


__all__ = ["count", "count_layers", "count_params"]
