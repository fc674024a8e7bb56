"""A user's own Flax model in the recipes: ``--config.model.name=<module>:<factory>``.

The recipes run every model as a Linen module called ``model.apply(variables, x,
train=...)``. :func:`build` imports the user's factory (from ``PYTHONPATH``), calls it
with ``model.kwargs`` and returns such a module:

- a Linen module whose ``__call__`` takes ``train`` is used as it is;
- a Linen module that takes ``training``, ``deterministic`` (negated) or no mode flag
  is wrapped in :class:`WithTrain`, which shares its scope (the variable tree is the
  user's own);
- a Linen model written for ``pmap`` (its train-mode forward uses a collective over
  an axis name it does not bind, e.g. ``BatchNorm(axis_name='batch')``) is wrapped in
  :class:`BindAxis`: the name is bound to the global batch;
- an ``nnx.Module`` is wrapped in :class:`FromNNX`: its ``nnx.Param`` leaves become the
  ``params`` collection and its ``nnx.BatchStat`` leaves ``batch_stats``, under the
  module's own attribute paths (``params/conv1/kernel`` is the NNX ``conv1/kernel``).
  ``model.train()`` / ``model.eval()`` switch its mode; in train mode its dropout
  streams are reseeded from the step's ``dropout`` key. An NNX model written for
  ``pmap`` (a layer's ``axis_name``, e.g. ``nnx.BatchNorm(axis_name='batch')``, not
  bound where it runs) runs in train mode once per example under a ``vmap`` with that
  axis name: its statistics are the global batch's; the wrapper does this itself, so
  the pruned, rebuilt or depth-searched model keeps it.

A compute dtype (``model.dtype=bfloat16``) reaches the model the way Flax's own layers
take it: as the factory's ``dtype`` argument, or else as the ``dtype`` field of the
Linen module it returns; the model must then run a conv or matmul in that dtype.

Anything wrong (a factory that cannot be imported, returns something else, or whose
model does not run on the dataset's input shape, gives the wrong number of
logits, or has no compute dtype to set) is one :class:`~jaxprune.errors.UserError`
line, raised before any work.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
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


def is_external(name: str) -> bool:
  """Whether a ``model.name`` names a user factory (``module.path:factory``)."""
  return ":" in name


def load_factory(spec: str) -> Callable:
  """The callable named by ``"package.module:factory"`` (imported from ``PYTHONPATH``)."""
  module_name, _, attr = spec.partition(":")
  if not module_name or not attr:
    raise UserError(f"config model.name={spec!r}: a user model is named "
                    "'<module path>:<factory>', e.g. 'my_models:make_cnn'.")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UserError(f"config model.name={spec!r}: cannot import module {module_name!r} "
                    f"({e}); is its folder on PYTHONPATH?") from None
  except Exception as e:  # the user's module failed while importing
    raise UserError(f"config model.name={spec!r}: importing {module_name!r} failed: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    ) from None
  factory = module
  for part in attr.split("."):
    if not hasattr(factory, part):
      raise UserError(f"config model.name={spec!r}: module {module_name!r} has no "
                      f"attribute {attr!r}.")
    factory = getattr(factory, part)
  if not callable(factory):
    raise UserError(f"config model.name={spec!r}: {attr!r} is a "
                    f"{type(factory).__name__}, not a factory.")
  return factory


def parse_kwargs(text: str | Mapping | None) -> dict[str, Any]:
  """``model.kwargs``: a Python dict literal, e.g. ``"{'features': (32, 64)}"``."""
  if not text:
    return {}
  if isinstance(text, Mapping):
    return dict(text)
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise UserError(f"config model.kwargs={text!r} is not a Python dict literal, e.g. "
                    "\"{'features': 64}\".") from None
  if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
    raise UserError(f"config model.kwargs={text!r} must be a dict with string keys.")
  return value


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


def _axis_names(model: nn.Module, input_shape) -> tuple[str, ...]:
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


def _check_fits(model: nn.Module, spec: str, num_classes: int, input_shape) -> None:
  x = jnp.zeros((1, *input_shape), jnp.float32)
  try:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  except UserError:
    raise
  except Exception as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(f"model {spec!r} does not run on the dataset's input shape "
                    f"{tuple(input_shape)} (a batch of {x.shape}): {type(e).__name__}: "
                    f"{first}") from None
  shape = getattr(out, "shape", None)
  if shape != (1, num_classes):
    raise UserError(f"model {spec!r} returns {shape if shape is not None else type(out).__name__}"
                    f" for a batch of 1; the dataset needs logits of shape "
                    f"(batch, {num_classes}).")
  # A batch of 3 with the batch-1 variables: a model that mixes or flattens the batch
  # (x.reshape(1, -1), a mean over axis 0) passes at batch 1 only.
  x3 = jnp.zeros((3, *input_shape), jnp.float32)
  try:
    shape = getattr(jax.eval_shape(lambda v: model.apply(v, x3, train=False), variables),
                    "shape", None)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    shape = f"{type(e).__name__}: {first}"
  if shape != (3, num_classes):
    raise UserError(f"model {spec!r} runs on a batch of 1 but gives {shape} for a batch of "
                    f"3 (want (3, {num_classes})): it mixes the examples of a batch; keep "
                    "the batch axis, e.g. x.reshape(x.shape[0], -1).")


def compute_dtypes(jaxpr) -> set:
  """Operand dtypes of every conv and matmul in ``jaxpr`` (nested jaxprs included)."""
  from jaxprune.graph import interpret  # pylint: disable=g-import-not-at-top
  out = set()
  for eqn, _ in interpret.all_eqns(jaxpr):
    if eqn.primitive.name in interpret.LAYERS:
      out.update(jnp.dtype(v.aval.dtype) for v in eqn.invars)
  return out


def _check_dtype(model: nn.Module, spec: str, dtype, input_shape) -> None:
  x = jnp.zeros((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)
  if jnp.dtype(dtype) not in compute_dtypes(jaxpr.jaxpr):
    raise UserError(f"config model.dtype={jnp.dtype(dtype).name!r}: model {spec!r} was given "
                    f"dtype={jnp.dtype(dtype).name} but runs no conv or matmul in it; pass "
                    "its dtype on to its layers (nn.Conv(..., dtype=dtype)).")


def build(spec: str, kwargs: Mapping[str, Any] | str | None, num_classes: int,
          input_shape, dtype=None) -> nn.Module:
  """The user's model as a Linen module with ``train`` (see the module docstring).

  Args:
    spec: ``"<module path>:<factory>"``.
    kwargs: the factory's arguments (a dict or a dict literal string).
      ``num_classes`` is added when the factory takes it and it is not given; an NNX
      factory that takes ``rngs`` gets ``nnx.Rngs(0)`` (and a fresh draw at ``init``).
    num_classes: the dataset's classes (the model must return that many logits).
    input_shape: one example's shape, e.g. (28, 28, 1).
    dtype: a compute dtype other than float32 (e.g. ``jnp.bfloat16``): passed as the
      factory's ``dtype`` argument, or set as the returned Linen module's ``dtype``
      field; a model with neither, or one that then computes no conv or matmul in it,
      is a :class:`UserError`.

  Returns:
    A Linen module, ``model.apply(variables, x, train=...)``.
  """
  factory = load_factory(spec)
  kwargs = parse_kwargs(kwargs)
  try:
    parameters = inspect.signature(factory).parameters
  except (TypeError, ValueError):
    parameters = {}
  if "num_classes" in parameters and "num_classes" not in kwargs:
    kwargs["num_classes"] = num_classes
  takes_rngs = "rngs" in parameters and "rngs" not in kwargs
  if dtype is not None and jnp.dtype(dtype) == jnp.float32:
    dtype = None
  if dtype is not None and "dtype" in kwargs:
    raise UserError(f"model {spec!r}: set the compute dtype once, with config model.dtype, "
                    "not also in model.kwargs.")
  dtype_arg = dtype is not None and "dtype" in parameters
  if dtype_arg:
    kwargs["dtype"] = jnp.dtype(dtype)

  def make(key=None):
    extra = {"rngs": nnx.Rngs(key if key is not None else 0)} if takes_rngs else {}
    return factory(**kwargs, **extra)

  try:
    made = make()
  except UserError:
    raise
  except Exception as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(f"model {spec!r}: calling the factory with {kwargs} failed: "
                    f"{type(e).__name__}: {first}") from None
  if isinstance(made, nnx.Module):
    if dtype is not None and not dtype_arg:
      raise UserError(f"config model.dtype={jnp.dtype(dtype).name!r}: NNX model {spec!r} has "
                      "no compute dtype to set (its factory takes no `dtype` argument); add "
                      "one and pass it to its layers (nnx.Conv(..., dtype=dtype)), or drop "
                      "--config.model.dtype.")
    if len(unbound_axis_names(made)) > 1:
      raise UserError(f"model {spec!r} uses collectives over the axis names "
                      f"{unbound_axis_names(made)}; one axis name (the batch's, as in "
                      "BatchNorm(axis_name='batch')) is supported.")
    model = FromNNX(split=_Split(made, draw_of(make) if takes_rngs else None))
  elif isinstance(made, nn.Module):
    if dtype is not None and not dtype_arg:
      if "dtype" not in {f.name for f in dataclasses.fields(made)}:
        raise UserError(f"config model.dtype={jnp.dtype(dtype).name!r}: model {spec!r} has no "
                        "compute dtype to set (its factory takes no `dtype` argument and "
                        f"{type(made).__name__} has no `dtype` field); add one, as Flax's "
                        "layers do, or drop --config.model.dtype.")
      made = made.clone(dtype=jnp.dtype(dtype))
    flag = mode_flag(made)
    model = made if flag == "train" else WithTrain(made, flag)
  else:
    raise UserError(f"model {spec!r}: the factory returned a {type(made).__name__}, not "
                    "a Flax Linen module or an nnx.Module.")
  names = _axis_names(model, input_shape) if isinstance(model, nn.Module) else ()
  if names:
    model = BindAxis(model, names[0])
    more = _axis_names(model, input_shape)
    if more:
      raise UserError(f"model {spec!r} uses collectives over the axis names "
                      f"{names + more}; one axis name (the batch's, as in "
                      "BatchNorm(axis_name='batch')) is supported.")
  _check_fits(model, spec, num_classes, input_shape)
  if dtype is not None:
    _check_dtype(model, spec, dtype, input_shape)
  return model


__all__ = ["is_external", "load_factory", "parse_kwargs", "build", "compute_dtypes",
           "mode_flag", "WithTrain", "WithCall", "BindAxis",
           "FromNNX", "from_nnx", "draw_of", "sliced_draw", "unbound_axis_names",
           "OTHER_COLLECTION"]
