"""One forward pass of any model as a jaxpr whose inputs are named variable leaves.

Three kinds of model are accepted, and all become ``fn(leaves, x)`` with the leaves
in a fixed order and named by the one leaf-path convention:

- a Linen module with its variables: ``model.apply(variables, x)`` (plus
  ``train=False`` when its ``__call__`` takes ``train``), or ``call(variables, x)``;
- an ``nnx.Module`` (variables None): a copy of it in eval mode, called as
  ``module(x)`` or ``call(module, x)``;
- a pure function ``f(params, x)`` with its params as ``variables``.

This module must not interpret the jaxpr: :mod:`jaxprune.graph.propagate` does.
"""
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UserError
from jaxprune.optim import selection


# The one leaf-path convention (an NNX Variable's trailing ``value`` dropped).
leaf_name = selection.leaf_path


def accepts_train(module: nn.Module) -> bool:
  """Whether a Linen module's ``__call__`` takes ``train`` (or ``**kwargs``)."""
  try:
    parameters = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return False
  return "train" in parameters or any(
      p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def example_shape(input_shape: Sequence[int], batched: bool | None = None) -> tuple:
  """The shape of a batch of one example: ``(1,) + input_shape``.

  A leading 1 on a shape of two or more axes is read as that batch already
  (``batched=None``); pass ``batched`` to say it.
  """
  shape = tuple(int(d) for d in input_shape)
  if batched is None:
    batched = len(shape) >= 2 and shape[0] == 1
  if batched:
    if not shape or shape[0] != 1:
      raise UserError(f"input_shape {shape} must have a batch of 1 to be "
                      "counted per example; pass one example's shape, e.g. "
                      "(32, 32, 3).")
    return shape
  return (1,) + shape


@dataclasses.dataclass
class Traced:
  """A model's forward pass as a jaxpr over named leaves.

  Attributes:
    kind: "linen", "nnx" or "function".
    jaxpr: the ``ClosedJaxpr``; its invars are the leaves (in ``paths`` order), then x.
    paths: leaf path of each leaf (see :func:`leaf_name`).
    shapes: shape of each leaf.
    is_param: whether each leaf is a trainable parameter (Linen ``params``
      collection, ``nnx.Param``, every leaf of a pure function's params).
    input_shape: the traced batch shape, ``(1,) + one example``.
    output_shapes: shapes of the flattened outputs.
  """
  kind: str
  jaxpr: Any
  paths: list[str]
  shapes: list[tuple]
  is_param: list[bool]
  input_shape: tuple
  output_shapes: list[tuple]


def model_kind(model, variables) -> str:
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise UserError("an nnx.Module carries its own variables: pass variables=None.")
    return "nnx"
  if isinstance(model, nn.Module):
    if variables is None:
      raise UserError(f"the Linen module {type(model).__name__} needs its variables "
                      "(e.g. jax.eval_shape(model.init, key, x)).")
    return "linen"
  if callable(model):
    if variables is None:
      raise UserError("a pure function f(params, x) needs its params as `variables`.")
    return "function"
  raise UserError(f"cannot trace a {type(model).__name__}: pass a Linen module with its "
                  "variables, an nnx.Module, or a function f(params, x).")


def eval_copy(module: nnx.Module) -> nnx.Module:
  """A copy of an NNX module in eval mode (the original's mode is left alone)."""
  copy = nnx.merge(*nnx.split(module))
  copy.eval()
  return copy


def _abstract(leaf):
  return jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf))


def as_function(model, variables, call: Callable | None = None):
  """``(fn(tree, x), tree, is_param_tree)`` for any accepted model.

  ``tree`` is the pytree of leaves that ``fn`` reads (Linen variables, the NNX
  module's state, a function's params).
  """
  kind = model_kind(model, variables)
  if kind == "linen":
    kwargs = {"train": False} if call is None and accepts_train(model) else {}
    fn = call if call is not None else (lambda v, x: model.apply(v, x, **kwargs))
    is_param = {k: jax.tree.map(lambda _, k=k: k == "params", v)
                for k, v in variables.items()}
    return fn, variables, is_param
  if kind == "nnx":
    graphdef, state = nnx.split(eval_copy(model))
    _, param_state = nnx.split(eval_copy(model), nnx.Param, ...)[:2]
    param_paths = {leaf_name(p) for p, _ in
                   jax.tree_util.tree_flatten_with_path(param_state)[0]}

    def fn(st, x):
      module = nnx.merge(graphdef, st)
      return call(module, x) if call is not None else module(x)
    is_param = jax.tree_util.tree_map_with_path(
        lambda p, _: leaf_name(p) in param_paths, state)
    return fn, state, is_param
  fn = model if call is None else (lambda p, x: call(model, p, x))
  return fn, variables, jax.tree.map(lambda _: True, variables)


def trace_jaxpr(model, variables, input_shape: Sequence[int], call: Callable | None = None,
                *, batched: bool | None = None, dtype=jnp.float32) -> Traced:
  """The forward pass of `model` on one example as a :class:`Traced` jaxpr.

  Args:
    model: a Linen module, an ``nnx.Module`` or a function ``f(params, x)``.
    variables: the Linen variables (arrays or ``jax.ShapeDtypeStruct``), None for
      NNX, the params of a function.
    input_shape: one example's shape, e.g. (32, 32, 3) (a leading batch of 1 is
      accepted, see :func:`example_shape`).
    call: how to run a model whose forward needs more than x: NNX
      ``call(module, x)``, Linen ``call(variables, x)``.
    batched: whether `input_shape` starts with the batch axis (None guesses).
    dtype: the dummy input's dtype.
  """
  fn, tree, is_param = as_function(model, variables, call)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [leaf_name(p) for p, _ in flat]
  leaves = [_abstract(leaf) for _, leaf in flat]
  params_flat = jax.tree.leaves(is_param)
  x = jax.ShapeDtypeStruct(example_shape(input_shape, batched), dtype)

  def flat_fn(leaves, x):
    return fn(jax.tree_util.tree_unflatten(treedef, leaves), x)
  try:
    closed, outs = jax.make_jaxpr(flat_fn, return_shape=True)(leaves, x)
  except UserError:
    raise
  except Exception as e:  # the user's forward failed on this input: say so in one line
    raise UserError(f"running the {type(model).__name__} forward on an input of shape "
                    f"{x.shape} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
  return Traced(kind=model_kind(model, variables), jaxpr=closed, paths=paths,
                shapes=[tuple(l.shape) for l in leaves], is_param=list(params_flat),
                input_shape=x.shape,
                output_shapes=[tuple(o.shape) for o in jax.tree.leaves(outs)])


def named_leaves(model, variables) -> dict[str, Any]:
  """``{leaf path: array}`` of the variables `trace_jaxpr` names (NNX: the module's state)."""
  if isinstance(model, nnx.Module):
    tree = nnx.state(model)
  else:
    tree = variables
  return {leaf_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
