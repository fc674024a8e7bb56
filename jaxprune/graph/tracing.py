"""One forward pass of any model (Linen, NNX, a pure function) as a jaxpr whose inputs
are named variable leaves. Does not interpret the jaxpr (``graph.propagate`` does)."""
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
from flax import nnx
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UserError
from jaxprune.optim import selection


# The one leaf-path convention (an NNX Variable's trailing ``value`` dropped).
leaf_name = selection.leaf_path


def accepts_train(module: nn.Module) -> bool:
  """Whether a Linen module's ``__call__`` takes ``train`` (or ``**kwargs``); an
  ``nn.Sequential`` passes its keywords to its first layer, so it takes ``train`` when
  that layer does, and surgery's wrappers (``Rebuilt``, ``SkipBlocks``) when the module
  they wrap does."""
  if isinstance(module, nn.Sequential):
    first = module.layers[0] if module.layers else None
    return isinstance(first, nn.Module) and accepts_train(first)
  for wrapped in ("jaxprune_base", "jaxprune_skip_inner"):  # surgery's pass-through wrappers
    inner = getattr(module, wrapped, None)
    if isinstance(inner, nn.Module):
      return accepts_train(inner)
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


def is_shape(s) -> bool:
  """Whether ``s`` is one input shape (a tuple or list of ints), not a pytree of them."""
  return isinstance(s, (tuple, list)) and all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in s)


def _is_struct(s) -> bool:
  return hasattr(s, "shape") and hasattr(s, "dtype") and not isinstance(s, (tuple, list))


def example_inputs(input_shape: Any, batched: bool | None = None, dtype=jnp.float32):
  """The abstract input(s) of a batch of one example.

  ``input_shape`` is one example's shape (``(32, 32, 3)``: a float32 input of batch
  one, see :func:`example_shape`), a ``jax.ShapeDtypeStruct`` or array (its shape read
  the same way, its dtype kept: integer token ids, masks), or a pytree of those (a
  dict, tuple or list of shapes / structs: several inputs, e.g. ``{"ids":
  jax.ShapeDtypeStruct((16,), jnp.int32), "mask": (16,)}``). A pytree reaches the
  model as one argument of that structure: pass ``call=`` to unpack it.
  """
  if is_shape(input_shape):
    return jax.ShapeDtypeStruct(example_shape(input_shape, batched), dtype)
  if _is_struct(input_shape):
    return jax.ShapeDtypeStruct(example_shape(np.shape(input_shape), batched),
                                jnp.dtype(input_shape.dtype))
  leaves, treedef = jax.tree_util.tree_flatten(
      input_shape, is_leaf=lambda s: is_shape(s) or _is_struct(s))
  bad = [l for l in leaves if not (is_shape(l) or _is_struct(l))]
  if not leaves or bad:
    raise UserError(f"input_shape must be one example's shape (e.g. (32, 32, 3)), a "
                    f"jax.ShapeDtypeStruct, or a pytree of those; got {input_shape!r}")
  return jax.tree_util.tree_unflatten(
      treedef, [example_inputs(l, batched, dtype) for l in leaves])


@dataclasses.dataclass
class Traced:
  """A model's forward pass as a jaxpr over named leaves.

  Attributes:
    kind: "linen", "nnx" or "function".
    jaxpr: the ``ClosedJaxpr``; its invars are the leaves (in ``paths`` order), then
      the input's leaves (one for a plain ``x``).
    paths: leaf path of each leaf (see :func:`leaf_name`).
    shapes: shape of each leaf.
    is_param: whether each leaf is a trainable parameter (Linen ``params``
      collection, ``nnx.Param``, every leaf of a pure function's params).
    input_shape: the traced batch shape, ``(1,) + one example`` (of the first
      input when there are several).
    output_shapes: shapes of the flattened outputs.
    input_shapes: the traced shape of every input leaf (``[input_shape]`` for one).
    input_dtypes: their dtypes.
    input_tree: the inputs' pytree structure.
  """
  kind: str
  jaxpr: Any
  paths: list[str]
  shapes: list[tuple]
  is_param: list[bool]
  input_shape: tuple
  output_shapes: list[tuple]
  input_shapes: list[tuple] = dataclasses.field(default_factory=list)
  input_dtypes: list[Any] = dataclasses.field(default_factory=list)
  input_tree: Any = None

  def __post_init__(self):
    if not self.input_shapes:
      self.input_shapes = [tuple(self.input_shape)]
      self.input_dtypes = [jnp.dtype(jnp.float32)]
      self.input_tree = jax.tree.structure(0)

  @property
  def num_inputs(self) -> int:
    return len(self.input_shapes)


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


def trace_jaxpr(model, variables, input_shape: Any, call: Callable | None = None,
                *, batched: bool | None = None, dtype=jnp.float32) -> Traced:
  """The forward pass of `model` on one example as a :class:`Traced` jaxpr.

  Args:
    model: a Linen module, an ``nnx.Module`` or a function ``f(params, x)``.
    variables: the Linen variables (arrays or ``jax.ShapeDtypeStruct``), None for
      NNX, the params of a function.
    input_shape: one example's shape, e.g. (32, 32, 3) (a leading batch of 1 is
      accepted, see :func:`example_shape`), a ``jax.ShapeDtypeStruct`` (integer
      token ids), or a pytree of those (several inputs; see :func:`example_inputs`).
    call: how to run a model whose forward needs more than x: NNX
      ``call(module, x)``, Linen ``call(variables, x)``.
    batched: whether `input_shape` starts with the batch axis (None guesses).
    dtype: the dummy input's dtype (of inputs given as plain shapes).
  """
  fn, tree, is_param = as_function(model, variables, call)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [leaf_name(p) for p, _ in flat]
  leaves = [_abstract(leaf) for _, leaf in flat]
  params_flat = jax.tree.leaves(is_param)
  x = example_inputs(input_shape, batched, dtype)
  x_leaves, x_tree = jax.tree.flatten(x)

  def flat_fn(leaves, x):
    return fn(jax.tree_util.tree_unflatten(treedef, leaves), x)
  try:
    closed, outs = jax.make_jaxpr(flat_fn, return_shape=True)(leaves, x)
  except UserError:
    raise
  except Exception as e:  # the user's forward failed on this input: say so in one line
    shown = _describe(x)
    raise UserError(f"running the {type(model).__name__} forward on an input of "
                    f"{shown} failed: {type(e).__name__}: "
                    f"{(str(e).splitlines() or [''])[0]}") from e
  closed = without_dead_code(closed)
  return Traced(kind=model_kind(model, variables), jaxpr=closed, paths=paths,
                shapes=[tuple(l.shape) for l in leaves], is_param=list(params_flat),
                input_shape=tuple(x_leaves[0].shape),
                output_shapes=[tuple(o.shape) for o in jax.tree.leaves(outs)],
                input_shapes=[tuple(l.shape) for l in x_leaves],
                input_dtypes=[jnp.dtype(l.dtype) for l in x_leaves], input_tree=x_tree)


def without_dead_code(closed):
  """``closed`` without the top-level eqns no output depends on (effectful eqns stay;
  nested jaxprs are left as they are), its invars unchanged: a value the model computes
  but does not return (e.g. a head applied to a tensor that is dropped) is neither
  counted nor part of the graph. A model's returned extras do count: select the result
  with ``call=`` (e.g. ``lambda v, x: model.apply(v, x)[0]``)."""
  jaxpr = closed.jaxpr
  live = {v for v in jaxpr.outvars if not isinstance(v, jex.core.Literal)}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      kept.append(eqn)
      live.update(v for v in eqn.invars if not isinstance(v, jex.core.Literal))
  if len(kept) == len(jaxpr.eqns):
    return closed
  return closed.replace(jaxpr=jaxpr.replace(eqns=kept[::-1]))


def _describe(x) -> str:
  if isinstance(x, jax.ShapeDtypeStruct):
    return f"shape {x.shape}" + ("" if x.dtype == jnp.float32 else f" {x.dtype}")
  return "shapes " + str(jax.tree.map(lambda l: f"{l.dtype}{list(l.shape)}", x))


def named_leaves(model, variables) -> dict[str, Any]:
  """``{leaf path: array}`` of the variables `trace_jaxpr` names (NNX: the module's state)."""
  if isinstance(model, nnx.Module):
    tree = nnx.state(model)
  else:
    tree = variables
  return {leaf_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
