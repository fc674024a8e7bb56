"""The masked original of a pruning, for tests: the model with every parameter slice of
the removed channels of each narrowed group zero (Linen variables or an NNX module)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import graph


def masked(model, variables, g, keep):
  """``(model, variables)``: a copy (NNX: ``nnx.clone``) with the removed channels'
  parameter slices of every group in ``keep`` (``{group id: kept channels}``) zero."""
  if variables is None:
    model = nnx.clone(model)
    state = nnx.state(model, nnx.Param)
    flat = [(graph.tracing.leaf_name(p), v)
            for p, v in jax.tree_util.tree_flatten_with_path(state)[0]]
    values = {p: np.array(v) for p, v in flat}
  else:
    values = {graph.tracing.leaf_name(p): np.array(v)
              for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  for gid, kept in keep.items():
    grp = g.groups[gid]
    removed = np.setdiff1d(np.arange(grp.width), kept)
    for m in grp.members:
      if m.path not in values:  # not a parameter (e.g. a constant)
        continue
      index = [slice(None)] * values[m.path].ndim
      index[m.axis] = np.asarray(m.index)[removed].ravel()
      values[m.path][tuple(index)] = 0
  if variables is None:
    leaves = [jnp.asarray(values[p]) for p, _ in flat]
    nnx.update(model, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), leaves))
    return model, None
  paths, treedef = jax.tree_util.tree_flatten_with_path(variables)
  return model, jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(values[graph.tracing.leaf_name(p)]) for p, _ in paths])
