"""Channel importance of a group: ``group_scores`` by a criterion of ``CRITERIA`` (l1, l2,
bn_scale, taylor, random) over all of a group's slices; see docs/design/surgery.md."""
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxprune.errors import UserError
from jaxprune.graph import Graph, Group
from jaxprune.graph.tracing import leaf_name
from jaxprune.surgery.rebuild import parallel_map

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random")


def _rows(array, axis) -> np.ndarray:
  a = np.moveaxis(np.asarray(array, np.float64), axis, 0)
  return a.reshape(a.shape[0], -1)


CHUNK = 1 << 17  # elements of a leaf turned into float64 at a time (1 MiB: stays in cache)


def _reduce_axes(leaf, axes, criterion: str, grad=None) -> dict[int, np.ndarray]:
  """``{axis: per-index sum over every other axis}`` of ``|w|`` (l1), ``w**2`` (l2) or
  ``w * dL/dw`` (taylor), all `axes` in one read of the leaf.

  The leaf is read in chunks of its first axis, each made float64 in a small buffer
  (|w|, w**2 and w * g of float32 values are exact there) and reduced along every
  requested axis; the per-chunk partial sums are added in float64. Rows of the first
  axis are summed whole (numpy's pairwise sum, as ``_rows(a, 0).sum(1)``); the other
  axes differ from a sum over the whole leaf at once by float64 rounding (about 1e-16
  relative), so the ranking is the same. No copy of the leaf is made (a 4 GB model's
  scores read 4 GB, not 12).
  """
  a = np.asarray(leaf)
  g = None if grad is None else np.asarray(grad)
  n = a.shape[0]
  rest = a.size // n if n else 0
  step = max(1, CHUNK // max(rest, 1))
  out = {axis: np.zeros(a.shape[axis]) for axis in axes}
  buf = np.empty((min(step, n),) + a.shape[1:], np.float64)
  for s in range(0, n, step):
    e = min(n, s + step)
    b = buf[:e - s]
    np.copyto(b, a[s:e], casting="unsafe")
    if criterion == "l1":
      np.abs(b, out=b)
    elif criterion == "l2":
      np.square(b, out=b)
    else:
      b *= np.asarray(g[s:e], np.float64)
    for axis in axes:
      if axis == 0:
        out[0][s:e] = b.reshape(e - s, -1).sum(1)
      else:
        out[axis] += b.sum(axis=tuple(i for i in range(b.ndim) if i != axis))
  return out


def _threefry2x32(k1, k2, x0, x1):
  """Threefry-2x32, 20 rounds (Salmon et al., 2011), on uint32 arrays: the block
  cipher behind JAX's default generator."""
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in rotations[i % 2]:
      x0 = x0 + x1
      x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _random_scores(key, groups) -> dict[int, np.ndarray]:
  """``jax.random.uniform(jax.random.fold_in(key, group id), (width,))`` per group.

  Under JAX's default generator (threefry, partitionable) the draws are computed here
  in numpy, all groups at once and with nothing to compile: ``fold_in`` is the cipher
  of ``(0, id)`` under the key, and position ``i`` of a draw is the xor of the cipher
  of ``(0, i)`` under that key, its top 23 bits the mantissa of a float in [1, 2),
  minus 1. (A test compares them with JAX's.) Any other generator: JAX, group by group.
  """
  if not groups:
    return {}
  if not (jax.config.jax_threefry_partitionable
          and str(jax.random.key_impl(key)) == "threefry2x32"):
    return {g.id: np.asarray(jax.random.uniform(jax.random.fold_in(key, g.id), (g.width,)))
            for g in groups}
  data = key if key.dtype == np.uint32 else jax.random.key_data(key)
  k1, k2 = (np.uint32(v) for v in np.asarray(data).ravel())
  ids = np.asarray([g.id for g in groups], np.uint32)
  f1, f2 = _threefry2x32(np.full(ids.size, k1), np.full(ids.size, k2),
                         np.zeros(ids.size, np.uint32), ids)
  widths = np.asarray([g.width for g in groups], np.int64)
  row = np.repeat(np.arange(ids.size), widths)
  position = (np.arange(row.size) - np.repeat(np.cumsum(widths) - widths, widths))
  b1, b2 = _threefry2x32(f1[row], f2[row], np.zeros(row.size, np.uint32),
                         position.astype(np.uint32))
  floats = ((b1 ^ b2) >> np.uint32(9) | np.uint32(0x3F800000)).view(np.float32) \
      - np.float32(1.0)
  return {g.id: part for g, part in zip(groups, np.split(floats, np.cumsum(widths)[:-1]))}


def _named(tree) -> dict[str, Any]:
  if tree is None:
    return {}
  if isinstance(tree, Mapping) and tree and all(isinstance(v, np.ndarray) or hasattr(v, "shape")
                                                for v in tree.values()):
    return dict(tree)
  return {leaf_name(p): l for p, l in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _lookup(named: dict, path: str):
  """A gradient by leaf path; Linen gradients of ``params`` lack the collection prefix."""
  if path in named:
    return named[path]
  short = path.split("/", 1)[1] if "/" in path else path
  return named.get(short)


def group_scores(graph: Graph, values: Mapping[str, Any], criterion: str = "l1", *,
                 grads: Any = None, key: jax.Array | None = None,
                 groups: list[Group] | None = None) -> dict[int, np.ndarray]:
  """Per-channel importance of every prunable group.

  Args:
    graph: from :func:`jaxprune.graph.trace`.
    values: ``{leaf path: array}`` (:func:`jaxprune.graph.named_leaves`).
    criterion: one of :data:`CRITERIA`.
    grads: for ``"taylor"``: gradients of a loss, as a pytree (Linen
      ``grads`` of ``params``, an NNX ``nnx.State`` of ``nnx.Param``) or a
      ``{leaf path: array}`` dict.
    key: for ``"random"``.
    groups: the groups to score (default every prunable one).

  Returns:
    ``{group id: float array (width,)}``; larger means more important.
  """
  if criterion not in CRITERIA:
    raise UserError(f"unknown importance criterion {criterion!r}; choose one of {CRITERIA}")
  if criterion == "taylor" and grads is None:
    raise UserError("the taylor criterion needs `grads`: the gradients of a loss on a batch")
  if criterion == "random" and key is None:
    raise UserError("the random criterion needs a `key`")
  groups = graph.prunable() if groups is None else groups
  is_param = dict(zip(graph.traced.paths, graph.traced.is_param))
  named_grads = _named(grads)
  if criterion == "random":
    return _random_scores(key, groups)
  # Each leaf read once, in chunks: |w| (l1), w^2 (l2) or w * dL/dw (taylor) in float64,
  # summed per index of every axis a group needs (the row-by-row sums, to rounding).
  needed: dict[str, list[int]] = {}
  for g in groups:
    for m in g.members:
      if is_param[m.path] and m.axis not in needed.setdefault(m.path, []):
        needed[m.path].append(m.axis)
  reduced = {}  # (leaf, axis) -> per-index reduction
  if criterion in ("l1", "l2", "taylor"):
    grads_of = {}
    if criterion == "taylor":
      for path in needed:
        grads_of[path] = _lookup(named_grads, path)
        if grads_of[path] is None:
          raise UserError(f"no gradient for {path} in `grads`")
    sums = parallel_map(
        lambda item: _reduce_axes(values[item[0]], item[1], criterion, grads_of.get(item[0])),
        needed.items(), sum(getattr(values[p], "nbytes", 0) for p in needed))
    for (path, _), per_axis in zip(needed.items(), sums):
      for axis, s in per_axis.items():
        reduced[(path, axis)] = s

  out = {}
  for g in groups:
    params = [m for m in g.members if is_param[m.path]]
    if criterion == "bn_scale":
      scales = [m for m in params if m.path.endswith("scale") and np.ndim(values[m.path]) == 1]
      if not scales:
        raise UserError(f"group {g.id} ({', '.join(g.producers)}) has no normalisation scale "
                        "for the bn_scale criterion; use l1, l2 or taylor")
      out[g.id] = sum(np.abs(_rows(values[m.path], m.axis)[m.index, 0]).sum(1) for m in scales)
      continue
    score = np.zeros(g.width)
    for m in params:
      if criterion == "taylor":
        score += np.abs(reduced[(m.path, m.axis)][m.index].sum(1))
      else:
        score += reduced[(m.path, m.axis)][m.index].sum(1)
    out[g.id] = np.sqrt(score) if criterion == "l2" else score
  return out
