"""The smaller Linen or NNX network from per-leaf slices (``rebuild``), and the fold that
keeps a compensated group exact (``compensate``); design: docs/design/surgery.md."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import inspect
import itertools
import mmap
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError
from jaxprune.graph import interpret, propagate, tracing
from jaxprune.graph import adapters
from jaxprune.surgery import rules
from jaxprune.optim.selection import leaf_path

Slices = Mapping[str, Mapping[int, Any]]


@dataclasses.dataclass
class Pruned:
  """A smaller network.

  Attributes:
    model: a :class:`Rebuilt` Linen module (``model.apply(variables, x)``,
      ``model.init(rng, x)`` at the pruned widths) or a new ``nnx.Module``.
    variables: the smaller Linen variables, every collection; None for NNX.
    shapes: ``{leaf path: (old shape, new shape)}`` of every leaf that changed.
    stale: NNX: ``{module path: attribute names}`` of user modules whose integer
      attributes may still hold a removed size (docs/design/surgery.md).
    approximate: set by :func:`jaxprune.surgery.prune`: ``{group id: effects}`` of
      the narrowed groups whose removal changes the function (empty: exact).
    folded: set by :func:`compensate`: ``{leaf path: factor}`` each leaf was
      multiplied by to undo a width-derived scale (a compensated group's fold).
    removed_blocks: module paths of the residual blocks the network skips
      (``prune_to(depth=True)``; ``model`` is then wrapped, see
      :func:`jaxprune.surgery.blocks.skip_blocks`).
  """
  model: Any
  variables: Any
  shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
  stale: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  approximate: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  folded: dict[str, float] = dataclasses.field(default_factory=dict)
  removed_blocks: tuple[str, ...] = ()


def rebuild(model: Any, variables: Any, slices: Slices, input_shape: Any = None,
            call: Callable | None = None, *,
            overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Pruned:
  """Slices ``variables`` (or an NNX module's Variables) and makes the model fit.

  Args:
    model: a Linen module (with ``variables``) or an ``nnx.Module`` (``variables``
      None).
    variables: the Linen variables (every collection), or None for NNX.
    slices: ``{leaf path: {axis: sorted kept indices along that axis}}``; leaves
      and axes not named are kept whole.
    input_shape: one example's shape (e.g. ``(32, 32, 3)``, float32), an array /
      ``jax.ShapeDtypeStruct`` of a whole batch (e.g. int tokens), or a pytree of
      shapes and structs (several inputs, see
      :func:`jaxprune.graph.tracing.example_inputs`). When given, the smaller network
      is run once (abstractly for Linen) to check it; Linen user layers' attributes
      are inferred only then.
    call: how the model runs on ``x``: NNX ``call(module, x)`` (default ``module(x)``
      on an ``.eval()`` copy); Linen ``call(variables, x)`` (default ``apply(variables,
      x)``, with ``train=False`` when the module takes ``train``). The check calls the
      pruned module with the arguments the original receives from ``call``.
    overrides: ``{module path: {attribute: value}}`` set on those modules, for user
      layers whose attributes cannot be derived (module path '/'-joined, relative
      to the model, e.g. ``"blocks_0/mlp"``; ``""`` is the model itself).

  Returns:
    A :class:`Pruned`.

  Example:
    >>> slices = {"params/conv1/kernel": {3: keep}, "params/conv1/bias": {0: keep},
    ...           "params/conv2/kernel": {2: keep}}
    >>> pruned = rebuild(model, variables, slices, (32, 32, 3))
    >>> logits = pruned.model.apply(pruned.variables, x)
  """
  overrides = {k: dict(v) for k, v in (overrides or {}).items()}
  refuse_shapes_only("rebuild", model, variables)
  if isinstance(model, adapters.FromNNX):
    return _rebuild_from_nnx(model, variables, slices, input_shape, overrides)
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise UserError("rebuild: an nnx.Module carries its own state; "
                      "pass variables=None.")
    return _rebuild_nnx(model, slices, input_shape, call, overrides)
  if isinstance(model, nn.Module):
    if variables is None:
      raise UserError("rebuild: a Linen module needs its variables "
                      "(the dict with 'params', 'batch_stats', ...).")
    return _rebuild_linen(model, variables, slices, input_shape, overrides, call)
  raise UserError(f"rebuild: {type(model).__name__} is neither a flax.linen.Module nor "
                  "an nnx.Module; a pure function f(params, x) has no module to "
                  "rebuild: slice its params with jaxprune.surgery.slice_tree.")


# ---------------------------------------------------------------------------------
# Slicing (shared).


def shapes_only_leaf(model: Any, variables: Any) -> str | None:
  """The path of a ``jax.ShapeDtypeStruct`` leaf (``jax.eval_shape`` / ``nnx.eval_shape``
  variables: shapes without weights), or None."""
  tree = variables
  if variables is None and isinstance(model, nnx.Module):
    tree = nnx.state(model)
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf_path(kp)
  return None


def refuse_shapes_only(what: str, model: Any, variables: Any):
  """One line when the weights are shapes only: slicing (and ranking) needs values."""
  path = shapes_only_leaf(model, variables)
  if path is not None:
    raise UserError(
        f"{what}: the variables are shapes only ({path} is a jax.ShapeDtypeStruct, as "
        "jax.eval_shape / nnx.eval_shape give): pruning slices (and ranks) the weights, "
        "so pass initialised variables; graph.trace(...).predict(keep) plans FLOPs and "
        "params from shapes alone.")


def _slice_leaf(path: str, x: Any, spec: Mapping[int, Any]) -> np.ndarray:
  if isinstance(x, jax.ShapeDtypeStruct):
    raise UserError(f"rebuild: {path} is a jax.ShapeDtypeStruct (shapes only): slicing "
                    "needs the weights; pass initialised variables.")
  x = np.asarray(x)
  kept = {}
  for axis, idx in spec.items():
    axis = int(axis)
    if not -x.ndim <= axis < x.ndim:
      raise UserError(f"rebuild: slice of {path} names axis {axis}, but the leaf has "
                      f"shape {x.shape}.")
    idx = np.asarray(idx)
    size = x.shape[axis]
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) and idx.size:
      raise UserError(f"rebuild: kept indices of {path} axis {axis} must be a 1-D "
                      f"integer array, got {idx.dtype} {idx.shape}.")
    idx = idx.astype(np.int64)
    if idx.size == 0:
      raise UserError(f"rebuild: {path} axis {axis} keeps no index; keep at least one "
                      "channel of every group.")
    if idx.min() < 0 or idx.max() >= size or np.any(np.diff(idx) <= 0):
      raise UserError(f"rebuild: kept indices of {path} axis {axis} must be sorted, "
                      f"unique and in [0, {size}); got {idx.tolist()[:16]}...")
    kept[axis % x.ndim] = idx
  return _gather(x, kept)


GATHER_CHUNK = 1 << 20  # bytes of a multi-axis slice's intermediate (reused, in cache)


def _gather(x: np.ndarray, kept: Mapping[int, np.ndarray]) -> np.ndarray:
  """``x`` at the `kept` indices of each axis, written once into a new 64-byte aligned
  array (which :func:`_to_device` hands to JAX without a copy on a CPU).

  One axis: one ``np.take`` into the result. Several: the result is filled in blocks
  of its first axis, each taken along every sliced axis through a small intermediate,
  so no leaf-sized temporary is made (on a 4 GB model, fresh memory is what costs).
  """
  if not kept:
    return x
  shape = tuple(len(kept[a]) if a in kept else n for a, n in enumerate(x.shape))
  out = _aligned_empty(shape, x.dtype)
  axes = sorted(kept)
  if len(axes) == 1:  # indices are checked above: no bounds pass
    np.take(x, kept[axes[0]], axis=axes[0], out=out, mode="clip")
    return out
  rows = kept.get(0)
  row_bytes = max(1, x.nbytes // max(x.shape[0], 1))
  step = max(1, GATHER_CHUNK // row_bytes)
  rest = [a for a in axes if a != 0]
  for s in range(0, shape[0], step):
    e = min(shape[0], s + step)
    part = x[s:e] if rows is None else np.take(x, rows[s:e], axis=0, mode="clip")
    for a in rest[:-1]:
      part = np.take(part, kept[a], axis=a, mode="clip")
    np.take(part, kept[rest[-1]], axis=rest[-1], out=out[s:e], mode="clip")
  return out


def _aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on a 64-byte boundary.

  From 4 MiB up it is a private anonymous ``mmap`` (page-aligned): numpy advises huge
  pages for arrays that large (``MADV_HUGEPAGE``), and where the kernel defragments on
  such a fault (THP ``defrag=madvise``, a common default) or the machine is a VM whose
  memory is backed on first touch, faulting fresh memory in costs several times more
  (measured here: 7.3 s against 1.3-2 s per GB). The pruned weights are such memory.
  """
  dtype = np.dtype(dtype)
  n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if n >= 1 << 22 and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS"):
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                    | getattr(mmap, "MAP_POPULATE", 0))  # faulted in at once: it is all written
    return np.frombuffer(buf, dtype).reshape(shape)
  raw = np.empty(n + 64, np.uint8)
  start = (-raw.ctypes.data) % 64
  return raw[start:start + n].view(dtype).reshape(shape)


def _to_device(x: np.ndarray) -> jax.Array:
  """A sliced leaf as a JAX array: on a CPU, an aligned numpy array becomes one without
  a copy (``jax.device_put`` aliases it; nothing else holds or writes it)."""
  return jax.device_put(x) if isinstance(x, np.ndarray) else jnp.asarray(x)


def slice_tree(tree: Any, slices: Slices, *, path_fn: Callable = leaf_path) -> Any:
  """``tree`` with ``slices`` applied to its leaves (paths by :func:`leaf_path`).

  Every path in ``slices`` must name a leaf; the error lists the available ones.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [path_fn(kp) for kp, _ in flat]
  _check_paths(slices, paths)
  todo = [(p, x) for p, (_, x) in zip(paths, flat) if p in slices]
  done = dict(zip([p for p, _ in todo], parallel_map(
      lambda t: _slice_leaf(t[0], t[1], slices[t[0]]), todo,
      sum(getattr(x, "nbytes", 0) for _, x in todo))))
  leaves = [done[p] if p in done else x for p, (_, x) in zip(paths, flat)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def masked_original(model: Any, variables: Any, slices: Slices) -> tuple[Any, Any]:
  """``(model, variables)`` of the original network with every entry that ``slices``
  removes set to zero (each leaf keeps its shape): the network a removal that is exact
  must equal (run it with :func:`forward`). An NNX module is cloned, the original left
  as it is; a pure function's params are named as the graph names them."""
  def zeroed(path, x):
    x = np.array(x, copy=True)
    for axis, kept in slices[path].items():
      index = [slice(None)] * x.ndim
      index[int(axis)] = np.setdiff1d(np.arange(x.shape[int(axis)]), np.asarray(kept))
      x[tuple(index)] = 0
    return x
  kind = tracing.model_kind(model, variables)
  if kind == "nnx":
    clone = nnx.clone(model)
    for p, var in nnx.iter_graph(clone):
      if isinstance(var, nnx.Variable) and _nnx_path(p) in slices:
        old = var.get_value()
        var.set_value(jnp.asarray(zeroed(_nnx_path(p), old), jnp.result_type(old)))
    return clone, None
  path_fn = tracing.leaf_name if kind == "function" else leaf_path
  return model, jax.tree_util.tree_map_with_path(
      lambda kp, x: jnp.asarray(zeroed(path_fn(kp), x), jnp.result_type(x))
      if path_fn(kp) in slices else x, variables)


PARALLEL_BYTES = 1 << 26  # from this much data up, leaves are processed on threads


def parallel_map(fn: Callable, items, nbytes: int) -> list:
  """``[fn(item) for item in items]``, on up to ``os.cpu_count()`` (at most 8) threads
  when the items hold ``PARALLEL_BYTES`` or more (numpy's take, casts and reductions
  release the GIL: a large model's leaves are sliced and scored side by side). The
  first item's error in order is the one raised, as in the loop."""
  items = list(items)
  workers = min(8, os.cpu_count() or 1, len(items))
  if workers < 2 or nbytes < PARALLEL_BYTES:
    return [fn(item) for item in items]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(fn, items))


def _check_paths(slices, paths):
  missing = sorted(set(slices) - set(paths))
  if missing:
    shown = ", ".join(paths[:40]) + (" ..." if len(paths) > 40 else "")
    raise UserError(f"rebuild: no leaf {missing[0]!r} in the model"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                    f"leaves: {shown}")


def _abstract_example(input_shape):
  """The input(s) as ``jax.ShapeDtypeStruct`` s of a batch of one, read exactly as
  :func:`jaxprune.graph.tracing.example_inputs` reads them for the trace (a single
  struct ``(T,)`` of token ids is one example, as a shape is): the rebuild's check
  must call the pruned module with what the trace called the original with."""
  return tracing.example_inputs(input_shape)


def _example(input_shape):
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), _abstract_example(input_shape))


def probe_inputs(input_shape: Any, n: int, seed: int = 0):
  """`n` random examples of the input(s) :func:`jaxprune.graph.tracing.example_inputs`
  describes, each leaf ``(n, *one example's shape)``: floats standard normal, integers
  (token ids, positions, masks) 0 or 1 — in range of every table of two or more rows —
  and booleans at random. What surgery's own checks run on."""
  rng = np.random.default_rng(seed)

  def one(a):
    shape = (n,) + tuple(a.shape[1:])
    if jnp.issubdtype(a.dtype, jnp.inexact):
      return jnp.asarray(rng.normal(size=shape), a.dtype)
    return jnp.asarray(rng.integers(0, 2, size=shape), a.dtype)
  return jax.tree.map(one, tracing.example_inputs(input_shape))


def _is_array(a) -> bool:
  return hasattr(a, "shape") and hasattr(a, "dtype")


def _eval_shape(fn, args, kwargs):
  """``jax.eval_shape(fn, *args, **kwargs)`` with the non-array leaves (flags such as
  ``train=False``) passed as they are."""
  flat, tree = jax.tree.flatten((args, kwargs))
  dyn = [i for i, a in enumerate(flat) if _is_array(a)]

  def run(values):
    full = list(flat)
    for i, v in zip(dyn, values):
      full[i] = v
    a, k = jax.tree.unflatten(tree, full)
    return fn(*a, **k)
  return jax.eval_shape(run, [jax.ShapeDtypeStruct(np.shape(flat[i]),
                                                   jnp.result_type(flat[i])) for i in dyn])


def _root_call(model, variables, call, x):
  """``(args, kwargs)`` the Linen `model`'s ``__call__`` receives when ``call(variables,
  x)`` runs (abstractly; arrays as ``jax.ShapeDtypeStruct`` s): how the rebuild's check
  calls the pruned module the way the user's ``call`` does (token ids, masks, flags)."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if not seen and not context.module.path and context.method_name == "__call__":
      seen.append(jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if _is_array(a) else a,
          (tuple(args), dict(kwargs))))
      # Recorded: the rest is not run (`variables` may be a pruned network's, which the
      # original module's layers would refuse).
      raise _Recorded()
    return next_fun(*args, **kwargs)
  try:
    with nn.intercept_methods(record):
      jax.eval_shape(lambda v, x: call(v, x), variables, x)
  except _Recorded:
    pass
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"rebuild: call(variables, x) of the original "
                    f"{type(model).__name__} failed on the check input: "
                    f"{type(e).__name__}: {_first_line(e)}") from e
  if not seen:
    raise UserError(f"rebuild: call(variables, x) never calls the "
                    f"{type(model).__name__}'s __call__ (the check calls the pruned "
                    "module the way call does); call model.apply(variables, ...).")
  return seen[0]


class _Recorded(Exception):
  """Stops :func:`_root_call` once the root's arguments are seen."""


def _first_line(e) -> str:
  return (str(e).splitlines() or [""])[0]


def _int_attrs(obj, names):
  return {n: getattr(obj, n) for n in names
          if isinstance(getattr(obj, n, None), int)
          and not isinstance(getattr(obj, n), bool)}


# ---------------------------------------------------------------------------------
# Linen.


# Layers whose parameter shapes follow their input (no size attribute to update).
_INPUT_SIZED = (nn.BatchNorm, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


class Rebuilt(nn.Module):
  """The user's Linen module run at pruned widths (docs/design/surgery.md).

  Attributes:
    jaxprune_base: the original module (its attributes are not changed; named so as
      not to clash with the user's submodules; also ``base``).
    shapes: ``((leaf path, old shape, new shape), ...)`` of the changed leaves and of
      every ``params`` leaf (unchanged: old == new; a Flax layer's size attributes
      are set from them).
    overrides: ``((module path, ((attribute, value), ...)), ...)``.
  """
  jaxprune_base: nn.Module
  shapes: tuple = ()
  overrides: tuple = ()

  def setup(self):
    nn.share_scope(self, self.jaxprune_base)

  def __call__(self, *args, **kwargs):
    with nn.intercept_methods(self._interceptor()):
      return self.jaxprune_base(*args, **kwargs)

  @property
  def base(self) -> nn.Module:
    return self.jaxprune_base

  def _interceptor(self):
    new = {p: s for p, _, s in self.shapes}
    old_shapes = {p: s for p, s, _ in self.shapes}
    touched = {"/".join(p.split("/")[1:-1]) for p in new}  # module paths, no collection
    prefixes = {"/".join(m.split("/")[:i]) for m in touched
                for i in range(len(m.split("/")) + 1)}
    overrides = {m: dict(a) for m, a in self.overrides}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if module is not self:
        mpath = _module_path(module)
        attrs = {}
        rule = rules.rule_for(module) if mpath in prefixes else None
        if rule is not None:
          def shape(rel, old=False, mpath=mpath):
            key = f"params/{mpath}/{rel}" if mpath else f"params/{rel}"
            return (old_shapes if old else new).get(key)
          attrs = dict(rule(module, shape, args))
        attrs.update(overrides.get(mpath, {}))
        for name, value in attrs.items():
          # A bound module is this call's own clone; its dataclass is frozen.
          object.__setattr__(module, name, value)
        try:
          return next_fun(*args, **kwargs)
        except Exception:
          if not _FAILED:  # the innermost layer raises first
            _FAILED.append((mpath, module))
          raise
      return next_fun(*args, **kwargs)
    return interceptor


def _module_path(module: nn.Module) -> str:
  """A bound module's path in the variables: under :class:`Rebuilt` (which shares its
  scope with the base) without the ``jaxprune_base`` step that modules handed to the base
  as attributes (``nn.Sequential``'s layers) keep in their path."""
  path = list(module.path)
  while path and path[0] == "jaxprune_base":
    path = path[1:]
  return "/".join(path)


@functools.cache
def _rebuilt_class(base_cls):
  """A :class:`Rebuilt` whose ``__call__`` shows ``base_cls.__call__``'s signature.

  ``inspect.signature`` is how callers decide to pass ``train=``.
  """
  def __call__(self, *args, **kwargs):
    return Rebuilt.__call__(self, *args, **kwargs)
  try:
    __call__.__signature__ = inspect.signature(base_cls.__call__)
  except (TypeError, ValueError):
    pass
  return type(f"Rebuilt{base_cls.__name__}", (Rebuilt,), {"__call__": __call__,
                                                          "__module__": __name__})


_accepts_train = tracing.accepts_train  # one reading of `train`


def _rebuild_linen(model, variables, slices, input_shape, overrides, call=None):
  variables = jax.tree.map(np.asarray, dict(variables))
  # Sliced leaves are new arrays (handed to JAX as they are); the others are copied.
  small = jax.tree_util.tree_map_with_path(
      lambda kp, x: _to_device(x) if slices.get(leaf_path(kp)) else jnp.asarray(x),
      slice_tree(variables, slices))
  old_flat = {leaf_path(kp): np.shape(x)
              for kp, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
  new_flat = {leaf_path(kp): np.shape(x)
              for kp, x in jax.tree_util.tree_flatten_with_path(small)[0]}
  given = model  # what `variables` fit (a Rebuilt runs them at its widths)
  if isinstance(model, Rebuilt):  # pruning a pruned network: one wrapper, widths composed
    first = {p: o for p, o, _ in model.shapes}
    old_flat.update(first)
    overrides = {**{m: dict(a) for m, a in model.overrides}, **overrides}
    model = model.base
  # Every Flax layer's size attributes follow its variables, an unchanged layer's too: a
  # layer whose code derives its width from another (an attention's out_features from
  # its query input, ``Dense(x.shape[-1])``) must not follow a group it is not in.
  shapes = tuple((p, old_flat[p], new_flat[p]) for p in sorted(new_flat)
                 if old_flat[p] != new_flat[p] or p.startswith("params/"))
  wrapped = _linen_wrap(model, shapes, overrides)
  if input_shape is not None:
    x = _abstract_example(input_shape)
    if call is not None:
      args, kwargs = _root_call(model, variables, call, x)
    else:
      args, kwargs = (x,), ({"train": False} if _accepts_train(model) else {})
    wrapped = _check_linen(wrapped, model, small, args, kwargs, shapes, overrides,
                           variables, given)
  return Pruned(model=wrapped, variables=small,
                shapes={p: (o, n) for p, o, n in shapes if o != n})


def _linen_wrap(model, shapes, overrides):
  frozen = tuple(sorted((m, tuple(sorted(a.items()))) for m, a in overrides.items()))
  return _rebuilt_class(type(model))(jaxprune_base=model, shapes=shapes,
                                           overrides=frozen)


def _abstract_init(wrapped, x, kwargs):
  """``init`` of the pruned module, abstractly; ``x`` is the positional args."""
  return _eval_shape(lambda *a, **k: wrapped.init(jax.random.key(0), *a, **k), x, kwargs)


# After a failed run of the pruned module: the innermost layer that raised.
_FAILED: list = []


def _run_failed(e, shapes) -> UserError:
  """One line for a pruned module that fails to run: the innermost layer running and
  the error, and what to pass (a width computed from a config or a constant)."""
  mpath, module = _FAILED[0] if _FAILED else ("", None)
  kind = type(module).__name__ if module is not None else "layer"
  names = [f.name for f in dataclasses.fields(module)
           if f.name not in ("parent", "name")] if module is not None else []
  sizes = sorted({a for _, o, n in shapes for a, b in zip(o, n) if a != b})
  config = [n for n in names if _holds_size(getattr(module, n, None), sizes)]
  where = f"layer {mpath or '<model>'!r} ({kind})"
  hint = (f"pass overrides={{{mpath!r}: {{{(config or ['attribute'])[0]!r}: <value at the "
          f"pruned width>}}}}" if names else "")
  out = UserError(
      f"rebuild: {where} fails at the pruned widths: {type(e).__name__}: "
      f"{_first_line(e)} -- it computes a size (one of {sizes} before pruning) from its "
      f"configuration or a constant; {hint + ', or ' if hint else ''}keep that group "
      "whole with ignore=[a leaf-path pattern of its members].")
  out.module_path = mpath
  out.int_attrs = _int_attrs(module, names) if module is not None else {}
  return out


def _holds_size(value, sizes) -> bool:
  """Whether a config-like attribute (a dataclass, an object, a dict) holds one of the
  integer `sizes` (e.g. an HF config's ``hidden_size``)."""
  if isinstance(value, (int, float, str, bool, type(None), type)) or callable(value):
    return False
  fields = value if isinstance(value, Mapping) else getattr(value, "__dict__", None)
  if not isinstance(fields, Mapping):
    return False
  return any(isinstance(v, int) and not isinstance(v, bool) and v in sizes
             for v in fields.values())


def _check_linen(wrapped, model, small, x, kwargs, shapes, overrides, variables=None,
                 given=None):
  """Runs ``init`` and ``apply`` abstractly; infers user layers' attributes; checks the
  smaller network computes the original's graph (:func:`_structure`). ``x`` is the
  tuple of positional args of the module's ``__call__``, ``kwargs`` its keywords."""
  if variables is None:
    return _check_linen_shapes(wrapped, model, small, x, kwargs, shapes, overrides)[0]
  given = model if given is None else given  # the module `variables` fit
  base = _structure(given, variables, x, kwargs)
  first = None
  try:
    out, got = _check_linen_shapes(wrapped, model, small, x, kwargs, shapes, overrides)
    if got == base:
      return out
  except UserError as e:
    first = e
  # A user layer that decides its structure from an integer attribute compared with a
  # width (``if self.expand != x.shape[-1]``: an expand conv; ``x.shape[-1] ==
  # self.out``: the residual) computes another graph at the pruned widths unless that
  # attribute follows the width: set every user layer's int attribute equal to an old
  # size of its own changed leaves to the new size, and accept only the original's graph.
  derived = _derived_attrs(given, variables, x, kwargs, shapes, overrides)

  def attempt(chosen):
    merged = {**chosen, **overrides}
    try:
      out, got = _check_linen_shapes(_linen_wrap(model, shapes, merged), model, small, x,
                                     kwargs, shapes, merged)
      return out if got == base else None
    except UserError:
      return None

  def agree(chosen):  # how far the pruned graph follows the original's (-1: fails)
    try:
      got = _structure(_linen_wrap(model, shapes, {**chosen, **overrides}), small, x,
                       kwargs)
    except Exception:  # pylint: disable=broad-except
      return -1
    return next((i for i, (a, b) in enumerate(zip(got, base)) if a != b),
                min(len(got), len(base)) + (len(got) == len(base)))
  if derived:
    out = attempt(derived)
    if out is None:  # a layer whose attribute must stay (its width met another by chance)
      chosen = dict(derived)
      for mpath in list(derived):  # in call order, by the first divergence
        without = {m: a for m, a in chosen.items() if m != mpath}
        if agree(without) > agree(chosen):
          chosen = without
      out = attempt(chosen)
    if out is not None:
      return out
  if first is not None:
    raise first
  names = "; ".join(f"{m or '<model>'}: {', '.join(f'{k}={v}' for k, v in a.items())}"
                    for m, a in sorted(derived.items())) or "none found"
  raise UserError(
      "rebuild: the smaller network computes another graph than the original's (a layer "
      "adds or drops operations at the pruned widths, e.g. a residual or an expand conv "
      "chosen by comparing an int attribute with a width; int attributes set to the "
      f"pruned sizes: {names}); pass overrides={{module path: {{attribute: value}}}}, or "
      "keep that group whole with ignore=[a leaf-path pattern of its members].")


# Primitives that jax.numpy leaves out when they would not change the array (a reshape
# or broadcast to the same shape, a cast to the same dtype): not part of the structure.
def _structure(model, variables, x, kwargs) -> tuple[str, ...]:
  """The primitives (sub-jaxprs' included) that ``model.apply(variables, *x, **kwargs)``
  runs, in order: shapes aside, a pruned network's graph is its original's."""
  flat, tree = jax.tree.flatten((variables, x, kwargs))
  dyn = [i for i, a in enumerate(flat) if _is_array(a)]

  def run(values):
    full = list(flat)
    for i, v in zip(dyn, values):
      full[i] = v
    v, a, k = jax.tree.unflatten(tree, full)
    return model.apply(v, *a, **k)
  jaxpr = jax.make_jaxpr(run)([jax.ShapeDtypeStruct(np.shape(flat[i]),
                                                   jnp.result_type(flat[i])) for i in dyn])
  return _primitives(jaxpr)


def _primitives(jaxpr) -> tuple[str, ...]:
  return tuple(eqn.primitive.name for eqn, _ in interpret.all_eqns(jaxpr.jaxpr)
               if eqn.primitive.name not in interpret.SHAPE_ONLY)


def _nnx_structure(module, call, x) -> tuple[str, ...]:
  """:func:`_structure` of an NNX module: the primitives ``call(module, x)`` runs on an
  ``.eval()`` copy, traced abstractly (the module's state as the traced input)."""
  module = nnx.clone(module)
  module.eval()
  graphdef, state = nnx.split(module)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))
                          if _is_array(a) else a, (state, x))

  def run(state_, x_):
    return (call or (lambda m, y: m(y)))(nnx.merge(graphdef, state_), x_)
  return _primitives(jax.make_jaxpr(run)(*abstract))


def _first_difference(a, b) -> str:
  i = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
  name = lambda seq: seq[i] if i < len(seq) else "the end"
  return (f"operation {i + 1} is {name(b)} in the smaller network, {name(a)} in the "
          f"original ({len(b)} and {len(a)} operations)")


def _derived_attrs(model, variables, x, kwargs, shapes, overrides):
  """``{module path: {attribute: new size}}``: each user layer's int attributes equal
  to the old size of a changed axis of its own leaves (one new size for it)."""
  seen = {}

  def record(next_fun, args, kw, context):
    seen.setdefault(_module_path(context.module), context.module)
    return next_fun(*args, **kw)
  with nn.intercept_methods(record):
    _eval_shape(lambda v, *a, **k: model.apply(v, *a, **k), (variables, *x), kwargs)
  derived = {}
  for mpath, module in seen.items():  # call order
    if (mpath in overrides or isinstance(module, Rebuilt) or rules.rule_for(module)
        or type(module).__module__.startswith("flax.")):
      continue
    sizes = {}
    for p, o, n in shapes:
      if mpath and not _owner(p).startswith(f"{mpath}/") and _owner(p) != mpath:
        continue
      for a, b in zip(o, n):
        if a != b:
          sizes.setdefault(a, set()).add(b)
    names = [f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name")]
    attrs = {n: next(iter(sizes[v])) for n, v in _int_attrs(module, names).items()
             if len(sizes.get(v, ())) == 1}
    if attrs:
      derived[mpath] = attrs
  return derived


def _check_linen_shapes(wrapped, model, small, x, kwargs, shapes, overrides):
  """Runs ``init`` and ``apply`` abstractly; infers user layers' attributes. Returns
  ``(module, its apply's primitives)`` (:func:`_structure`: the one trace of ``apply``
  is both the check that it runs and the structure the caller compares)."""
  want = {p: np.shape(v) for p, v in _flat(small).items()}

  def mismatches(w, strict=False):
    _FAILED.clear()
    try:
      got = {p: tuple(v.shape) for p, v in _flat(_abstract_init(w, x, kwargs)).items()}
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if strict:
        raise _run_failed(e, shapes) from e
      return {p: (None, s) for p, s in want.items()}
    return {p: (got.get(p), s) for p, s in want.items() if got.get(p) != s}

  bad = mismatches(wrapped, strict=True)
  if bad:
    modules = _linen_modules(wrapped, x, kwargs)
    for mpath in sorted({_owner(p) for p in bad}):
      if mpath in overrides or mpath not in modules:
        continue
      found = _infer_linen_attrs(modules[mpath], mpath, shapes, overrides, wrapped, model,
                                 mismatches)
      if found is not None:
        overrides = {**overrides, mpath: found}
        wrapped = _linen_wrap(model, shapes, overrides)
    bad = mismatches(wrapped, strict=True)
  if bad:
    modules = _linen_modules(wrapped, x, kwargs)

    def sized(module):  # by a rule or its input: not where the sizes went wrong
      return module is not None and (rules.rule_for(module) is not None or isinstance(
          module, _INPUT_SIZED) or type(module).__module__.startswith("flax."))
    path, (got, want_shape) = min(sorted(bad.items()),
                                  key=lambda kv: sized(modules.get(_owner(kv[0]))))
    mpath = _owner(path)
    module = modules.get(mpath)
    kind = type(module).__name__ if module is not None else "layer"
    attrs = (_int_attrs(module, [f.name for f in dataclasses.fields(module)])
             if module is not None else {})
    if sized(module):
      raise UserError(
          f"rebuild: the slices are not consistent: layer {mpath or '<model>'!r} "
          f"({kind}) builds {path} with shape {got} from its inputs, but the slices "
          f"make it {want_shape}; slice every leaf of the group (e.g. the consumer's "
          "input axis).")
    raise UserError(
        f"rebuild: layer {mpath or '<model>'!r} ({kind}) builds {path} with shape {got} "
        f"but the slices make it {want_shape}; its size attributes {attrs} cannot be "
        f"derived: pass overrides={{{mpath!r}: {{attribute: value}}}}, register a rule "
        f"for {kind} (surgery.register_rule), or the slices are not a consistent group.")
  try:
    structure = _structure(wrapped, small, x, kwargs)
  except Exception as e:  # an inconsistent set of slices
    raise UserError(f"rebuild: the smaller network does not run: "
                    f"{type(e).__name__}: {_first_line(e)}") from e
  return wrapped, structure


def _flat(tree):
  return {leaf_path(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _owner(path: str) -> str:
  return "/".join(path.split("/")[1:-1])


def _linen_modules(wrapped, x, kwargs):
  """``{module path: bound module}`` seen during an abstract ``init`` (a failing one
  too: the modules seen before it failed)."""
  seen = {}

  def record(next_fun, args, kw, context):
    if not isinstance(context.module, Rebuilt):
      seen.setdefault(_module_path(context.module), context.module)
    return next_fun(*args, **kw)
  with nn.intercept_methods(record):
    try:
      _abstract_init(wrapped, x, kwargs)
    except Exception:  # pylint: disable=broad-except
      pass
  return seen


def _infer_linen_attrs(module, mpath, shapes, overrides, wrapped, model, mismatches,
                       limit=64):
  """The fewest integer-attribute changes of a user layer that fit its new shapes."""
  changed = [(o, n) for p, o, n in shapes if _owner(p) == mpath]
  size_map = {}
  for o, n in changed:
    for a, b in zip(o, n):
      if a != b:
        size_map.setdefault(a, set()).add(b)
  if not size_map:
    return None
  fields = [f.name for f in dataclasses.fields(module)
            if f.name not in ("parent", "name")]
  candidates = {n: v for n, v in _int_attrs(module, fields).items() if v in size_map}
  options = [[(n, None)] + [(n, b) for b in sorted(size_map[v])]
             for n, v in sorted(candidates.items())]
  combos = sorted(itertools.product(*options),
                  key=lambda c: sum(b is not None for _, b in c))[:limit]
  for combo in combos:
    attrs = {n: b for n, b in combo if b is not None}
    if not attrs:
      continue
    trial = _linen_wrap(model, shapes, {**overrides, mpath: attrs})
    if not any(_owner(p) == mpath for p in mismatches(trial)):
      return attrs
  return None


# ---------------------------------------------------------------------------------
# NNX.


def _nnx_path(path) -> str:
  return "/".join(str(p) for p in path)


def _nnx_shape(module, mpath, shapes):
  """``shape(name, old=False)`` of an NNX layer's own Variables (a rule's argument)."""
  def shape(name, old=False):
    obj = module
    for part in name.split("/"):
      obj = getattr(obj, part, None)
    if not isinstance(obj, nnx.Variable):
      return None
    path = f"{mpath}/{name}" if mpath else name
    return shapes[path][0] if old and path in shapes else tuple(obj[...].shape)
  return shape


def _nnx_value(old, value):
  """A rule's value as the attribute holds it: ints (a tuple where the attribute is)."""
  if isinstance(value, tuple) and all(isinstance(v, (int, np.integer)) for v in value):
    return tuple(int(v) for v in value)
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return (int(value),) if isinstance(old, tuple) else int(value)
  return value


def _rebuild_nnx(model, slices, input_shape, call, overrides):
  new = nnx.clone(model)
  nodes = list(nnx.iter_graph(new))
  variables = {_nnx_path(p): n for p, n in nodes if isinstance(n, nnx.Variable)}
  modules = {_nnx_path(p): n for p, n in nodes if isinstance(n, nnx.Module)}
  _check_paths(slices, list(variables))
  shapes = {}
  for path, spec in slices.items():
    var = variables[path]
    old = var.get_value()
    small = _slice_leaf(path, old, spec)
    if small.shape != np.shape(old):
      shapes[path] = (tuple(np.shape(old)), tuple(small.shape))
    dtype = getattr(old, "dtype", None)
    var.set_value(_to_device(small) if spec and dtype in (None, small.dtype)
                  else jnp.asarray(small, dtype=dtype))  # a new array, or a copy
  stale = {}
  for mpath, module in modules.items():
    touched = any(p.startswith(f"{mpath}/") or not mpath for p in shapes)
    if not touched:
      continue
    rule = rules.rule_for(module)
    if rule is not None:
      for name, value in rule(module, _nnx_shape(module, mpath, shapes), ()).items():
        setattr(module, name, _nnx_value(getattr(module, name, None), value))
    else:
      names = _stale_attrs(module, mpath, shapes)
      if names and mpath not in overrides:
        stale[mpath] = names
  for mpath, attrs in overrides.items():
    if mpath not in modules:
      raise UserError(f"rebuild: overrides names no module {mpath!r}; modules: "
                      f"{', '.join(repr(m) for m in modules)}")
    for name, value in attrs.items():
      setattr(modules[mpath], name, value)
  if input_shape is not None:
    derived = _check_nnx(model, new, modules, call, _example(input_shape), shapes, overrides)
    stale = {m: tuple(n for n in names if n not in derived.get(m, {}))
             for m, names in stale.items()}
    stale = {m: names for m, names in stale.items() if names}
  if stale:
    warnings.warn("rebuild: these modules' integer attributes equal a removed size and "
                  "were left unchanged (pass overrides= if the forward pass uses them): "
                  + "; ".join(f"{m or '<model>'}: {', '.join(a)}"
                              for m, a in stale.items()),
                  stacklevel=3)
  return Pruned(model=new, variables=None, shapes=shapes, stale=stale)


def _check_nnx(model, new, modules, call, x, shapes, overrides) -> dict:
  """Runs ``new`` (an ``.eval()`` copy) and checks it runs the original's primitives
  (:func:`_nnx_structure`). Where it fails or differs, user modules' int attributes equal
  to a removed size follow the new size (all together, else one at a time), as Linen's
  are derived, and only the original's graph is accepted; else one line. Returns the
  derived ``{module path: {attribute: value}}``. A model whose forward cannot be traced
  (Python control flow on values) is only run, as before the check existed."""
  try:
    base = _nnx_structure(model, call, x)
  except Exception:  # pylint: disable=broad-except
    base = None

  def problem():
    if base is not None:
      try:  # the abstract trace runs the network too: the eager run only to name a failure
        got = _nnx_structure(new, call, x)
        return None if got == base else (got, None)
      except Exception:  # pylint: disable=broad-except
        pass
    check = nnx.clone(new)
    check.eval()
    try:
      (call or (lambda m, y: m(y)))(check, x)
    except Exception as e:  # pylint: disable=broad-except
      return e, check
    return None if base is None else ((), None)

  first = problem()
  if first is None:
    return {}
  derived = {m: a for m, a in _derivable_attrs(modules, shapes).items() if m not in overrides}
  trials = [derived] if derived else []
  if sum(len(a) for a in derived.values()) > 1:
    trials += [{m: {n: v}} for m, a in derived.items() for n, v in a.items()]
  for chosen in trials:
    old = {(m, n): getattr(modules[m], n) for m, a in chosen.items() for n in a}
    for (m, n), _ in old.items():
      setattr(modules[m], n, chosen[m][n])
    if problem() is None:
      return chosen
    for (m, n), v in old.items():
      setattr(modules[m], n, v)
  what, check = first
  if check is not None:
    raise _nnx_run_failed(what, check, shapes, overrides) from what
  kept = "; ".join(f"{m or '<model>'}: {', '.join(f'{n}={v}' for n, v in a.items())}"
                   for m, a in _removed_size_attrs(modules, shapes).items())
  raise UserError(
      "rebuild: the smaller network computes another graph than the original's ("
      f"{_first_difference(base, what)}: a layer adds or drops operations at the pruned "
      "widths, e.g. a residual or an expand conv chosen by comparing an int attribute "
      f"with a width; int attributes at a removed size: {kept or 'none found'}, setting "
      "them to the new sizes did not restore it); pass overrides={module path: "
      "{attribute: value}}, or keep that group whole with ignore=[a leaf-path pattern of "
      "its members].")


def _derivable_attrs(modules, shapes) -> dict:
  """``{module path: {attribute: new size}}``: :func:`_removed_size_attrs` whose old size
  became one new size under that module."""
  out = {}
  for mpath, attrs in _removed_size_attrs(modules, shapes).items():
    new = {}
    for p, (o, n) in shapes.items():
      if not mpath or p.startswith(f"{mpath}/"):
        for a, b in zip(o, n):
          if a != b:
            new.setdefault(a, set()).add(b)
    chosen = {k: next(iter(new[v])) for k, v in attrs.items() if len(new[v]) == 1}
    if chosen:
      out[mpath] = chosen
  return out


def _removed_size_attrs(modules, shapes) -> dict:
  """``{module path: {attribute: value}}``: the int attributes of user modules equal to
  an old size of a changed axis of a Variable under them (what may steer a layer's
  structure by comparing itself with a width)."""
  out = {}
  for mpath, module in modules.items():
    if type(module).__module__.startswith("flax."):
      continue
    sizes = {a for p, (o, n) in shapes.items() if not mpath or p.startswith(f"{mpath}/")
             for a, b in zip(o, n) if a != b}
    attrs = {n: v for n, v in _int_attrs(module, sorted(vars(module))).items()
             if v in sizes and not n.startswith("_")}
    if attrs:
      out[mpath] = attrs
  return out


def _nnx_run_failed(e, check, shapes, overrides) -> UserError:
  """One line for a pruned NNX module that fails to run, naming the innermost module
  whose ``__call__`` was running (read from the traceback) and its int attributes."""
  paths = {id(n): _nnx_path(p) for p, n in nnx.iter_graph(check) if isinstance(n, nnx.Module)}
  mpath, module, tb = None, None, e.__traceback__
  while tb is not None:
    me = tb.tb_frame.f_locals.get("self")
    if me is not None and id(me) in paths:
      mpath, module = paths[id(me)], me
    tb = tb.tb_next
  if module is None:
    return UserError(f"rebuild: the smaller network does not run: "
                     f"{type(e).__name__}: {_first_line(e)}")
  attrs = {n: v for n, v in _int_attrs(module, sorted(vars(module))).items()
           if not n.startswith("_")}
  sizes = sorted({a for o, n in shapes.values() for a, b in zip(o, n) if a != b})
  kept = (f" -- its int attributes {', '.join(f'{n}={v}' for n, v in attrs.items())} "
          f"were kept{' (as overridden)' if mpath in overrides else ''}; pass "
          f"overrides={{{mpath!r}: {{attribute: <value at the pruned widths>}}}}"
          if attrs else f" -- it computes a size (one of {sizes} before pruning) from its "
          "configuration or a constant")
  out = UserError(f"rebuild: layer {mpath or '<model>'!r} ({type(module).__name__}) fails "
                  f"at the pruned widths: {type(e).__name__}: {_first_line(e)}{kept}, "
                  f"register a rule for {type(module).__name__} (surgery.register_rule), or "
                  "keep that group whole with ignore=[a leaf-path pattern of its members].")
  out.module_path, out.int_attrs = mpath, attrs
  return out


def _rebuild_from_nnx(model, variables, slices, input_shape, overrides):
  """An NNX model run through :class:`jaxprune.graph.adapters.FromNNX`: rebuild the NNX
  module (its paths are the Linen ones without the collection) and wrap it again."""
  if variables is None:
    raise UserError("rebuild: a FromNNX model needs its Linen variables.")
  collection_of, inner = {}, {}
  for path, spec in slices.items():
    collection, _, rest = path.partition("/")
    collection_of[rest], inner[rest] = collection, spec
  pruned = _rebuild_nnx(model.module(variables), inner, None, None, overrides)
  wrapper, small = adapters.from_nnx(pruned.model,
                                     adapters.sliced_draw(model.split.draw, inner),
                                     model.call)
  if input_shape is not None:
    x = _example(input_shape)
    try:
      jax.eval_shape(lambda v: wrapper.apply(v, x, train=False), small)
    except Exception as e:
      raise UserError(f"rebuild: the smaller network does not run: "
                      f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    base = _structure(model, variables, (x,), {"train": False})
    got = _structure(wrapper, small, (x,), {"train": False})
    if got != base:
      raise UserError(
          "rebuild: the smaller network computes another graph than the original's ("
          f"{_first_difference(base, got)}: a layer adds or drops operations at the "
          "pruned widths); pass overrides={module path: {attribute: value}}, or keep "
          "that group whole with ignore=[a leaf-path pattern of its members].")
  shapes = {f"{collection_of[p]}/{p}": s for p, s in pruned.shapes.items()}
  return Pruned(model=wrapper, variables=small, shapes=shapes, stale=pruned.stale)


def _stale_attrs(module, mpath, shapes):
  """Integer attributes of a user module equal to an old size of its changed leaves."""
  own = [(o, n) for p, (o, n) in shapes.items() if p.rsplit("/", 1)[0] == mpath
         or (not mpath and "/" not in p)]
  sizes = {a for o, n in own for a, b in zip(o, n) if a != b}
  return tuple(n for n, v in _int_attrs(module, sorted(vars(module))).items()
               if v in sizes and not n.startswith("_"))


# ---------------------------------------------------------------------------------
# Compensation: scales computed from a narrowed width, folded back.


def compensate(graph, keep: Mapping[Any, Any], pruned: Pruned, input_shape: Any,
               call: Callable | None = None) -> Pruned:
  """Undoes the width-derived scales of the narrowed "compensated" groups in `pruned`.

  Each such group's :class:`jaxprune.graph.propagate.Fold` names a contraction (the
  attention scores ``q.k``) with a literal scale ``s(n0) = n0**p`` of its contracted
  width, and the query projection's kernel and bias. The masked original computes
  ``s(n0) q.k`` over the kept channels; the pruned network computes ``s(n1) q.k``, with
  ``s(n1)`` read from its own trace at the same contraction (a scale the module takes
  from its configuration stays ``s(n0)``: then nothing is folded). The projection is
  multiplied by ``s(n0) / s(n1)``, so the pruned network equals the masked original.

  Args:
    graph: the original's :func:`jaxprune.graph.trace`.
    keep: ``{group id: kept channels}`` that made `pruned`.
    pruned: :func:`rebuild`'s result (changed in place and returned).
    input_shape, call: as for :func:`rebuild`.
  """
  folds = {}
  for key, kept in keep.items():
    group = graph.groups[getattr(key, "id", key)]
    if group.exactness == "compensated" and np.unique(np.asarray(kept)).size < group.width:
      folds.update({f.op: f for f in group.effects if isinstance(f, propagate.Fold)})
  if not folds:
    return pruned
  from jaxprune.graph.group import walk  # pylint: disable=g-import-not-at-top
  traced = tracing.trace_jaxpr(pruned.model, pruned.variables, input_shape,
                               pruned_call(pruned.model, call))
  scale_at = walk(traced)[0].scale_at
  factors = {}
  for op, fold in sorted(folds.items()):
    if op not in scale_at:
      raise UserError(f"compensate: the pruned network has no scale at the contraction "
                      f"of '{fold}'; prune with exact_only=True or keep that group whole")
    c = fold.scale / scale_at[op]
    for leaf in fold.leaves:
      factors[leaf] = factors.get(leaf, 1.0) * c
  factors = {p: c for p, c in factors.items() if c != 1.0}
  scale_leaves(pruned, factors)
  pruned.folded = {**pruned.folded, **factors}
  return pruned


def scale_leaves(pruned: Pruned, factors: Mapping[str, float]) -> None:
  """Multiplies the leaves named in `factors` (traced leaf paths) in place."""
  if not factors:
    return

  def put(path, leaf):
    name = tracing.leaf_name(path)
    if name not in factors:
      return leaf
    return jnp.asarray(np.asarray(leaf, np.float64) * factors[name], jnp.result_type(leaf))
  if pruned.variables is None:  # NNX: the new module's Variables
    for p, var in nnx.iter_graph(pruned.model):
      if isinstance(var, nnx.Variable) and _nnx_path(p) in factors:
        old = var.get_value()
        var.set_value(jnp.asarray(np.asarray(old, np.float64) * factors[_nnx_path(p)],
                                  jnp.result_type(old)))
    return
  pruned.variables = jax.tree_util.tree_map_with_path(put, pruned.variables)


def pruned_call(model: Any, call: Callable | None) -> Callable | None:
  """The user's ``call`` for the pruned Linen `model` (a :class:`Rebuilt`): ``call``
  applies the original module, so its root ``__call__`` is run under the rebuilt
  widths (the interceptor :class:`Rebuilt` uses), with the arguments ``call`` gives it
  (token ids, masks, flags). NNX modules and functions take ``call`` as it is."""
  if call is None or not isinstance(model, Rebuilt):
    return call
  inner = model._interceptor()  # pylint: disable=protected-access

  def run(variables, x):
    entered = []

    def root(next_fun, args, kwargs, context):
      if not entered and not context.module.path and context.method_name == "__call__":
        entered.append(True)
        with nn.intercept_methods(inner):
          return inner(next_fun, args, kwargs, context)
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(root):
      return call(variables, x)
  return run


def forward(model: Any, variables: Any, call: Callable | None, x: Any):
  """Runs any model kind in eval mode on ``x`` (an original or a :class:`Pruned` one;
  a pruned Linen module under the user's ``call`` by :func:`pruned_call`)."""
  kind = tracing.model_kind(model, variables)
  if kind == "nnx":
    copy = tracing.eval_copy(model)
    return call(copy, x) if call is not None else copy(x)
  if kind == "linen":
    if call is not None:  # a pruned (Rebuilt) module runs under the user's call too
      return pruned_call(model, call)(variables, x)
    kwargs = {"train": False} if tracing.accepts_train(model) else {}
    return model.apply(variables, x, **kwargs)
  return call(model, variables, x) if call is not None else model(variables, x)
