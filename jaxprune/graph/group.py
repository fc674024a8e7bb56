"""Groups: the parameter slices that must be removed together, and their printout."""
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from jaxprune.errors import UserError
from jaxprune.graph.propagate import Walk, exactness as _exactness
from jaxprune.graph.tracing import Traced, trace_jaxpr


@dataclasses.dataclass(frozen=True)
class Member:
  """One parameter leaf's share of a group.

  Attributes:
    path: leaf path, e.g. ``params/conv1/kernel``.
    axis: the leaf axis the group's channels live on.
    index: int array (width, r): channel c of the group is the indices ``index[c]``
      along ``axis`` (r > 1 where a channel was flattened into a Dense input: its
      spatial copies; or where a channel is a whole GroupNorm group or head).
    role: "producer" (output features of a conv/dot_general), "consumer" (the
      contracted input axis of one) or "other" (a bias, a norm's scale, bias or
      statistics, any elementwise parameter).
  """
  path: str
  axis: int
  index: np.ndarray
  role: str

  def __repr__(self):
    span = "" if self.index.shape[1] == 1 else f" x{self.index.shape[1]}"
    return f"{self.path}[axis {self.axis}{span}] ({self.role})"


@dataclasses.dataclass
class Group:
  """Channels that must be removed together: removing channel c removes ``index[c]``
  along ``axis`` of every member.

  Attributes:
    id: position in :attr:`Graph.groups`.
    width: number of channels.
    members: the parameter slices.
    prunable: whether the group may be narrowed.
    reason: why not, when it may not.
    flops_per_channel: FLOPs per example that one channel costs (first order:
      its share of every conv/dot_general it enters or leaves, and of their
      bias adds).
    params_per_channel: trainable parameter entries one channel holds.
    exactness: what removing channels does to the function. "exact": a removed
      channel and a zeroed one give the same outputs; "compensated": surgery makes
      it so (e.g. a scale folded into a kernel); "approximate": the function
      changes (a mean or max over the channels, e.g. LayerNorm or RMSNorm
      statistics, weight standardisation, a softmax over features; a scale
      computed from the width, e.g. attention's 1/sqrt(head_dim)): fine-tune after.
      GroupNorm's statistics are exact: its channels go a whole norm group at a
      time (a channel of the group is one GroupNorm group).
    effects: why, one line per op: what changes and where (module path or
      source line).
    kind: what the channels are: "heads" (whole attention heads; under
      grouped-query attention a KV head with its query heads), "head_dim",
      "residual" (a residual stream, with its embedding tables), "embedding",
      "tied_lm_head" (the vocabulary of an embedding table that is also the
      output layer), "mlp" (a dense layer's hidden width) or "channels"
      (convolutions).
  """
  id: int
  width: int
  members: tuple[Member, ...]
  prunable: bool
  reason: str | None
  flops_per_channel: float
  params_per_channel: int
  channels: np.ndarray = dataclasses.field(repr=False, default=None)  # component per channel
  exactness: str = "exact"
  effects: tuple[str, ...] = ()
  kind: str = "channels"

  @property
  def producers(self) -> list[str]:
    return [m.path for m in self.members if m.role == "producer"]

  @property
  def consumers(self) -> list[str]:
    return [m.path for m in self.members if m.role == "consumer"]

  def __str__(self):
    state = (f"prunable, {self.exactness}" if self.prunable else f"fixed: {self.reason}")
    lines = [f"group {self.id} ({self.kind}): {self.width} channels, {state}; per channel "
             f"{self.flops_per_channel:,.0f} FLOPs, {self.params_per_channel:,} params"]
    if self.prunable:
      lines += [f"    {self.exactness}: {e}" for e in self.effects]
    lines += [f"    {m!r}" for m in self.members]
    return "\n".join(lines)


@dataclasses.dataclass
class Graph:
  """The channel dependency graph of one model (see :func:`trace`)."""
  groups: list[Group]
  traced: Traced
  ops: list
  round_to: int = 1
  components: np.ndarray = dataclasses.field(repr=False, default=None)
  leaf_ids: dict = dataclasses.field(repr=False, default=None)

  def prunable(self, exact_only: bool = False) -> list[Group]:
    """The groups that may be narrowed (`exact_only`: only exact or compensated ones)."""
    return [g for g in self.groups
            if g.prunable and not (exact_only and g.exactness == "approximate")]

  _counts: Any = dataclasses.field(repr=False, default=None, compare=False, init=False)

  def _kept_mask(self, keep) -> np.ndarray:
    kept = np.ones(self._plan().n_comp)
    for key, channels in keep.items():
      g = self.groups[key.id if isinstance(key, Group) else int(key)]
      mask = np.zeros(g.width)
      mask[np.asarray(channels, np.int64)] = 1
      kept[g.channels] = mask
    return kept

  def _plan(self) -> "_Counts":
    if self._counts is None:
      self._counts = _Counts(self)
    return self._counts

  def predict(self, keep: Mapping[Any, Sequence[int]]) -> dict[str, int]:
    """Exact FLOPs and params of the network that keeps `keep[group]` channels.

    Every op's MACs are a product over its channel axes, so the count of any
    narrowing follows from the trace without building the network: one sparse
    product gives each factor's kept fraction, a few array products each op's and
    each leaf's share.

    Args:
      keep: ``{group id or Group: kept channel indices}``; others keep all.

    Returns:
      ``{"flops": int, "params": int}``, as :func:`jaxprune.flops.count` of the
      pruned network would give.
    """
    return self._plan().count(self._kept_mask(keep))

  @property
  def flops(self) -> int:
    return int(sum(op.flops for op in self.ops))

  @property
  def params(self) -> int:
    return int(sum(math.prod(s) for s, p in zip(self.traced.shapes, self.traced.is_param) if p))

  def __str__(self):
    head = (f"{len(self.groups)} channel groups ({len(self.prunable())} prunable, "
            f"{len(self.prunable(exact_only=True))} of them exact or compensated), "
            f"{self.flops:,} FLOPs, {self.params:,} params")
    loops = sorted({op.note for op in self.ops if getattr(op, "note", "")})
    return "\n".join([head] + [f"FLOPs not exact: {n}" for n in loops]
                     + [str(g) for g in self.groups])


class _Counts:
  """What :meth:`Graph.predict` needs, precomputed once per graph.

  Every factor (an op's channel axis, a parameter's tracked axis) is a row of a sparse
  (factors x components) matrix of id counts, so ``matrix @ kept`` is each factor's
  kept-id count and that over its size its kept fraction (what the mean of the kept
  flags over its ids was). An op's FLOPs multiply its MACs by its factors' fractions in
  order, a leaf's params its entries by its axes' fractions in axis order, and the sums
  run in op and leaf order: the same floating-point operations as one op at a time.
  """

  def __init__(self, graph: "Graph"):
    comp = graph.components
    self.n_comp = int(comp.max()) + 1 if comp is not None and comp.size else 0
    rows, cols, sizes = [], [], []

    def factor(ids) -> int:
      ids = np.asarray(ids).ravel()
      rows.append(np.full(ids.size, len(sizes), np.int64))
      cols.append(comp[ids].astype(np.int64))
      sizes.append(ids.size)
      return len(sizes) - 1

    def table(lists) -> np.ndarray:  # factor indices, -1 padded
      out = np.full((len(lists), max((len(l) for l in lists), default=0)), -1, np.int64)
      for i, l in enumerate(lists):
        out[i, :len(l)] = l
      return out

    self.macs = np.asarray([float(op.macs) for op in graph.ops], np.float64)
    self.bias_adds = np.asarray([float(op.bias_adds) for op in graph.ops], np.float64)
    self.op_factors = table([[factor(f) for f in op.factors] for op in graph.ops])
    self.bias_factors = table([[factor(f) for f in op.bias_factors] for op in graph.ops])
    leaves, leaf_factors = [], []
    for leaf, (shape, is_param) in enumerate(zip(graph.traced.shapes, graph.traced.is_param)):
      if is_param:
        leaves.append(float(math.prod(shape)))
        leaf_factors.append([factor(graph.leaf_ids[(leaf, axis)]) for axis in range(len(shape))
                             if (leaf, axis) in graph.leaf_ids])
    self.entries = np.asarray(leaves, np.float64)
    self.leaf_factors = table(leaf_factors)
    self.sizes = np.asarray(sizes, np.float64)
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    self.matrix = scipy.sparse.csr_matrix(
        (np.ones(rows.size), (rows, cols)), shape=(len(sizes), self.n_comp))

  @staticmethod
  def _product(start: np.ndarray, fracs: np.ndarray, factors: np.ndarray) -> np.ndarray:
    out = start.copy()
    for k in range(factors.shape[1]):  # left to right, as math.prod over the factors
      column = factors[:, k]
      out *= np.where(column >= 0, fracs[column], 1.0)
    return out

  def count(self, kept: np.ndarray) -> dict[str, int]:
    with np.errstate(invalid="ignore", divide="ignore"):
      fracs = np.where(self.sizes > 0, (self.matrix @ kept) / self.sizes, 1.0)
    macs = self._product(self.macs, fracs, self.op_factors)
    adds = self._product(self.bias_adds, fracs, self.bias_factors)
    total = 0.0
    for m, b in zip(macs.tolist(), adds.tolist()):
      total += m
      total += b
    params = 0.0
    for n in self._product(self.entries, fracs, self.leaf_factors).tolist():
      params += n
    return {"flops": int(round(total)), "params": int(round(params))}

def walk(traced: Traced) -> tuple[Walk, dict, np.ndarray, np.ndarray]:
  """Runs the propagation over a traced model.

  Returns the walk, ``leaf_ids[(leaf, axis)] = fresh ids`` and the ids of the
  input's channel axis and of the outputs' tracked axes.
  """
  w = Walk(traced.paths)
  jaxpr = traced.jaxpr.jaxpr
  labels, leaf_ids = [], {}
  for i, shape in enumerate(traced.shapes):
    label = w.fresh_label(shape)
    for (axis,), ids in label.items():
      leaf_ids[(i, axis)] = ids
    labels.append(label)
  # Every floating input's last axis is channels; integer inputs (token ids) have none.
  x_labels, all_x_ids = [], []
  for x_shape, x_dtype in zip(traced.input_shapes, traced.input_dtypes):
    if len(x_shape) > 1 and jnp.issubdtype(x_dtype, jnp.inexact):
      ids = w.fresh((x_shape[-1],))
      all_x_ids.append(ids)
      x_labels.append({(len(x_shape) - 1,): ids} if x_shape[-1] > 1 else {})
    else:
      x_labels.append({})
  x_ids = np.concatenate(all_x_ids) if all_x_ids else np.zeros((0,), np.int64)
  origins = list(range(len(traced.shapes))) + [None] * len(x_labels)
  out_labels, _, _ = w.run(jaxpr, labels + x_labels, origins, [None] * len(origins))
  out_ids = [ids.ravel() for l in out_labels for ids in l.values()]
  out_ids = np.concatenate(out_ids) if out_ids else np.zeros((0,), np.int64)
  return w, leaf_ids, x_ids, out_ids


def _tie_attention_head_dims(w: Walk) -> None:
  """Attention modules have one head_dim for q, k and v (Flax's ``qkv_features``,
  ``jax.nn.dot_product_attention``'s (..., heads, head_dim) operands, most hand-written
  ones): the data flow alone would let the value's be pruned apart, which they cannot
  represent, so it is one group with the query/key head_dim. Found by structure
  (:meth:`Walk._value_head_dim`: scores q.k -> softmax -> their product with v), so any
  projection names (and none) are covered; a value head_dim of another size stays its
  own group."""
  for q_ids, v_ids, _ in w.value_head_dims:
    w.tie(q_ids, v_ids)


def _components(w: Walk) -> np.ndarray:
  if w.ties:
    a = np.concatenate([t[0] for t in w.ties])
    b = np.concatenate([t[1] for t in w.ties])
  else:
    a = b = np.zeros((0,), np.int64)
  m = scipy.sparse.coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(w.n, w.n))
  _, comp = scipy.sparse.csgraph.connected_components(m, directed=False)
  return comp


def channels(traced: Traced) -> tuple[Walk, dict, np.ndarray, np.ndarray, np.ndarray]:
  """The walk of :func:`walk` with its ties complete, and the component (channel) of
  every id: ``(walk, leaf_ids, x_ids, out_ids, components)``."""
  w, leaf_ids, x_ids, out_ids = walk(traced)
  _tie_attention_head_dims(w)
  comp = _components(w)
  if w.tie_free_params(leaf_ids, comp):
    comp = _components(w)
  return w, leaf_ids, x_ids, out_ids, comp

def _first_hit(comp: np.ndarray, n_comp: int, lists) -> np.ndarray:
  """Per component, the index of the first entry of `lists` (ids arrays) that holds
  one of its ids, -1 for none."""
  first = np.full(n_comp, -1, np.int64)
  for i, ids in enumerate(lists):
    cs = comp[ids].ravel()
    first[cs[first[cs] < 0]] = i
  return first


def _pairs(comp: np.ndarray, lists) -> tuple[np.ndarray, np.ndarray]:
  """(entry, component) for every component that entry i of `lists` touches."""
  entries, comps = [], []
  for i, ids in enumerate(lists):
    cs = np.unique(comp[ids])
    entries.append(np.full(cs.size, i, np.int64))
    comps.append(cs)
  if not entries:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  return np.concatenate(entries), np.concatenate(comps).astype(np.int64)


def _signatures(keys_of_runs: np.ndarray, run_start: np.ndarray, n_runs: np.ndarray):
  """Groups rows of variable length exactly: row i is
  ``keys_of_runs[run_start[i]:run_start[i] + n_runs[i]]``. Returns (label per row,
  number of labels); equal rows, and only those, share a label."""
  label = np.zeros(n_runs.size, np.int64)
  n = 0
  for length in np.unique(n_runs):
    rows = np.flatnonzero(n_runs == length)
    table = keys_of_runs[run_start[rows][:, None] + np.arange(length)]
    _, inverse = np.unique(table, axis=0, return_inverse=True)
    label[rows] = inverse.ravel() + n
    n += int(inverse.max()) + 1
  return label, n


def _assemble(traced: Traced, w: Walk, comp: np.ndarray, leaf_ids: dict, x_ids: np.ndarray,
              out_ids: np.ndarray, patterns: list) -> list[Group]:
  """The groups of a walk, in the order of the components' first leaf axis (numpy over
  all channels at once: a channel is a component; channels whose members have the same
  (leaf, axis, copies) are one group)."""
  n_comp = int(comp.max()) + 1 if w.n else 0
  reason_list = [(x_ids, "the model's input channels"),
                 (out_ids, "reaches the model's output")] + list(w.blocked)
  reason_of = _first_hit(comp, n_comp, [ids for ids, _ in reason_list])
  produced = np.zeros(w.n, bool)
  consumed = np.zeros(w.n, bool)
  for ids in w.producers:
    produced[ids] = True
  for ids in w.consumers:
    consumed[ids] = True
  is_channel = np.zeros(n_comp, bool)
  for (leaf, axis), ids in leaf_ids.items():
    if produced[ids[0]]:
      is_channel[comp[ids]] = True

  # Every channel id of every leaf axis: (key, position, component), sorted by
  # component, then leaf axis, then position; a run is one component on one leaf axis.
  keys = sorted(leaf_ids)
  parts = []
  for k, key in enumerate(keys):
    cs = comp[leaf_ids[key]]
    pos = np.flatnonzero(is_channel[cs])
    parts.append((np.full(pos.size, k, np.int64), pos, cs[pos].astype(np.int64)))
  if not parts or not sum(p[1].size for p in parts):
    return []
  K, P, C = (np.concatenate(a) for a in zip(*parts))
  order = np.lexsort((P, K, C))
  K, P, C = K[order], P[order], C[order]
  new_run = np.ones(K.size, bool)
  new_run[1:] = (K[1:] != K[:-1]) | (C[1:] != C[:-1])
  run_start = np.flatnonzero(new_run)
  run_len = np.diff(np.append(run_start, K.size))
  run_K, run_C = K[run_start], C[run_start]
  new_comp = np.ones(run_C.size, bool)
  new_comp[1:] = run_C[1:] != run_C[:-1]
  first_run = np.flatnonzero(new_comp)          # per channel component: its first run
  n_runs = np.diff(np.append(first_run, run_C.size))
  comps = run_C[first_run]                      # the channel components, ascending
  elem_start = run_start[first_run]             # their first element
  # A component's signature: its (leaf axis, copies) per run.
  label, n_sig = _signatures(run_K * (int(run_len.max()) + 1) + run_len, first_run, n_runs)
  # The groups in the order of the per-channel loop this replaces: by the first leaf
  # axis of the signature, then the smallest component.
  sig_first_comp = np.full(n_sig, n_comp, np.int64)
  np.minimum.at(sig_first_comp, label, comps)
  sig_key = np.empty(n_sig, np.int64)
  sig_key[label] = run_K[first_run]
  sig_order = np.lexsort((sig_first_comp, sig_key))

  # Per group: its components, ordered by their first position on the first leaf axis.
  by_label = np.lexsort((P[elem_start], label))
  bounds = np.searchsorted(label[by_label], np.arange(n_sig + 1))
  group_comps = [by_label[bounds[s]:bounds[s + 1]] for s in sig_order]  # rows of comps
  group_of = np.full(n_comp, -1, np.int64)
  rank = np.zeros(n_comp, np.int64)
  for gi, rows in enumerate(group_comps):
    group_of[comps[rows]] = gi
    rank[comps[rows]] = np.arange(rows.size)

  # Effects: per group, each line once, in the order of its first channel's list.
  lines, line_id = [], {}
  for ids, what, where in w.effects:
    line = f"{what} at {where}" if where else what
    lines.append(line_id.setdefault(line, len(line_id)))
  line_text = list(line_id)
  e_entry, e_comp = _pairs(comp, [ids for ids, _, _ in w.effects])
  e_group = group_of[e_comp]
  keep = e_group >= 0
  e_entry, e_comp, e_group = e_entry[keep], e_comp[keep], e_group[keep]
  e_line = np.asarray(lines, np.int64)[e_entry]
  e_rank = rank[e_comp]
  o = np.lexsort((e_entry, e_rank, e_line, e_group))
  first = np.ones(o.size, bool)
  first[1:] = (e_group[o][1:] != e_group[o][:-1]) | (e_line[o][1:] != e_line[o][:-1])
  o = o[first]
  o = o[np.lexsort((e_entry[o], e_rank[o], e_group[o]))]
  effects_of: dict[int, list[str]] = {}
  for gi, li in zip(e_group[o].tolist(), e_line[o].tolist()):
    effects_of.setdefault(gi, []).append(line_text[li])
  marks_of: dict[int, set] = {}
  for ids, kind in w.marks:
    for gi in np.unique(group_of[np.unique(comp[ids])]).tolist():
      if gi >= 0:
        marks_of.setdefault(gi, set()).add(kind)
  dense = {op.kernel for op in w.ops if op.kind == "dense"}

  flops_of = np.zeros(n_comp)
  for op in w.ops:  # one channel's first-order share of every op it is a factor of
    for factors, amount in ((op.factors, op.macs), (op.bias_factors, op.bias_adds)):
      for ids in factors:
        np.add.at(flops_of, comp[ids], amount / ids.size)

  groups = []
  for gi, rows in enumerate(group_comps):
    cs = comps[rows]
    first_row = rows[0]
    span = elem_start[rows][:, None] + np.arange(
        run_len[first_run[first_row]:first_run[first_row] + n_runs[first_row]].sum())
    positions = P[span]
    members, params, offset = [], 0, 0
    for run in range(first_run[first_row], first_run[first_row] + n_runs[first_row]):
      leaf, axis = keys[run_K[run]]
      r = int(run_len[run])
      index = np.ascontiguousarray(positions[:, offset:offset + r])
      offset += r
      ids = leaf_ids[(leaf, axis)]
      role = ("producer" if produced[ids[0]] else
              "consumer" if consumed[ids[0]] else "other")
      members.append(Member(traced.paths[leaf], axis, index, role))
      if traced.is_param[leaf]:
        shape = traced.shapes[leaf]
        params += math.prod(shape) // shape[axis] * r
    hits = reason_of[cs]
    hit = np.flatnonzero(hits >= 0)
    reason = reason_list[hits[hit[0]]][1] if hit.size else None
    if reason is None:
      hit = next((m.path for m in members for p in patterns if p.search(m.path)), None)
      if hit is not None:
        reason = f"ignored ({hit})"
    effects = effects_of.get(gi, [])
    groups.append(Group(id=0, width=int(cs.size), members=tuple(members),
                        prunable=reason is None, reason=reason,
                        flops_per_channel=float(np.mean(flops_of[cs])),
                        params_per_channel=int(params),
                        channels=cs.astype(np.int64),
                        exactness=_exactness(effects),
                        effects=tuple(effects),
                        kind=_kind(marks_of.get(gi, set()),
                                   [m.path for m in members if m.role == "producer"], dense)))
  return groups


def trace(model, variables, input_shape: Sequence[int], call: Callable | None = None, *,
          ignore: Sequence[str] | str = (), round_to: int = 1,
          batched: bool | None = None) -> Graph:
  """The channel dependency graph of `model`.

  Args:
    model: a Linen module, an ``nnx.Module`` or a function ``f(params, x)``.
    variables: the Linen variables (concrete or ``jax.ShapeDtypeStruct``), None
      for NNX, the params of a function.
    input_shape: one example's shape, e.g. (32, 32, 3).
    call: NNX ``call(module, x)`` / Linen ``call(variables, x)`` for a forward
      that needs more than x (default ``module(x)`` in eval mode /
      ``model.apply(variables, x[, train=False])``).
    ignore: leaf-path regular expressions; a group with a member that matches
      is not prunable (e.g. ``r"head/"`` to keep a layer's outputs).
    round_to: kept widths a multiple of this (used by pruners).
    batched: whether `input_shape` starts with a batch of 1 (None guesses).

  Returns:
    A :class:`Graph`. ``print(graph)`` lists every group with its members.

  Example:
    >>> g = graph.trace(model, variables, (32, 32, 3))
    >>> print(g.prunable()[0])
  """
  if round_to < 1:
    raise UserError(f"round_to must be >= 1, got {round_to}")
  ignore = [ignore] if isinstance(ignore, str) else list(ignore)
  patterns = [re.compile(p) for p in ignore]
  traced = trace_jaxpr(model, variables, input_shape, call, batched=batched)
  w, leaf_ids, x_ids, out_ids, comp = channels(traced)
  groups = _assemble(traced, w, comp, leaf_ids, x_ids, out_ids, patterns)
  # Call order: by the first op that produces the group, then the channel index.
  first_op = {}
  for i, op in enumerate(w.ops):
    first_op.setdefault(op.kernel, i)
  groups.sort(key=lambda g: (min(first_op.get(p, len(w.ops)) for p in g.producers),
                             int(g.members[0].index.min())))
  for i, g in enumerate(groups):
    g.id = i
  return Graph(groups=groups, traced=traced, ops=w.ops, round_to=round_to,
               components=comp, leaf_ids=leaf_ids)


def _kind(marks: set, producers: list[str], dense: set) -> str:
  if "vocabulary" in marks and producers:
    return "tied_lm_head"  # an embedding table's rows used as the output layer too
  for kind in ("heads", "head_dim", "residual", "embedding"):
    if kind in marks:
      return kind
  return "mlp" if any(p in dense for p in producers) else "channels"


def kept_slices(graph: Graph, keep: Mapping[Any, Sequence[int]]) -> dict[str, dict[int, np.ndarray]]:
  """Per-leaf kept indices for keeping `keep[group]` channels of each named group.

  Args:
    graph: from :func:`trace`.
    keep: ``{group id or Group: kept channel indices (0..width-1)}``; groups not
      named keep every channel.

  Returns:
    ``{leaf path: {axis: sorted kept indices along axis}}`` for every leaf axis
    that loses something.

  Raises:
    UserError: for an unknown or unprunable group, an index out of range, or a
      group left with no channel.
  """
  removed: dict[tuple[str, int], list] = {}
  sizes = dict(zip(graph.traced.paths, graph.traced.shapes))
  for key, kept in keep.items():
    gid = key.id if isinstance(key, Group) else int(key)
    if not 0 <= gid < len(graph.groups):
      raise UserError(f"no group {gid}: the graph has {len(graph.groups)} groups")
    g = graph.groups[gid]
    kept = np.unique(np.asarray(kept, np.int64))
    if kept.size and (kept.min() < 0 or kept.max() >= g.width):
      raise UserError(f"group {gid} has channels 0..{g.width - 1}; got {kept.tolist()}")
    if kept.size == g.width:
      continue
    if not g.prunable:
      raise UserError(f"group {gid} cannot be pruned: {g.reason}")
    if kept.size == 0:
      raise UserError(f"group {gid} would keep no channel; keep at least one")
    gone = np.setdiff1d(np.arange(g.width), kept)
    for m in g.members:
      removed.setdefault((m.path, m.axis), []).append(m.index[gone].ravel())
  out: dict[str, dict[int, np.ndarray]] = {}
  for (path, axis), gone in removed.items():  # a mask per leaf axis (no Python ints)
    mask = np.ones(sizes[path][axis], bool)
    mask[np.concatenate(gone)] = False
    out.setdefault(path, {})[axis] = np.flatnonzero(mask).astype(np.int64)
  return out
