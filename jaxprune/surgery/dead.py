"""ISTA's surgery on any model, on the channel dependency graph (reference ista.md §2-§4).

After ISTA a channel whose norm scale (gamma) is exactly 0 outputs a constant
(``beta_c`` after the norm, ``relu(beta_c)`` after a ReLU). :func:`shrink` removes
such channels from any Linen, NNX or pure-function model: it traces the graph
(:func:`jaxprune.graph.trace`), *measures* the constant each consumer layer reads
(the jaxpr is evaluated on a probe, :mod:`jaxprune.graph.evaluate`, so whatever
sits between the norm and the consumer — ReLU, pooling, a user's ``jnp`` code — is
accounted for), folds ``sum W[..., c, ..., :] * v_c`` into that layer's bias or the
running mean of the norm after it, removes the channels that became dead (a
filter with no fan-in left outputs a constant too; a channel no surviving filter
reads is useless), and repeats to a fixpoint. The smaller network is built by the
one mechanism, :func:`jaxprune.surgery.prune`.

The fold is exact on interior pixels only: zero padding of the consumer conv pads
with 0 where the removed channel held ``v_c``, so border pixels deviate (the
original code ignores this). :func:`check_equivalence` measures both.

Which scales ISTA may sparsify (:func:`ista_scales`) is read from the same graph:
a norm scale whose group is prunable and has exactly one producer. In a ResNet
the channels on the residual stream are tied across every block of a stage by the
additions, so (as the original does) only the norms *inside* a residual block
qualify: ``bn_a`` of a basic block, ``bn_a`` and ``bn_b`` of a bottleneck; in a
plain conv stack every conv's BN does.

A group whose channels all go keeps one *placeholder* channel, read with zero
weights: a layer of width 0 is not a module, and the placeholder computes exactly
what the empty layer would.

The per-layer ISTA penalties (:func:`ista_rho`, §2) and the gamma-W rescaling
trick (:func:`rescale_gamma`, §3) read the same graph.
"""
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import flops
from jaxprune import graph as graph_lib
from jaxprune.errors import UserError
from jaxprune.graph import evaluate, tracing
from jaxprune.surgery.prune import _forward, apply_slices
from jaxprune.surgery.rebuild import compensate, probe_inputs, pruned_call


# ---------------------------------------------------------------------------------
# Reading the graph.


def _param_path(g, path: str) -> str:
  """A leaf path without the Linen collection (``params/``): ``optim``'s key."""
  return path.split("/", 1)[1] if g.traced.kind == "linen" else path


def _owner(path: str) -> str:
  return path.rsplit("/", 1)[0]


def _label(g, group) -> str:
  """A group's name: the module path of its first producer, e.g. ``stage0_block0/conv_a``."""
  return _owner(_param_path(g, group.producers[0]))


def _scales(g, group) -> list:
  """The group's 1-D norm scale parameters (``.../scale``)."""
  info = dict(zip(g.traced.paths, zip(g.traced.shapes, g.traced.is_param)))
  return [m for m in group.members
          if m.role == "other" and info[m.path][1] and m.path.endswith("/scale")
          and len(info[m.path][0]) == 1]


def _concrete(values) -> bool:
  return not any(isinstance(v, jax.ShapeDtypeStruct) for v in values.values())


def _ista_groups(g, values):
  """(group, scales) that ISTA may sparsify: prunable, one producer, a norm scale,
  not zero everywhere already (zero-initialised residual gammas; not tested
  when `values` is None)."""
  concrete = values is not None and _concrete(values)
  for group in g.prunable():
    if len(group.producers) != 1:
      continue
    scales = _scales(g, group)
    if not scales:
      continue
    if concrete and not any(np.any(np.asarray(values[m.path]) != 0) for m in scales):
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
  return sorted(_param_path(g, m.path) for _, scales in _ista_groups(g, values)
                for m in scales)


def ista_rho(model, variables, input_shape: Sequence[int],
             call: Callable | None = None) -> dict[str, float]:
  """Per-layer ISTA penalties rho_l from the network's structure (memory priority, §2).

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
  for group, scales in _ista_groups(g, values):
    producer = next(m for m in group.members if m.role == "producer")
    kernel = shapes[producer.path]
    total = math.prod(out_shape[producer.path][1:-1]) + math.prod(kernel) // kernel[producer.axis]
    for m in group.members:
      if m.role == "consumer":
        s = shapes[m.path]
        total += m.index.shape[1] * math.prod(s) // s[m.axis]
    for m in scales:
      rho[_param_path(g, m.path)] = total / area
  return rho


# ---------------------------------------------------------------------------------
# Writing values back.


def _with_values(model, variables, new: Mapping[str, np.ndarray]):
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


def _rows(arr: np.ndarray, m) -> np.ndarray:
  """A view of ``arr`` with the member's axis first."""
  return np.moveaxis(arr, m.axis, 0)


def rescale_gamma(model, variables, alpha: float | Mapping[str, float],
                  input_shape: Sequence[int], call: Callable | None = None):
  """The gamma-W rescaling trick (§3): gamma, beta * alpha, consumer weights / alpha.

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
  for group, scales in _ista_groups(g, values):
    key = _param_path(g, scales[0].path)
    a = alpha.get(key, 1.0) if isinstance(alpha, Mapping) else alpha
    if not a > 0:
      raise UserError(f"rescale_gamma needs alpha > 0 (ReLU is only positively "
                      f"homogeneous); got {a} for {key}.")
    norms = {_owner(m.path) for m in scales}
    for m in group.members:
      rows = m.index.ravel()
      if _owner(m.path) in norms and m.path.rsplit("/", 1)[1] in ("scale", "bias"):
        _rows(arr(m.path), m)[rows] *= a
      elif m.role == "consumer":
        _rows(arr(m.path), m)[rows] /= a
  small, small_vars = _with_values(model, variables, new)
  return small if isinstance(model, nnx.Module) else small_vars


# ---------------------------------------------------------------------------------
# Channel removal (§4).


@dataclasses.dataclass
class Shrunk:
  """The result of :func:`shrink`.

  Attributes:
    model: the physically smaller network (a :class:`jaxprune.surgery.Rebuilt`
      Linen module, a new ``nnx.Module``, or the function itself).
    variables: its variables (None for NNX).
    kept: ``{group name: original indices of the surviving channels}`` for every
      prunable group of the original graph (empty when only the placeholder is
      left); a group's name is its first producer's module path
      (``stage0_block0/conv_a``).
    widths_before, widths_after: channels per group (a placeholder counts as 0).
    ista_groups: the names of the groups :func:`ista_scales` selects (the
      denominator of :attr:`removed_fraction`).
    rounds: passes of the removal until nothing changed.
    cascaded: groups with channels that became constant only because all their
      inputs were removed; their constant is exact on the interior of their own
      conv, so their consumers inherit a wider border deviation.
    folds: ``{consumer kernel path: {"into": bias or mean leaf path, "delta":
      per original output channel}}``: what was folded where.
    slices: ``{leaf path: {axis: original indices kept}}`` from the original
      network to the smaller one.
    unfoldable: ``{group name: reason}`` for groups with constant channels that
      had to stay (no bias or norm after a consumer, a non-constant value...).
    cascade_readers: consumer kernels of the ``cascaded`` groups.
    placeholders: ``{producer kernel path: (axis, original index)}`` of the
      placeholder channels (their producer slices are zeroed: they read nothing).
    scaled: ``{leaf path: factor}`` of the leaves a compensated group's fold
      multiplied (a narrowed head dimension's ``1/sqrt(head_dim)``, see
      :func:`jaxprune.surgery.rebuild.compensate`).
  """
  model: Any
  variables: Any
  kept: dict[str, np.ndarray]
  widths_before: dict[str, int]
  widths_after: dict[str, int]
  rounds: int
  cascaded: list[str] = dataclasses.field(default_factory=list)
  folds: dict = dataclasses.field(default_factory=dict)
  slices: dict = dataclasses.field(default_factory=dict)
  unfoldable: dict = dataclasses.field(default_factory=dict)
  cascade_readers: list[str] = dataclasses.field(default_factory=list)
  placeholders: dict = dataclasses.field(default_factory=dict)
  ista_groups: list[str] = dataclasses.field(default_factory=list)
  scaled: dict = dataclasses.field(default_factory=dict)

  @property
  def removed_fraction(self) -> float:
    """Removed channels / channels of the groups ISTA sparsifies (:func:`ista_scales`)."""
    names = self.ista_groups or list(self.widths_before)
    before = sum(self.widths_before[n] for n in names)
    return 1 - sum(self.widths_after[n] for n in names) / max(before, 1)


def _numpy(leaf):
  """A numeric leaf as numpy; others (PRNG keys) as they are."""
  if jnp.issubdtype(jnp.result_type(leaf), jnp.number) or jnp.result_type(leaf) == bool:
    return np.asarray(leaf)
  return leaf


def _zero_slices(values, m) -> np.ndarray:
  """Per channel of the member's group: whether its slice of the leaf is all zero."""
  rows = _rows(np.asarray(values[m.path]), m)
  sub = rows[m.index.ravel()].reshape(m.index.shape + rows.shape[1:])
  return ~np.any(sub.reshape(m.index.shape[0], -1) != 0, axis=1)


def _measure(layer, m, channels, atol):
  """The value each probe example feeds the consumer on ``m.index[channels]``,
  read at the middle position; (values (n, r), agree mask per channel)."""
  axis = layer.input_axis(m.axis) + 1  # + the example axis
  x = np.moveaxis(np.asarray(layer.x, np.float64), axis, -1)
  flat = x.reshape(x.shape[0], -1, x.shape[-1])
  reads = flat[:, flat.shape[1] // 2][:, m.index[channels]]  # (examples, n, r)
  agree = np.all(np.abs(reads - reads[:1]) <= atol, axis=(0, 2))
  return reads[0], agree


def shrink(model, variables, input_shape: Sequence[int], call: Callable | None = None, *,
           fold_constants: bool = True, probe: Any = None, max_rounds: int = 64,
           round_to: int = 1) -> Shrunk:
  """Removes exactly-zero-gamma channels and the channels they make dead (§4).

  A channel of a prunable group goes when (repeated until nothing changes): its
  norm's gamma is exactly 0, or its producers' slices are all zero (no fan-in
  left): it outputs a constant ``v_c``; or no consumer slice reads it. A constant
  channel's value where each consumer reads it is measured on `probe` (the same
  for every example, else the channel stays) and ``sum W[..., c, ..., :] * v_c``
  (per spatial position for a dense layer reading a flattened map) is added to
  the consumer's bias or subtracted from the running mean of the norm after it.

  Args:
    model: a Linen module, an ``nnx.Module`` (variables None) or ``f(params, x)``.
    variables: its variables (concrete), None for NNX.
    input_shape: one example's shape, e.g. (32, 32, 3), or a pytree of shapes and
      ``jax.ShapeDtypeStruct`` s (several inputs: token ids, masks; with `call`), see
      :func:`jaxprune.graph.tracing.example_inputs`.
    call: as for :func:`jaxprune.graph.trace`.
    fold_constants: False drops constant channels without folding (to measure
      what the fold buys).
    probe: inputs (N >= 2, *input_shape) for the measurement, a pytree like
      `input_shape` for several inputs (default 2 random ones,
      :func:`jaxprune.surgery.rebuild.probe_inputs`: integers 0 or 1).
    max_rounds: a bound on the fixpoint iteration.
    round_to: kept widths a multiple of this (capped at the full width; e.g. 8 for CPU
      SIMD, 128 for TPU lanes): removable channels are kept back until the count is one,
      each with its consumers' rows zeroed (its constant, if any, is folded as for a
      removed channel), so the network is unchanged.

  Returns:
    A :class:`Shrunk`; its network equals the original on interior pixels (see
    :func:`check_equivalence`).

  Example:
    >>> small = surgery.shrink(model, variables, (32, 32, 3))
    >>> small.widths_after, small.removed_fraction
  """
  if int(round_to) != round_to or round_to < 1:
    raise UserError(f"shrink: round_to must be a positive int, got {round_to!r}")
  g0 = graph_lib.trace(model, variables, input_shape, call)
  if not _concrete(graph_lib.named_leaves(model, variables)):
    raise UserError("shrink needs the trained variables, not abstract shapes")
  shape0 = dict(zip(g0.traced.paths, g0.traced.shapes))
  before = {_label(g0, grp): grp.width for grp in g0.prunable()}
  original = {label: np.arange(w) for label, w in before.items()}
  placeholder: set[str] = set()
  composed: dict[str, dict[int, np.ndarray]] = {}
  folds: dict[str, dict] = {}
  placeholders: dict[str, tuple] = {}
  cascaded, readers, unfoldable = set(), set(), {}
  x = _probe_arrays(probe if probe is not None else probe_inputs(input_shape, 2))
  n = len(jax.tree.leaves(x)[0])
  if n < 2:
    raise UserError(f"shrink needs a probe of at least 2 inputs to check that a removed "
                    f"channel is constant; got {n}")

  cur_model, cur_vars, g = model, variables, g0
  scaled: dict[str, float] = {}
  rounds = 0
  while rounds < max_rounds:
    rounds += 1
    if rounds > 1:
      g = graph_lib.trace(cur_model, cur_vars, input_shape, pruned_call(cur_model, call))
    values = {p: _numpy(v) for p, v in graph_lib.named_leaves(cur_model, cur_vars).items()}
    result = evaluate.run(g.traced, values, x)
    layers: dict[str, Any] = {}
    for layer in result.layers:
      layers.setdefault(layer.kernel, layer)  # a shared kernel: its first use
    followers = result.followers
    new: dict[str, np.ndarray] = {}

    def arr(path):
      if path not in new:
        new[path] = np.array(values[path], np.float64)
      return new[path]

    keep = {}
    for group in g.prunable():
      label = _label(g, group)
      producers = [m for m in group.members if m.role == "producer"]
      consumers = [m for m in group.members if m.role == "consumer"]
      scales = _scales(g, group)
      gamma_zero = np.zeros(group.width, bool)
      if scales:
        gamma_zero = np.all([_zero_slices(values, m) for m in scales], axis=0)
      no_fan_in = np.all([_zero_slices(values, m) for m in producers], axis=0)
      unread = (np.all([_zero_slices(values, m) for m in consumers], axis=0) if consumers
                else np.zeros(group.width, bool))
      constant = (gamma_zero | no_fan_in) & ~unread
      remove = unread.copy()
      channels = np.flatnonzero(constant)
      if channels.size and fold_constants:
        ok, plan = np.ones(channels.size, bool), []
        for m in consumers:
          seen = layers.get(m.path)
          if seen is None:
            unfoldable[label] = f"{m.path} is not a conv/matmul input"
            ok[:] = False
            break
          scale = max(1.0, float(np.max(np.abs(seen.x))))
          reads, agree = _measure(seen, m, channels, 1e-6 * scale)
          if not agree.all():
            unfoldable[label] = f"the channels {m.path} reads are not constant"
          ok &= agree
          out_axes = evaluate.kernel_output_axes(seen, len(values[m.path].shape))
          target = followers.get(m.path, {})
          into = target.get("bias") or target.get("mean")
          if len(out_axes) != 1 or into is None:  # only channels that read as 0 may go
            zero = ~np.any(reads != 0, axis=1)
            if not zero.all():
              unfoldable[label] = (f"{m.path} has no bias or norm right after it to fold "
                                   "a constant into")
            ok &= zero
            continue
          plan.append((m, out_axes[0], into, reads))
        channels = channels[ok]
        for m, out_axis, into, reads in plan:
          reads = reads[ok]
          if not channels.size:
            break
          rows = m.index[channels].ravel()
          w = np.moveaxis(np.take(np.asarray(values[m.path], np.float64), rows, axis=m.axis),
                          [m.axis, out_axis], [0, -1])
          delta = np.einsum("nto,n->o", w.reshape(rows.size, -1, w.shape[-1]), reads.ravel())
          target = arr(into)
          if target.shape != delta.shape:
            raise UserError(f"shrink: {into} has shape {target.shape}, the fold of "
                            f"{m.path} {delta.shape}")
          target += delta if into.endswith("/bias") else -delta
          out_index = composed.get(m.path, {}).get(out_axis,
                                                   np.arange(shape0[m.path][out_axis]))
          entry = folds.setdefault(m.path, {"into": into,
                                            "delta": np.zeros(shape0[m.path][out_axis])})
          entry["delta"][out_index] += delta
        if channels.size and np.any(no_fan_in[channels] & ~gamma_zero[channels]):
          cascaded.add(label)
          readers.update(m.path for m in consumers)
        remove[channels] = True
      elif channels.size:
        remove[channels] = True
      dead = np.flatnonzero(remove)
      for m in consumers:  # a removed channel contributes nothing any more
        _rows(arr(m.path), m)[m.index[dead].ravel()] = 0.0
      kept = np.flatnonzero(~remove)
      if round_to > 1 and kept.size:  # keep back dead channels up to a multiple
        extra = min(group.width, -(-kept.size // round_to) * round_to) - kept.size
        kept = np.union1d(kept, dead[:extra])
      if not kept.size:  # the placeholder: read with zero weights, reads nothing itself
        kept = dead[:1]
        placeholder.add(label)
        for m in producers:
          _rows(arr(m.path), m)[m.index[kept].ravel()] = 0.0
          done = composed.get(m.path, {}).get(m.axis, np.arange(shape0[m.path][m.axis]))
          placeholders[m.path] = (m.axis, done[m.index[kept].ravel()])
      if kept.size < group.width:
        keep[group.id] = kept
        if label in original:
          original[label] = original[label][kept]
    cur_model, cur_vars = _with_values(cur_model, cur_vars, new)
    if not keep:
      break
    slices = graph_lib.kept_slices(g, keep)
    for path, axes in slices.items():
      for axis, idx in axes.items():
        done = composed.setdefault(path, {}).get(axis, np.arange(shape0[path][axis]))
        composed[path][axis] = done[idx]
    small = apply_slices(cur_model, cur_vars, slices, input_shape, call)
    small = compensate(g, keep, small, input_shape, call)  # e.g. 1/sqrt(head_dim)
    for path, factor in small.folded.items():
      scaled[path] = scaled.get(path, 1.0) * factor
    cur_model, cur_vars = small.model, small.variables
  else:
    raise UserError(f"shrink did not reach a fixpoint in {max_rounds} rounds")

  kept = {label: (np.zeros(0, np.int64) if label in placeholder else idx)
          for label, idx in original.items()}
  return Shrunk(model=cur_model, variables=cur_vars, kept=kept, widths_before=before,
                widths_after={label: int(k.size) for label, k in kept.items()},
                rounds=rounds, cascaded=sorted(cascaded), folds=folds, slices=composed,
                unfoldable=unfoldable, cascade_readers=sorted(readers),
                placeholders=placeholders, scaled=scaled,
                ista_groups=[_label(g0, grp) for grp, _ in _ista_groups(g0, None)])


# ---------------------------------------------------------------------------------
# masked == shrunk check.


def _channels_last(diff, layer):
  """(N, spatial..., C) view of a conv output; a matmul output unchanged."""
  if layer.primitive != "conv_general_dilated":
    return diff
  spec = layer.params["dimension_numbers"].out_spec
  return np.transpose(diff, (spec[0], *spec[2:], spec[1]))


def _probe_arrays(probe):
  """A probe as numpy arrays: floats as float32, integer inputs (token ids, masks) as
  they are."""
  def one(a):
    a = np.asarray(a)
    return a.astype(np.float32) if not np.issubdtype(a.dtype, np.integer) and \
        a.dtype != np.bool_ else a
  return jax.tree.map(one, probe)


def _probe_shape(probe):
  """One example's input_shape of a probe (a shape, or a pytree of structs)."""
  if isinstance(probe, np.ndarray) and probe.dtype == np.float32:
    return probe.shape[1:]
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), probe)


def check_equivalence(model, variables, shrunk: Shrunk, probe,
                      call: Callable | None = None, *,
                      input_shape: Any = None) -> dict[str, float]:
  """Compares the masked (original, zero gammas) and the shrunk network on ``probe``.

  Two comparisons:
  - layer by layer: every conv/matmul of the shrunk network is fed the masked
    network's input to that layer (restricted to the surviving channels) and its
    output (before bias) plus the folded constant is compared with the masked
    one on the surviving channels, separately on interior pixels (the conv
    window avoids the zero padding: the fold is exact there) and border pixels
    (padding meets a folded constant; every pixel of a layer reading a
    ``shrunk.cascaded`` group counts as border);
  - end to end: the outputs of both networks run freely.

  Args:
    model, variables: the original (masked) network.
    shrunk: the result of :func:`shrink` on them.
    probe: a batch of inputs (N, *input_shape), or for several inputs (token ids,
      masks; with `call`) a pytree of such batches.
    call: as for :func:`shrink`.
    input_shape: as for :func:`shrink` (default: read from the probe).

  Returns:
    ``interior_max_abs_diff`` and ``border_max_abs_diff`` (over every layer),
    ``activation_max_abs`` (scale of those outputs), ``logits_max_abs_diff``,
    ``logits_max_abs`` and ``argmax_agreement`` (fraction of probe inputs with
    the same predicted class); ``approximate``: ``{group name: effects}`` of the
    narrowed groups whose removal changes the function (a mean over the channels
    such as LayerNorm's, see :attr:`jaxprune.graph.Group.exactness`): there the
    shrunk network is not the masked one, whatever the differences above.
  """
  probe = _probe_arrays(probe)
  input_shape = _probe_shape(probe) if input_shape is None else input_shape
  small_call = pruned_call(shrunk.model, call)
  big_t = tracing.trace_jaxpr(model, variables, input_shape, call)
  small_t = tracing.trace_jaxpr(shrunk.model, shrunk.variables, input_shape, small_call)
  big_v = graph_lib.named_leaves(model, variables)
  small_v = graph_lib.named_leaves(shrunk.model, shrunk.variables)
  interior = border = scale = 0.0
  big = {}
  for layer in evaluate.run(big_t, big_v, probe).layers:
    big.setdefault(layer.kernel, []).append(layer)
  count: dict[str, int] = {}
  pairs, replace = [], []
  for layer in evaluate.layers_of(small_t, small_v):  # each fed the masked network's input
    k = count.get(layer.kernel, 0)
    count[layer.kernel] = k + 1
    ref = big[layer.kernel][k]
    x = ref.x
    for axis, idx in shrunk.slices.get(layer.kernel, {}).items():
      x_axis = ref.input_axis(axis)
      if x_axis is not None:
        x = np.take(x, idx, axis=x_axis + 1)
    pairs.append(ref)
    replace.append(x)
  fed = evaluate.run(small_t, small_v, probe, replace=replace).layers
  for ref, layer in zip(pairs, fed):
    want = np.asarray(ref.out, np.float64)
    fold = shrunk.folds.get(ref.kernel)
    for axis, idx in shrunk.slices.get(ref.kernel, {}).items():
      out_axis = ref.output_axis(axis)
      if out_axis is not None:
        want = np.take(want, idx, axis=out_axis + 1)
    diff = want - np.asarray(layer.out, np.float64) / shrunk.scaled.get(ref.kernel, 1.0)
    if ref.kernel in shrunk.placeholders:  # read with zero weights: not compared
      axis, original = shrunk.placeholders[ref.kernel]
      kept = shrunk.slices.get(ref.kernel, {}).get(axis)
      at = np.flatnonzero(np.isin(kept, original)) if kept is not None else original
      diff = np.moveaxis(diff, ref.output_axis(axis) + 1, 0).copy()
      diff[at] = 0.0
      diff = np.moveaxis(diff, 0, ref.output_axis(axis) + 1)
    if fold is not None:
      out_axis = ref.output_axis(evaluate.kernel_output_axes(ref, len(ref.kernel_shape))[0])
      delta = fold["delta"]
      for axis, idx in shrunk.slices.get(ref.kernel, {}).items():
        if ref.output_axis(axis) == out_axis:
          delta = delta[idx]
      shape = [1] * diff.ndim
      shape[out_axis + 1] = -1
      diff = diff - delta.reshape(shape)
    # (examples * batch of one, spatial..., channels) for a conv.
    diff = np.abs(_channels_last(diff.reshape((-1,) + diff.shape[2:]), layer))
    scale = max(scale, float(np.max(np.abs(want))))
    inner = evaluate.conv_interior(layer)
    if ref.kernel in shrunk.cascade_readers:
      border = max(border, float(diff.max()))
    elif inner is not None:
      if inner.any():
        interior = max(interior, float(diff[:, inner].max()))
      if (~inner).any():
        border = max(border, float(diff[:, ~inner].max()))
    else:
      interior = max(interior, float(diff.max()))
  logits = np.asarray(_forward(model, variables, call, probe))
  small = np.asarray(_forward(shrunk.model, shrunk.variables, call, probe))
  g = graph_lib.trace(model, variables, input_shape, call)
  approximate = {}
  for group in g.groups:
    label = _label(g, group)
    if (group.exactness == "approximate"
        and shrunk.widths_after.get(label, group.width) < shrunk.widths_before.get(label, 0)):
      approximate[label] = group.effects
  return {"approximate": approximate,
          "interior_max_abs_diff": interior, "border_max_abs_diff": border,
          "activation_max_abs": scale,
          "logits_max_abs_diff": float(np.abs(logits - small).max()),
          "logits_max_abs": float(np.abs(logits).max()),
          "argmax_agreement": float(np.mean(logits.argmax(-1) == small.argmax(-1)))}


__all__ = ["ista_scales", "ista_rho", "rescale_gamma", "Shrunk", "shrink",
           "check_equivalence"]
