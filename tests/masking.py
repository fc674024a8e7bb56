"""The masked original of a pruning, for tests: the model with every slice of the removed
channels of each narrowed group zero, in every leaf the group has (parameters and
running statistics: a removed BatchNorm channel without a scale outputs ``-mean /
sqrt(var + eps)`` unless its mean is zero too), Linen variables or an NNX module."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.graph.tracing import leaf_name


def masked(model, variables, g, keep):
  """``(model, variables)``: a copy (NNX: ``nnx.clone``, variables None) with the removed
  channels' slices of every member of each group in ``keep`` (``{group id of g: kept
  channels}``) zero; leaves outside the groups are untouched."""
  zero = {}
  for gid, kept in keep.items():
    grp = g.groups[gid]
    removed = np.setdiff1d(np.arange(grp.width), kept)
    for m in grp.members:
      zero.setdefault(m.path, []).append((m.axis, np.asarray(m.index)[removed].ravel()))

  def fix(path, leaf):
    spans = zero.get(leaf_name(path))
    if not spans:
      return leaf
    leaf = np.array(leaf)
    for axis, idx in spans:
      index = [slice(None)] * leaf.ndim
      index[axis] = idx
      leaf[tuple(index)] = 0
    return jnp.asarray(leaf)
  if variables is not None:
    return model, jax.tree_util.tree_map_with_path(fix, variables)
  copy = nnx.clone(model)
  nnx.update(copy, jax.tree_util.tree_map_with_path(fix, nnx.state(copy)))
  return copy, None
