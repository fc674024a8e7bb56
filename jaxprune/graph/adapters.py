"""Any Flax model called as a Linen ``apply(variables, x, train=...)``: NNX, ``call=``, pmap axes.

:class:`WithTrain`, :class:`WithCall`, :class:`BindAxis`, :class:`FromNNX` (docs/design/graph.md).
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UserError

# Linen collection of each NNX variable type (RngState is not a variable: see FromNNX).
_COLLECTIONS = (("params", nnx.Param), ("batch_stats", nnx.BatchStat))
OTHER_COLLECTION = "nnx_state"


def mode_flag(module: nn.Module) -> str:
  """How a Linen module's ``__call__`` takes train/eval: the argument name, or ''."""
  try:
    parameters = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return ""
  for name in ("train", "training", "deterministic"):
    if name in parameters:
      return name
  return ""


class WithTrain(nn.Module):
  """A user's Linen module given the recipes' ``train`` argument (same variables).

  Attributes:
    jaxprune_inner: the user's module.
    flag: its own mode argument: "training", "deterministic" (passed ``not train``)
      or "" (it has none; ``train`` is ignored).
  """
  jaxprune_inner: nn.Module  # named so as not to clash with the user's submodules
  flag: str = ""

  def setup(self):
    nn.share_scope(self, self.jaxprune_inner)

  def __call__(self, x, train: bool = False):
    if self.flag == "deterministic":
      return self.jaxprune_inner(x, deterministic=not train)
    if self.flag:
      return self.jaxprune_inner(x, **{self.flag: train})
    return self.jaxprune_inner(x)


def _takes_train(call) -> bool:
  try:
    return "train" in inspect.signature(call).parameters
  except (TypeError, ValueError):
    return False


class WithCall(nn.Module):
  """A user's Linen module run through the user's ``call(variables, x)`` (token ids,
  masks, positions unpacked from ``x``), as a Linen module ``apply(variables, x,
  train)`` with the user's own variable tree.

  ``call`` runs ``model.apply(variables, ...)`` of the original module; the arguments
  that apply hands to the module's ``__call__`` are passed to this module's copy of it,
  which reads this module's variables (so the smaller network of a rebuild, its
  batch statistics and rngs are the ones used). ``call`` gets ``train=`` when it takes
  it; otherwise it runs as written in both modes.

  Attributes:
    jaxprune_call_inner: the user's module.
    call: ``call(variables, x)`` (or ``call(variables, x, train=...)``).
  """
  jaxprune_call_inner: nn.Module  # named so as not to clash with the user's submodules
  call: Callable = None

  def setup(self):
    nn.share_scope(self, self.jaxprune_call_inner)

  def __call__(self, x, train: bool = False):
    target, own, seen = self.jaxprune_call_inner, self.scope, []

    def redirect(next_fun, args, kwargs, context):
      module = context.module
      if (not seen and not module.path and context.method_name == "__call__"
          and module.scope is not own):
        seen.append(True)
        return target(*args, **kwargs)
      return next_fun(*args, **kwargs)
    kwargs = {"train": train} if _takes_train(self.call) else {}
    with nn.intercept_methods(redirect):
      out = self.call({"params": {}}, x, **kwargs)
    if not seen:
      raise UserError(f"call(variables, x) never calls {type(target).__name__}'s __call__ "
                      "through model.apply(variables, ...): pass a call that does.")
    return out


class BindAxis(nn.Module):
  """A Linen model written for ``pmap`` (collectives over a named axis, e.g. Flax's
  ImageNet ResNet's ``BatchNorm(axis_name='batch')``) run on the global batch.

  In train mode the model runs once per example under a Linen ``vmap`` whose axis is
  named ``axis_name``: a ``pmean`` over it is a mean over the global batch the jitted
  step sees (batch statistics of the global batch, as the engine's own models), the
  parameters and statistics are shared. In eval mode (running averages, no
  collective) the model runs as it is. The variable tree is the user's own.

  Attributes:
    jaxprune_axis_inner: the user's module (taking ``train``).
    axis_name: the axis name its collectives use.
  """
  jaxprune_axis_inner: nn.Module  # named so as not to clash with the user's submodules
  axis_name: str = "batch"

  def setup(self):
    nn.share_scope(self, self.jaxprune_axis_inner)

  def __call__(self, x, train: bool = False):
    if not train:
      return self.jaxprune_axis_inner(x, train=False)

    def one(module, x):
      return module.jaxprune_axis_inner(x[None], train=True)[0]
    return nn.vmap(one, in_axes=0, out_axes=0, variable_axes={True: None},
                   split_rngs={"params": False, "dropout": True},
                   axis_name=self.axis_name)(self, x)


_UNBOUND = re.compile(r"unbound axis name: ([A-Za-z_]\w*)")


def axis_names(model: nn.Module, input_shape) -> tuple[str, ...]:
  """The axis names the model's train-mode forward uses but does not bind."""
  x = jnp.zeros((2, *input_shape), jnp.float32)
  try:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=True,
                                         rngs={"dropout": jax.random.key(0)}), variables)
  except NameError as e:
    found = _UNBOUND.search(str(e))
    if found:
      return (found.group(1),)
  except Exception:  # pylint: disable=broad-except
    pass  # _check_fits says what else is wrong
  return ()


def _str_keys(tree):
  if isinstance(tree, Mapping):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _states(module: nnx.Module):
  """``(graphdef, {collection: State}, rng State)`` of an NNX module."""
  graphdef, *states = nnx.split(module, *[f for _, f in _COLLECTIONS], nnx.RngState, ...)
  names = [c for c, _ in _COLLECTIONS] + ["rng", OTHER_COLLECTION]
  by_name = dict(zip(names, states))
  return graphdef, by_name, by_name.pop("rng")


def _pure(templates) -> dict[str, dict]:
  """Plain nested dicts with string keys, one per non-empty collection."""
  return {c: _str_keys(nnx.to_pure_dict(s)) for c, s in templates.items()
          if jax.tree.leaves(s)}


class _Split:
  """An NNX module split into its graph and per-collection leaves (hashed by identity,
  so that the Linen module holding it stays hashable)."""

  def __init__(self, module: nnx.Module, draw: Callable | None = None):
    self.graphdef, self.templates, self.rng_state = _states(module)
    # key -> fresh pure leaves of this graph (a new draw of the factory), or None.
    self.draw = draw
    self.pure = _pure(self.templates)

  def fresh(self, key) -> dict[str, dict]:
    """Pure leaves per collection: a fresh draw from ``key``, or the module's own."""
    if key is None or self.draw is None:
      return self.pure
    return self.draw(key)

  def merge(self, pure: Mapping[str, Any]) -> nnx.Module:
    states = []
    for collection, template in self.templates.items():
      flat, treedef = jax.tree_util.tree_flatten_with_path(template)
      leaves = []
      for path, _ in flat:
        node = pure.get(collection, {})
        for k in path[:-1] if _ends_in_value(path) else path:
          node = node[str(_key(k))]
        leaves.append(node)
      states.append(jax.tree_util.tree_unflatten(treedef, leaves))
    # Fresh Variable objects of the RNG streams, owned by the current trace (dropout
    # advances their counts).
    leaves, treedef = jax.tree_util.tree_flatten(self.rng_state)
    return nnx.merge(self.graphdef, *states, jax.tree_util.tree_unflatten(treedef, leaves))


def _key(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def _ends_in_value(path) -> bool:
  return bool(path) and str(_key(path[-1])) == "value"


class FromNNX(nn.Module):
  """An ``nnx.Module`` run as a Linen module with the recipes' ``train`` argument.

  ``init`` gives the module's own weights, or a fresh draw from ``init``'s key when
  the factory takes ``rngs`` (see :func:`build`). Use :meth:`module` to get the NNX
  module back from Linen variables, :func:`from_nnx` to wrap one.

  Attributes:
    split: the module's graph and leaves (a :class:`_Split`).
  """
  split: Any
  call: Any = None  # call(module, x), for a forward that needs more than x

  @nn.compact
  def __call__(self, x, train: bool = False):
    s = self.split
    fresh = {}

    def initial(collection, name):
      if not fresh:
        key = self.make_rng("params") if self.is_initializing() else None
        fresh.update(s.fresh(key))
      return fresh[collection][name]

    pure, cells = {}, {}
    for collection, tree in s.pure.items():
      pure[collection] = {}
      for name in tree:
        if collection == "params":
          pure[collection][name] = self.param(
              name, lambda _, n=name: initial("params", n))
        else:
          cell = self.variable(collection, name,
                               lambda c=collection, n=name: initial(c, n))
          cells[(collection, name)] = cell
          pure[collection][name] = cell.value
    key = None
    if train and jax.tree.leaves(s.rng_state) and self.has_rng("dropout"):
      key = self.make_rng("dropout")

    def forward(x, key):
      module = s.merge(pure)
      if train:
        module.train()
        if key is not None:
          _reseed(module, key)
      else:
        module.eval()
      y = module(x) if self.call is None else self.call(module, x)
      return y, (_pure(_states(module)[1]) if train else None)

    names = unbound_axis_names(s.merge(pure)) if train else ()
    if len(names) > 1:
      raise UserError(f"the NNX model uses collectives over the axis names {names}; one "
                      "axis name (the batch's, as in BatchNorm(axis_name='batch')) is "
                      "supported.")
    if names:  # written for pmap: one example per position of the named (batch) axis

      def one(x1, k1):
        y, new = forward(jax.tree.map(lambda a: a[None], x1), k1)
        return jax.tree.map(lambda a: a[0], y), new
      keys = None if key is None else jax.random.split(key, jax.tree.leaves(x)[0].shape[0])
      y, new = jax.vmap(one, in_axes=(0, None if keys is None else 0), out_axes=(0, None),
                        axis_name=names[0])(x, keys)
    else:
      y, new = forward(x, key)
    if train and not self.is_initializing() and cells:
      for (collection, name), cell in cells.items():
        if self.is_mutable_collection(collection):
          cell.value = new[collection][name]
    return y

  def module(self, variables: Mapping[str, Any]) -> nnx.Module:
    """The NNX module holding `variables` (host or device arrays)."""
    pure = {c: dict(v) for c, v in variables.items()}
    return self.split.merge(pure)


def unbound_axis_names(module: nnx.Module) -> tuple[str, ...]:
  """The axis names an NNX module's layers take (``axis_name``, e.g. a BatchNorm
  written for ``pmap``) that are not bound where it is called."""
  names = []
  for _, node in nnx.iter_graph(module):
    value = getattr(node, "axis_name", None) if isinstance(node, nnx.Module) else None
    for name in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(name, str) and name not in names:
        names.append(name)
  unbound = []
  for name in names:
    try:
      jax.lax.axis_size(name)
    except NameError:
      unbound.append(name)
  return tuple(unbound)


def _reseed(module: nnx.Module, key) -> None:
  """Gives every RNG stream of `module` a key derived from `key` (train-mode dropout)."""
  for i, (_, node) in enumerate(nnx.iter_graph(module)):
    if isinstance(node, nnx.RngStream):
      node.key[...] = jax.random.fold_in(key, i)
      node.count[...] = jnp.zeros((), jnp.uint32)


def draw_of(factory: Callable) -> Callable:
  """``key -> pure leaves`` of a new module from ``factory(key)`` (the fresh init)."""
  return lambda key: _pure(_states(factory(key))[1])


def sliced_draw(draw: Callable | None, slices: Mapping[str, Mapping[int, Any]]):
  """The fresh init of a pruned module: a fresh full-width draw, cut by ``slices``
  (``{NNX leaf path: {axis: kept indices}}``); None when ``draw`` is None."""
  if draw is None:
    return None

  def sliced(key):
    pure = jax.tree.map(lambda a: a, draw(key))
    for path, spec in slices.items():
      *parents, last = path.split("/")
      for tree in pure.values():
        node = tree
        for k in parents:
          node = node.get(k) if isinstance(node, Mapping) else None
          if node is None:
            break
        if node is not None and last in node:
          leaf = node[last]
          for axis, keep in spec.items():
            leaf = jnp.take(leaf, jnp.asarray(np.asarray(keep), jnp.int32), axis=axis)
          node[last] = leaf
    return pure
  return sliced


def from_nnx(module: nnx.Module, draw: Callable | None = None, call: Callable | None = None
             ) -> tuple[FromNNX, dict[str, Any]]:
  """``(FromNNX wrapper, its Linen variables)`` of an NNX module (weights copied).

  ``draw`` (``key -> pure leaves``, see :func:`draw_of`) makes ``init`` a fresh draw;
  without it ``init`` returns the module's own weights. ``call(module, x)`` runs the
  module when its forward needs more than ``x`` (default ``module(x)``).
  """
  split = _Split(module, draw)
  return (FromNNX(split=split, call=call),
          jax.tree.map(jnp.asarray, dict(split.pure)))


__all__ = ["mode_flag", "WithTrain", "WithCall", "BindAxis", "FromNNX", "from_nnx",
           "draw_of", "sliced_draw", "unbound_axis_names", "axis_names",
           "OTHER_COLLECTION"]
