"""Evaluates a traced jaxpr with concrete values, reporting (or replacing) each layer's input.

Surgery uses it to measure folded constants and affine followers (docs/design/graph.md).
"""
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UserError
from jaxprune.graph import interpret
from jaxprune.graph.tracing import Traced

@dataclasses.dataclass
class Layer:
  """One conv or matmul with a parameter kernel, as :func:`run` saw it.

  Attributes:
    kernel: the kernel's leaf path.
    primitive: ``conv_general_dilated`` or ``dot_general``.
    params: the equation's params (padding, strides, dimension numbers...).
    kernel_operand: 0 or 1, which operand is the kernel.
    x: the other operand's value (the layer's input), as the network computed it;
      from :func:`run` with a leading example axis (``x[i]`` is example i's).
    out_shape: the layer output's shape.
    kernel_shape: the kernel's shape.
    x_shape: one example's input shape (with its batch of one).
    out: the layer's output value (before any bias add), with the example axis.
  """
  kernel: str
  primitive: str
  params: dict
  kernel_operand: int
  x: Any
  out_shape: tuple
  kernel_shape: tuple
  x_shape: tuple = ()
  out: Any = None

  def input_axis(self, kernel_axis: int) -> int | None:
    """The axis of ``x`` that pairs with the kernel's `kernel_axis` (its input
    channels for a conv, a contracting axis for a matmul); None if none does."""
    if self.primitive == "conv_general_dilated":
      dn = self.params["dimension_numbers"]
      return dn.lhs_spec[1] if kernel_axis == dn.rhs_spec[1] else None
    (lc, rc), _ = self.params["dimension_numbers"]
    k_contract, x_contract = (rc, lc) if self.kernel_operand == 1 else (lc, rc)
    for k, xa in zip(k_contract, x_contract):
      if k == kernel_axis:
        return xa
    return None

  def output_axis(self, kernel_axis: int) -> int | None:
    """The axis of the output that the kernel's output-feature `kernel_axis` becomes."""
    if self.primitive == "conv_general_dilated":
      dn = self.params["dimension_numbers"]
      return dn.out_spec[1] if kernel_axis == dn.rhs_spec[0] else None
    (lc, rc), (lb, rb) = self.params["dimension_numbers"]
    x_ndim = len(self.x_shape)
    k_ndim = len(self.kernel_shape)
    if self.kernel_operand == 1:
      lhs_free = [a for a in range(x_ndim) if a not in lc and a not in lb]
      rhs_free = [a for a in range(k_ndim) if a not in rc and a not in rb]
      if kernel_axis in rhs_free:
        return len(lb) + len(lhs_free) + rhs_free.index(kernel_axis)
    else:
      lhs_free = [a for a in range(k_ndim) if a not in lc and a not in lb]
      if kernel_axis in lhs_free:
        return len(lb) + lhs_free.index(kernel_axis)
    return None


@dataclasses.dataclass
class Result:
  """What :func:`run` returns: the outputs, every layer in order, the followers."""
  outputs: list
  layers: list[Layer]
  followers: dict[str, dict[str, str]]  # kernel path -> {"bias"|"mean": leaf path}


def run(traced: Traced, values: dict[str, Any], xs, *,
        replace: Sequence[Any] | None = None) -> Result:
  """Evaluates `traced` on ``(values, x)`` for every example ``x`` of `xs`.

  The interpreter below is traced once under ``jax.jit(jax.vmap(...))`` (the jaxpr
  has the fixed batch of one it was traced with; examples are mapped), so a probe
  costs one compile, not one eager dispatch per primitive.

  Args:
    traced: :func:`jaxprune.graph.tracing.trace_jaxpr` of the model.
    values: ``{leaf path: array}`` for every path of ``traced.paths``.
    xs: a probe ``(N, *example_shape)``; each example runs with a batch of one. A
      model with several inputs takes their pytree (``traced.input_tree``), each leaf
      ``(N, *its example shape)``.
    replace: per :class:`Layer`, in the order :func:`layers_of` lists them,
      ``(N, *layer input shape)`` arrays that replace that layer's input (how a
      smaller network is fed the original's activations), or None.

  Returns:
    A :class:`Result`; each layer's ``x`` and ``out`` carry a leading example axis.
  """
  leaves = [values[p] for p in traced.paths]
  xs = _input_leaves(traced, xs)
  meta: list[Layer] = []
  followers: dict[str, dict[str, str]] = {}

  def one(leaves, x, reps):
    meta.clear()
    followers.clear()
    outputs = _interpret(traced, leaves, x, reps, meta, followers)
    return outputs, [l.x for l in meta], [l.out for l in meta]
  fn = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
  outputs, ins, outs = fn(leaves, xs, list(replace) if replace is not None else None)
  layers = [dataclasses.replace(l, x=np.asarray(i), out=np.asarray(o))
            for l, i, o in zip(meta, ins, outs)]
  return Result(outputs=[np.asarray(o) for o in outputs], layers=layers,
                followers=dict(followers))


def layers_of(traced: Traced, values: dict[str, Any]) -> list[Layer]:
  """The layers :func:`run` sees, in order, with abstract ``x`` / ``out`` (no compute)."""
  meta: list[Layer] = []

  def one(leaves, x):
    _interpret(traced, leaves, x, None, meta, {})
    return 0
  leaves = [jax.ShapeDtypeStruct(np.shape(values[p]), jnp.result_type(values[p]))
            for p in traced.paths]
  jax.eval_shape(one, leaves, [jax.ShapeDtypeStruct(s, d) for s, d in
                               zip(traced.input_shapes, traced.input_dtypes)])
  return [dataclasses.replace(l, x=jax.ShapeDtypeStruct(np.shape(l.x), l.x.dtype),
                              out=None) for l in meta]


def _input_leaves(traced, xs) -> list:
  """The probe's leaves, each ``(N, *that input's traced shape)``."""
  flat = jax.tree.leaves(xs)
  if len(flat) != traced.num_inputs:
    raise UserError(f"the probe has {len(flat)} input(s); the model was traced with "
                    f"{traced.num_inputs} (its input_shape pytree)")
  out = []
  for x, shape in zip(flat, traced.input_shapes):
    x = np.asarray(x)
    out.append(x.reshape((x.shape[0],) + tuple(shape)))
  return out


class _Probe(interpret.Interpreter):
  """Evaluates with tags (("leaf", path) or ("out", kernel)) and reports the layers."""

  def __init__(self, is_param, replace, layers, followers):
    self.is_param = is_param
    self.replace = replace
    self.layers = layers
    self.followers = followers

  def layer_of(self, eqn, vals, tags):
    name = eqn.primitive.name
    if name not in interpret.LAYERS:
      return None
    sides = (1, 0) if name == "dot_general" else (1,)
    for side in sides:
      tag = tags[side]
      if tag and tag[0] == "leaf" and self.is_param.get(tag[1]):
        other = tags[1 - side]
        if other and other[0] == "leaf" and self.is_param.get(other[1]):
          return None  # a product of two parameters is not a layer
        return Layer(kernel=tag[1], primitive=name, params=dict(eqn.params),
                     kernel_operand=side, x=vals[1 - side],
                     out_shape=tuple(eqn.outvars[0].aval.shape),
                     kernel_shape=tuple(np.shape(vals[side])),
                     x_shape=tuple(np.shape(vals[1 - side])))
    return None

  def equation(self, frame, i, eqn, vals, tags):
    if interpret.call_body(eqn) is not None:
      return super().equation(frame, i, eqn, vals, tags)  # entered, tags carried in
    name = eqn.primitive.name
    out_tags = [None] * len(eqn.outvars)
    layer = self.layer_of(eqn, vals, tags)
    if layer is not None:
      if self.replace is not None:
        vals = list(vals)
        vals[1 - layer.kernel_operand] = self.replace[len(self.layers)]
      self.layers.append(layer)
      out_tags = [("out", layer.kernel)]
    elif name in interpret.SHAPE_ONLY and tags and tags[0] is not None:
      out_tags = [tags[0]]
    elif name in ("add", "sub") and len(tags) == 2:
      for a, b in ((0, 1), (1, 0)):
        ta, tb = tags[a], tags[b]
        if ta and tb and ta[0] == "out" and tb[0] == "leaf":
          kind = "bias" if name == "add" else "mean"
          if tb[1].endswith("/" + kind) and not (name == "sub" and a == 1):
            self.followers.setdefault(ta[1], {}).setdefault(kind, tb[1])
          if name == "add" and tb[1].endswith("/bias"):
            out_tags = [ta]  # conv + bias is still the layer's output
    outs = interpret.bind(eqn, vals)
    if layer is not None:
      layer.out = outs[0]
    return outs, out_tags


def _interpret(traced, leaves, x, replace, layers, followers):
  probe = _Probe(dict(zip(traced.paths, traced.is_param)), replace, layers, followers)
  tags = [("leaf", p) for p in traced.paths] + [None] * len(x)
  return probe.interpret(traced.jaxpr, list(leaves) + list(x), tags)


def kernel_output_axes(layer: Layer, kernel_ndim: int) -> list[int]:
  """The kernel axes that are output features (neither input channels nor
  spatial taps / contracted): the last axis of a conv's HWIO kernel, the free
  axes of a matmul kernel."""
  if layer.primitive == "conv_general_dilated":
    return [layer.params["dimension_numbers"].rhs_spec[0]]
  (lc, rc), (lb, rb) = layer.params["dimension_numbers"]
  contract, batch = (rc, rb) if layer.kernel_operand == 1 else (lc, lb)
  return [a for a in range(kernel_ndim) if a not in contract and a not in batch]


def conv_interior(layer: Layer) -> np.ndarray | None:
  """Boolean mask over a conv's output spatial positions whose window avoids the
  zero padding (where a folded constant is exact); None for a matmul."""
  if layer.primitive != "conv_general_dilated":
    return None
  dn = layer.params["dimension_numbers"]
  x_shape = layer.x_shape
  spatial_in = [x_shape[a] for a in dn.lhs_spec[2:]]
  spatial_out = [layer.out_shape[a] for a in dn.out_spec[2:]]
  masks = []
  for i, (size_in, size_out) in enumerate(zip(spatial_in, spatial_out)):
    if layer.params["lhs_dilation"][i] != 1:  # a transposed conv: no exact interior
      masks.append(np.zeros(size_out, bool))
      continue
    k = layer.kernel_shape[dn.rhs_spec[2 + i]]
    stride = layer.params["window_strides"][i]
    dil = layer.params["rhs_dilation"][i]
    lo = layer.params["padding"][i][0]
    start = np.arange(size_out) * stride - lo
    masks.append((start >= 0) & (start + (k - 1) * dil <= size_in - 1))
  out = masks[0]
  for m in masks[1:]:
    out = out[..., None] & m
  return out


__all__ = ["Layer", "Result", "run", "layers_of", "kernel_output_axes", "conv_interior"]
