"""Dead channels (zero gamma, no fan-in, unread) removed in three steps — measure,
fold, remove: ``shrink`` (constants folded), ``prune_zeros`` (no fold), and the
masked == shrunk check."""
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import graph as graph_lib
from jaxprune.errors import UserError
from jaxprune.graph import evaluate, tracing
from jaxprune.surgery.norm_scales import (channel_rows, concrete, group_label, ista_groups,
                                          norm_scales, with_values)
from jaxprune.surgery.rebuild import Pruned, compensate, forward, probe_inputs, pruned_call
from jaxprune.surgery.remove import apply_slices, approximate_groups


# ---------------------------------------------------------------------------------
# Dead channels: measure, fold, remove.


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
  rows = channel_rows(np.asarray(values[m.path]), m)
  sub = rows[m.index.ravel()].reshape(m.index.shape + rows.shape[1:])
  return ~np.any(sub.reshape(m.index.shape[0], -1) != 0, axis=1)


def _reads(layer, m, channels, atol):
  """The value each probe example feeds the consumer on ``m.index[channels]``,
  read at the middle position; (values (n, r), agree mask per channel)."""
  axis = layer.input_axis(m.axis) + 1  # + the example axis
  x = np.moveaxis(np.asarray(layer.x, np.float64), axis, -1)
  flat = x.reshape(x.shape[0], -1, x.shape[-1])
  reads = flat[:, flat.shape[1] // 2][:, m.index[channels]]  # (examples, n, r)
  agree = np.all(np.abs(reads - reads[:1]) <= atol, axis=(0, 2))
  return reads[0], agree


@dataclasses.dataclass
class Dead:
  """:func:`measure`'s answer for one group: per channel (bool arrays of its width)."""
  gamma_zero: np.ndarray  # its norm scale is exactly 0
  no_fan_in: np.ndarray   # every producer slice is zero
  unread: np.ndarray      # every consumer slice is zero: nobody reads it

  @property
  def constant(self) -> np.ndarray:
    """Channels that output a constant (to fold, or to remove where it reads as 0)."""
    return (self.gamma_zero | self.no_fan_in) & ~self.unread


def measure(g, values, group, *, gammas: bool = True) -> Dead:
  """Step 1: which channels of `group` are dead, read from the zero slices of its
  leaves (`values`: ``{leaf path: array}``); ``gammas=False`` ignores zero norm scales."""
  producers = [m for m in group.members if m.role == "producer"]
  consumers = [m for m in group.members if m.role == "consumer"]
  scales = norm_scales(g, group) if gammas else []
  none = np.zeros(group.width, bool)
  return Dead(
      gamma_zero=np.all([_zero_slices(values, m) for m in scales], axis=0) if scales else none,
      no_fan_in=np.all([_zero_slices(values, m) for m in producers], axis=0),
      unread=(np.all([_zero_slices(values, m) for m in consumers], axis=0) if consumers
              else none))


@dataclasses.dataclass
class _Removal:
  """What the rounds of :func:`_remove_dead` share and record."""
  shape0: dict
  values: dict = dataclasses.field(default_factory=dict)
  layers: dict = dataclasses.field(default_factory=dict)
  followers: dict = dataclasses.field(default_factory=dict)
  new: dict = dataclasses.field(default_factory=dict)
  composed: dict = dataclasses.field(default_factory=dict)
  folds: dict = dataclasses.field(default_factory=dict)
  unfoldable: dict = dataclasses.field(default_factory=dict)
  placeholders: dict = dataclasses.field(default_factory=dict)

  def arr(self, path):
    if path not in self.new:
      self.new[path] = np.array(self.values[path], np.float64)
    return self.new[path]


def fold(st: _Removal, label: str, consumers, channels: np.ndarray, *,
         into_next: bool = True) -> np.ndarray:
  """Step 2: the constant `channels` that may go (a mask over them). Each one's value
  where each consumer reads it is measured on the probe (the same for every example,
  else it stays); with ``into_next`` ``sum W[..., c, ..., :] * v_c`` is added to the
  consumer's bias or subtracted from the running mean of the norm after it. Without
  (or with nothing to fold into) only channels that read as 0 go."""
  ok, plan = np.ones(channels.size, bool), []
  for m in consumers:
    seen = st.layers.get(m.path)
    if seen is None:
      st.unfoldable[label] = f"{m.path} is not a conv/matmul input"
      ok[:] = False
      break
    scale = max(1.0, float(np.max(np.abs(seen.x))))
    reads, agree = _reads(seen, m, channels, 1e-6 * scale)
    if not agree.all():
      st.unfoldable[label] = f"the channels {m.path} reads are not constant"
    ok &= agree
    out_axes = evaluate.kernel_output_axes(seen, len(st.values[m.path].shape))
    target = st.followers.get(m.path, {})
    into = (target.get("bias") or target.get("mean")) if into_next else None
    if len(out_axes) != 1 or into is None:  # only channels that read as 0 may go
      zero = ~np.any(reads != 0, axis=1)
      if not zero.all():
        st.unfoldable[label] = (f"{m.path} has no bias or norm right after it to fold "
                                "a constant into" if into_next else
                                f"{m.path} reads a nonzero constant (no fold)")
      ok &= zero
      continue
    plan.append((m, out_axes[0], into, reads))
  channels = channels[ok]
  for m, out_axis, into, reads in plan:
    reads = reads[ok]
    if not channels.size:
      break
    rows = m.index[channels].ravel()
    w = np.moveaxis(np.take(np.asarray(st.values[m.path], np.float64), rows, axis=m.axis),
                    [m.axis, out_axis], [0, -1])
    delta = np.einsum("nto,n->o", w.reshape(rows.size, -1, w.shape[-1]), reads.ravel())
    target = st.arr(into)
    if target.shape != delta.shape:
      raise UserError(f"shrink: {into} has shape {target.shape}, the fold of "
                      f"{m.path} {delta.shape}")
    target += delta if into.endswith("/bias") else -delta
    out_index = st.composed.get(m.path, {}).get(out_axis,
                                                np.arange(st.shape0[m.path][out_axis]))
    entry = st.folds.setdefault(m.path, {"into": into,
                                         "delta": np.zeros(st.shape0[m.path][out_axis])})
    entry["delta"][out_index] += delta
  return ok


def remove(st: _Removal, group, remove_mask: np.ndarray, round_to: int = 1):
  """Step 3: the kept channels of `group` once the `remove_mask` ones go (their
  consumer rows zeroed). Kept widths are a multiple of `round_to` (dead channels kept
  back); a group that would lose every channel keeps one *placeholder*, its producer
  slices zeroed. Returns ``(kept, whether it is the placeholder)``."""
  producers = [m for m in group.members if m.role == "producer"]
  dead = np.flatnonzero(remove_mask)
  for m in group.members:  # a removed channel contributes nothing any more
    if m.role == "consumer":
      channel_rows(st.arr(m.path), m)[m.index[dead].ravel()] = 0.0
  kept = np.flatnonzero(~remove_mask)
  if round_to > 1 and kept.size:  # keep back dead channels up to a multiple
    extra = min(group.width, -(-kept.size // round_to) * round_to) - kept.size
    kept = np.union1d(kept, dead[:extra])
  if kept.size:
    return kept, False
  kept = dead[:1]  # the placeholder: read with zero weights, reads nothing itself
  for m in producers:
    channel_rows(st.arr(m.path), m)[m.index[kept].ravel()] = 0.0
    done = st.composed.get(m.path, {}).get(m.axis, np.arange(st.shape0[m.path][m.axis]))
    st.placeholders[m.path] = (m.axis, done[m.index[kept].ravel()])
  return kept, True


def _remove_dead(model, variables, input_shape, call, x, *, fold_mode: str, gammas: bool,
                 max_rounds: int, round_to: int, fixpoint: bool = True):
  """measure -> fold -> remove per prunable group, the network rebuilt, repeated to a
  fixpoint (or once). ``fold_mode``: "fold" (into the next layer), "none" (only
  constant channels that read as 0 go) or "drop" (constant channels go unfolded).
  Returns ``(Shrunk, the original graph, keep of the first round, the last round's
  Pruned or None)``."""
  g0 = graph_lib.trace(model, variables, input_shape, call)
  if not concrete(graph_lib.named_leaves(model, variables)):
    raise UserError("shrink needs the trained variables, not abstract shapes")
  st = _Removal(shape0=dict(zip(g0.traced.paths, g0.traced.shapes)))
  before = {group_label(g0, grp): grp.width for grp in g0.prunable()}
  original = {label: np.arange(w) for label, w in before.items()}
  placeholder: set[str] = set()
  cascaded, readers = set(), set()
  cur_model, cur_vars, g = model, variables, g0
  scaled: dict[str, float] = {}
  first_keep, small = None, None
  rounds = 0
  while rounds < max_rounds:
    rounds += 1
    if rounds > 1:
      g = graph_lib.trace(cur_model, cur_vars, input_shape, pruned_call(cur_model, call))
    st.values = {p: _numpy(v) for p, v in graph_lib.named_leaves(cur_model, cur_vars).items()}
    st.new = {}
    st.layers, st.followers = {}, {}
    if fold_mode != "drop":
      result = evaluate.run(g.traced, st.values, x)
      for layer in result.layers:
        st.layers.setdefault(layer.kernel, layer)  # a shared kernel: its first use
      st.followers = result.followers
    keep = {}
    for group in g.prunable():
      label = group_label(g, group)
      consumers = [m for m in group.members if m.role == "consumer"]
      dead = measure(g, st.values, group, gammas=gammas)
      remove_mask = dead.unread.copy()
      channels = np.flatnonzero(dead.constant)
      if channels.size and fold_mode != "drop":
        channels = channels[fold(st, label, consumers, channels,
                                 into_next=fold_mode == "fold")]
        if channels.size and np.any(dead.no_fan_in[channels] & ~dead.gamma_zero[channels]):
          cascaded.add(label)
          readers.update(m.path for m in consumers)
      remove_mask[channels] = True
      kept, is_placeholder = remove(st, group, remove_mask, round_to)
      if is_placeholder:
        placeholder.add(label)
      if kept.size < group.width:
        keep[group.id] = kept
        if label in original:
          original[label] = original[label][kept]
    cur_model, cur_vars = with_values(cur_model, cur_vars, st.new)
    if first_keep is None:
      first_keep = keep
    if not keep:
      break
    slices = graph_lib.kept_slices(g, keep)
    for path, axes in slices.items():
      for axis, idx in axes.items():
        done = st.composed.setdefault(path, {}).get(axis, np.arange(st.shape0[path][axis]))
        st.composed[path][axis] = done[idx]
    small = apply_slices(cur_model, cur_vars, slices, input_shape, call)
    small = compensate(g, keep, small, input_shape, call)  # e.g. 1/sqrt(head_dim)
    for path, factor in small.folded.items():
      scaled[path] = scaled.get(path, 1.0) * factor
    cur_model, cur_vars = small.model, small.variables
    if not fixpoint:
      break
  else:
    raise UserError(f"shrink did not reach a fixpoint in {max_rounds} rounds")

  kept = {label: (np.zeros(0, np.int64) if label in placeholder else idx)
          for label, idx in original.items()}
  shrunk = Shrunk(model=cur_model, variables=cur_vars, kept=kept, widths_before=before,
                  widths_after={label: int(k.size) for label, k in kept.items()},
                  rounds=rounds, cascaded=sorted(cascaded), folds=st.folds,
                  slices=st.composed, unfoldable=st.unfoldable,
                  cascade_readers=sorted(readers), placeholders=st.placeholders,
                  scaled=scaled,
                  ista_groups=[group_label(g0, grp) for grp, _ in ista_groups(g0, None)])
  return shrunk, g0, first_keep, small


def shrink(model, variables, input_shape: Sequence[int], call: Callable | None = None, *,
           fold_constants: bool = True, probe: Any = None, max_rounds: int = 64,
           round_to: int = 1) -> Shrunk:
  """Removes exactly-zero-gamma channels and the channels they make dead (docs/methods/ista.md §4).

  A channel of a prunable group goes when (repeated until nothing changes): its
  norm's gamma is exactly 0, or its producers' slices are all zero (no fan-in
  left): it outputs a constant ``v_c``; or no consumer slice reads it. A constant
  channel's value where each consumer reads it is measured on `probe` (the same
  for every example, else the channel stays) and ``sum W[..., c, ..., :] * v_c``
  (per spatial position for a dense layer reading a flattened map) is added to
  the consumer's bias or subtracted from the running mean of the norm after it
  (:func:`measure`, :func:`fold`, :func:`remove`).

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
  x = _probe_arrays(probe if probe is not None else probe_inputs(input_shape, 2))
  n = len(jax.tree.leaves(x)[0])
  if n < 2:
    raise UserError(f"shrink needs a probe of at least 2 inputs to check that a removed "
                    f"channel is constant; got {n}")
  return _remove_dead(model, variables, input_shape, call, x,
                      fold_mode="fold" if fold_constants else "drop", gammas=True,
                      max_rounds=max_rounds, round_to=int(round_to))[0]


PRUNE_ZEROS_MEASURE = 8  # probe examples prune_zeros measures the constants on (checks on all)


def prune_zeros(model, variables, input_shape: Sequence[int], call: Callable | None = None,
                *, probe: Any = None, atol: float = 1e-5) -> tuple[Pruned, dict]:
  """Removes the channels that masked (gated) weights made dead, for any model: the
  no-fold case of :func:`shrink`, one pass.

  A channel goes when every producer slice of it is exactly zero (its fan-in is
  gated off: AutoPrune's neuron mode with ``neuron_axis="out"``, or any mask on
  output units) and the value its consumers read is measured 0 on the probe (a
  zero bias, a norm whose constant ``beta - gamma * mean / sqrt(var + eps)`` is 0,
  an activation with ``f(0) = 0``), or when every consumer slice is zero (nobody
  reads it: ``neuron_axis="in"``). A constant channel that reads nonzero needs a
  fold into the next layer and is kept (listed in ``info["needs_fold"]``). A group
  that would lose every channel keeps one (zeroed) channel, which computes what the
  empty layer would. The result is checked on the probe against the masked network;
  a difference is an error, never a silently different network.

  Args:
    model, variables, input_shape, call: as for :func:`jaxprune.surgery.prune`, with
      the masked (effective) weights, e.g. ``optim.effective_params`` of AutoPrune.
    probe: inputs for the measurement (its first ``PRUNE_ZEROS_MEASURE``) and the
      check (default a random batch of 4, :func:`jaxprune.surgery.rebuild.probe_inputs`:
      a pytree like `input_shape` for several inputs, integer inputs 0 or 1).
    atol: tolerance of the check, relative to the output's scale.

  Returns:
    ``(pruned, info)``; ``info``: ``keep`` (group id -> kept channels),
    ``needs_fold`` ({group id: [its norm layers, or its producer's module]}),
    ``max_abs_diff`` of the check.
  """
  x = probe if probe is not None else probe_inputs(input_shape, 4)
  shrunk, g, keep, small = _remove_dead(
      model, variables, input_shape, call,
      _probe_arrays(jax.tree.map(lambda a: a[:PRUNE_ZEROS_MEASURE], x)),
      fold_mode="none", gammas=False, max_rounds=1, round_to=1, fixpoint=False)
  by_label = {group_label(g, grp): grp for grp in g.prunable()}
  needs_fold = {by_label[label].id: _norm_layers(by_label[label]) or [label]
                for label in shrunk.unfoldable}
  if small is None:  # nothing removed: the network rebuilt as it is
    small = apply_slices(model, variables, {}, input_shape, call)
  small.approximate = approximate_groups(g, keep)
  ref, got = forward(model, variables, call, x), forward(small.model, small.variables, call, x)
  diff = float(np.max(np.abs(np.asarray(ref) - np.asarray(got))))
  scale = max(float(np.max(np.abs(np.asarray(ref)))), 1.0)
  if diff > atol * scale:
    raise UserError(f"removing the zeroed channels changed the output by {diff:.3g}: a "
                    "removed unit outputs a nonzero constant (an activation with f(0) != 0 "
                    "or a norm after it); fold it or keep those channels")
  return small, {"keep": keep, "needs_fold": needs_fold, "max_abs_diff": diff}


def _norm_layers(group) -> list[str]:
  """The norm layers (with running statistics) among `group`'s members, no collection."""
  leaves = {}
  for m in group.members:
    owner, leaf = m.path.rsplit("/", 1)
    if owner.startswith(("params/", "batch_stats/")):
      owner = owner.split("/", 1)[-1]
    leaves.setdefault(owner, set()).add(leaf)
  return sorted(o for o, names in leaves.items() if {"mean", "var"} <= names)


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
    folded = shrunk.folds.get(ref.kernel)
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
    if folded is not None:
      out_axis = ref.output_axis(evaluate.kernel_output_axes(ref, len(ref.kernel_shape))[0])
      delta = folded["delta"]
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
  logits = np.asarray(forward(model, variables, call, probe))
  small = np.asarray(forward(shrunk.model, shrunk.variables, call, probe))
  g = graph_lib.trace(model, variables, input_shape, call)
  approximate = {}
  for group in g.groups:
    label = group_label(g, group)
    if (group.exactness == "approximate"
        and shrunk.widths_after.get(label, group.width) < shrunk.widths_before.get(label, 0)):
      approximate[label] = group.effects
  return {"approximate": approximate,
          "interior_max_abs_diff": interior, "border_max_abs_diff": border,
          "activation_max_abs": scale,
          "logits_max_abs_diff": float(np.abs(logits - small).max()),
          "logits_max_abs": float(np.abs(logits).max()),
          "argmax_agreement": float(np.mean(logits.argmax(-1) == small.argmax(-1)))}


__all__ = ["Shrunk", "shrink", "prune_zeros", "check_equivalence", "measure", "fold",
           "remove"]
