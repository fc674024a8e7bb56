"""The norm scales ISTA may sparsify, read from the channel graph: which (``ista_scales``),
their penalties (``ista_rho``) and the gamma-W rescaling (``rescale_gamma``)."""
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import flops
from jaxprune import graph as graph_lib
from jaxprune.errors import UserError
from jaxprune.graph import tracing


# ---------------------------------------------------------------------------------
# Reading the graph.


def param_path(g, path: str) -> str:
  """A leaf path without the Linen collection (``params/``): ``optim``'s key."""
  return path.split("/", 1)[1] if g.traced.kind == "linen" else path


def _owner(path: str) -> str:
  return path.rsplit("/", 1)[0]


def group_label(g, group) -> str:
  """A group's name: the module path of its first producer, e.g. ``stage0_block0/conv_a``."""
  return _owner(param_path(g, group.producers[0]))


def norm_scales(g, group) -> list:
  """The group's 1-D norm scale parameters (``.../scale``)."""
  info = dict(zip(g.traced.paths, zip(g.traced.shapes, g.traced.is_param)))
  return [m for m in group.members
          if m.role == "other" and info[m.path][1] and m.path.endswith("/scale")
          and len(info[m.path][0]) == 1]


def concrete(values) -> bool:
  return not any(isinstance(v, jax.ShapeDtypeStruct) for v in values.values())


def ista_groups(g, values):
  """(group, scales) that ISTA may sparsify: prunable, one producer, a norm scale,
  not zero everywhere already (zero-initialised residual gammas; not tested
  when `values` is None)."""
  known = values is not None and concrete(values)
  for group in g.prunable():
    if len(group.producers) != 1:
      continue
    scales = norm_scales(g, group)
    if not scales:
      continue
    if known and not any(np.any(np.asarray(values[m.path]) != 0) for m in scales):
      continue
    yield group, scales


def ista_scales(model, variables, input_shape: Sequence[int], call=None) -> list[str]:
  """Norm scales ISTA may sparsify in any model, by the dependency graph.

  The rule: a norm scale (a 1-D ``.../scale`` parameter of a channel group) is
  selected when its group is prunable and has exactly one producer, i.e. the
  normalised channels are not tied to another layer's by a residual add or a
  shared consumer (a zero gamma there would not make a channel removable), and
  when it is not zero everywhere already (zero-initialised residual gammas;
  abstract variables skip that test).

  Returns:
    Param-tree paths (no collection), e.g. ``stage0_block0/bn_a/scale``, for
    ``optim.ista(..., mask=...)`` or ``rho``.

  Example:
    >>> mask = surgery.ista_scales(model, variables, (32, 32, 3))
  """
  g = graph_lib.trace(model, variables, input_shape, call)
  values = graph_lib.named_leaves(model, variables)
  return sorted(param_path(g, m.path) for _, scales in ista_groups(g, values)
                for m in scales)


def ista_rho(model, variables, input_shape: Sequence[int],
             call: Callable | None = None) -> dict[str, float]:
  """Per-layer ISTA penalties rho_l from the network's structure (memory priority, docs/methods/ista.md §2).

  ``rho_l = (H_out * W_out + k_h * k_w * C_in + sum_{l' reads l} k'_h * k'_w * C_out(l'))
  / (H_img * W_img)``, for every scale :func:`ista_scales` selects, with the
  geometry of the traced layers. A dense consumer reading a flattened conv output
  counts its spatial positions as its kernel taps (each channel meets
  ``positions * C_out`` weights).

  Args:
    model, variables, input_shape, call: as for :func:`jaxprune.graph.trace`
      (variables may be abstract).

  Returns:
    ``{scale path: rho_l}``, ready for ``optim.ista(..., rho=...)``. For the CIFAR
    ResNet-20 the values are 1.28125 (stage 1), 0.671875 / 0.8125 (stage 2 first /
    other blocks) and 0.90625 / 1.1875 (stage 3).
  """
  g = graph_lib.trace(model, variables, input_shape, call)
  values = graph_lib.named_leaves(model, variables)
  shapes = dict(zip(g.traced.paths, g.traced.shapes))
  out_shape = {r["kernel"]: r["out_shape"]
               for r in flops.count_layers(model, variables, input_shape, call)}
  area = math.prod(g.traced.input_shape[1:-1]) or 1
  rho = {}
  for group, scales in ista_groups(g, values):
    producer = next(m for m in group.members if m.role == "producer")
    kernel = shapes[producer.path]
    total = math.prod(out_shape[producer.path][1:-1]) + math.prod(kernel) // kernel[producer.axis]
    for m in group.members:
      if m.role == "consumer":
        s = shapes[m.path]
        total += m.index.shape[1] * math.prod(s) // s[m.axis]
    for m in scales:
      rho[param_path(g, m.path)] = total / area
  return rho


# ---------------------------------------------------------------------------------
# Writing values back.


def with_values(model, variables, new: Mapping[str, np.ndarray]):
  """(model, variables) holding ``new[path]`` in place of those leaves."""
  if not new:
    return model, variables

  def put(path, leaf):
    name = tracing.leaf_name(path)
    return jnp.asarray(new[name], jnp.result_type(leaf)) if name in new else leaf
  if isinstance(model, nnx.Module):
    copy = nnx.clone(model)
    nnx.update(copy, jax.tree_util.tree_map_with_path(put, nnx.state(copy)))
    return copy, None
  return model, jax.tree_util.tree_map_with_path(put, variables)


def channel_rows(arr: np.ndarray, m) -> np.ndarray:
  """A view of ``arr`` with the member's axis first."""
  return np.moveaxis(arr, m.axis, 0)


def rescale_gamma(model, variables, alpha: float | Mapping[str, float],
                  input_shape: Sequence[int], call: Callable | None = None):
  """The gamma-W rescaling trick (docs/methods/ista.md §3): gamma, beta * alpha, consumer weights / alpha.

  With a ReLU (and max pooling) between a selected norm (:func:`ista_scales`)
  and its consumers, ``relu(alpha * x) = alpha * relu(x)`` for alpha > 0, so the
  network function is unchanged. alpha < 1 speeds up the sparsification of a
  pre-trained network; :func:`rescale_gamma` with ``1 / alpha`` undoes it after
  pruning.

  Args:
    model, variables, input_shape, call: as for :func:`jaxprune.graph.trace`.
    alpha: one positive factor, or ``{scale path: factor}`` (missing: 1).

  Returns:
    New variables (same tree) for a Linen model or a function's params; a new
    ``nnx.Module`` for NNX.
  """
  g = graph_lib.trace(model, variables, input_shape, call)
  values = graph_lib.named_leaves(model, variables)
  new = {}

  def arr(path):
    if path not in new:
      new[path] = np.array(values[path], np.float64)
    return new[path]
  for group, scales in ista_groups(g, values):
    key = param_path(g, scales[0].path)
    a = alpha.get(key, 1.0) if isinstance(alpha, Mapping) else alpha
    if not a > 0:
      raise UserError(f"rescale_gamma needs alpha > 0 (ReLU is only positively "
                      f"homogeneous); got {a} for {key}.")
    norms = {_owner(m.path) for m in scales}
    for m in group.members:
      rows = m.index.ravel()
      if _owner(m.path) in norms and m.path.rsplit("/", 1)[1] in ("scale", "bias"):
        channel_rows(arr(m.path), m)[rows] *= a
      elif m.role == "consumer":
        channel_rows(arr(m.path), m)[rows] /= a
  small, small_vars = with_values(model, variables, new)
  return small if isinstance(model, nnx.Module) else small_vars
