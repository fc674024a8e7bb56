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
      along ``axis`` (r > 1 where a channel was flattened into a Dense input:
      its spatial copies).
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

  def _kept_mask(self, keep) -> np.ndarray:
    kept = np.ones(self.components.max() + 1 if self.components.size else 0)
    for key, channels in keep.items():
      g = self.groups[key.id if isinstance(key, Group) else int(key)]
      mask = np.zeros(g.width)
      mask[np.asarray(channels, np.int64)] = 1
      kept[g.channels] = mask
    return kept

  def predict(self, keep: Mapping[Any, Sequence[int]]) -> dict[str, int]:
    """Exact FLOPs and params of the network that keeps `keep[group]` channels.

    Every op's MACs are a product over its channel axes, so the count of any
    narrowing follows from the trace without building the network.

    Args:
      keep: ``{group id or Group: kept channel indices}``; others keep all.

    Returns:
      ``{"flops": int, "params": int}``, as :func:`jaxprune.flops.count` of the
      pruned network would give.
    """
    kept = self._kept_mask(keep)
    frac = lambda ids: float(kept[self.components[ids]].mean()) if ids.size else 1.0
    total = 0.0
    for op in self.ops:
      total += op.macs * math.prod(frac(f) for f in op.factors)
      total += op.bias_adds * math.prod(frac(f) for f in op.bias_factors)
    params = 0.0
    for leaf, (shape, is_param) in enumerate(zip(self.traced.shapes, self.traced.is_param)):
      if is_param:
        n = math.prod(shape)
        for axis in range(len(shape)):
          ids = self.leaf_ids.get((leaf, axis))
          if ids is not None:
            n *= frac(ids)
        params += n
    return {"flops": int(round(total)), "params": int(round(params))}

  @property
  def flops(self) -> int:
    return int(sum(op.flops for op in self.ops))

  @property
  def params(self) -> int:
    return int(sum(math.prod(s) for s, p in zip(self.traced.shapes, self.traced.is_param) if p))

  def __str__(self):
    head = (f"{len(self.groups)} channel groups ({len(self.prunable())} prunable, "
            f"{len(self.prunable(exact_only=True))} of them exact), "
            f"{self.flops:,} FLOPs, {self.params:,} params")
    return "\n".join([head] + [str(g) for g in self.groups])


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


_ATTENTION_QUERY = re.compile(r"^(.*?)query/kernel$")


def _tie_attention_head_dims(traced: Traced, w: Walk, leaf_ids: dict) -> None:
  """Flax attention (Linen ``MultiHeadDotProductAttention``, ``nnx.MultiHeadAttention``)
  has one ``qkv_features``: its value head dim is the query/key head dim. The data flow
  alone would let the value's be pruned apart, which the module (and NNX's
  ``jax.nn.dot_product_attention``) cannot represent, so they are one group."""
  index = {p: i for i, p in enumerate(traced.paths)}
  for path, q in index.items():
    m = _ATTENTION_QUERY.match(path)
    v = index.get(m.group(1) + "value/kernel") if m else None
    # (in, heads, head_dim), or (layers, in, heads, head_dim) stacked by nn.scan
    if (v is None or len(traced.shapes[q]) not in (3, 4)
        or traced.shapes[q] != traced.shapes[v]):
      continue
    axis = len(traced.shapes[q]) - 1
    if (q, axis) in leaf_ids and (v, axis) in leaf_ids:
      w.tie(leaf_ids[(q, axis)], leaf_ids[(v, axis)])


def _components(w: Walk) -> np.ndarray:
  if w.ties:
    a = np.concatenate([t[0] for t in w.ties])
    b = np.concatenate([t[1] for t in w.ties])
  else:
    a = b = np.zeros((0,), np.int64)
  m = scipy.sparse.coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(w.n, w.n))
  _, comp = scipy.sparse.csgraph.connected_components(m, directed=False)
  return comp


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
  w, leaf_ids, x_ids, out_ids = walk(traced)
  _tie_attention_head_dims(traced, w, leaf_ids)
  comp = _components(w)
  if w.tie_free_params(leaf_ids, comp):
    comp = _components(w)

  reasons: dict[int, str] = {}
  for ids, reason in [(x_ids, "the model's input channels"),
                      (out_ids, "reaches the model's output")] + w.blocked:
    for c in np.unique(comp[ids]):
      reasons.setdefault(int(c), reason)
  produced = np.zeros(w.n, bool)
  consumed = np.zeros(w.n, bool)
  for ids in w.producers:
    produced[ids] = True
  for ids in w.consumers:
    consumed[ids] = True
  is_channel = np.zeros(comp.max() + 1 if w.n else 0, bool)
  for (leaf, axis), ids in leaf_ids.items():
    if produced[ids[0]]:
      is_channel[comp[ids]] = True

  # Per component: its (leaf, axis, indices) slices.
  slices: dict[int, list] = {}
  for (leaf, axis), ids in sorted(leaf_ids.items()):
    comps = comp[ids]
    order = np.argsort(comps, kind="stable")
    sorted_comps = comps[order]
    bounds = np.flatnonzero(np.diff(sorted_comps)) + 1
    for chunk in np.split(order, bounds):
      c = int(comps[chunk[0]])
      if is_channel[c]:
        slices.setdefault(c, []).append((leaf, axis, chunk))

  n_comp = comp.max() + 1 if w.n else 0
  effects_of: dict[int, list[str]] = {}
  for ids, what, where in w.effects:
    for c in np.unique(comp[ids]):
      line = f"{what} at {where}" if where else what
      if line not in effects_of.setdefault(int(c), []):
        effects_of[int(c)].append(line)
  marks_of: dict[int, set] = {}
  for ids, kind in w.marks:
    for c in np.unique(comp[ids]):
      marks_of.setdefault(int(c), set()).add(kind)
  dense = {op.kernel for op in w.ops if op.kind == "dense"}

  flops_of = np.zeros(n_comp)
  for op in w.ops:  # one channel's first-order share of every op it is a factor of
    for factors, amount in ((op.factors, op.macs), (op.bias_factors, op.bias_adds)):
      for ids in factors:
        np.add.at(flops_of, comp[ids], amount / ids.size)

  by_signature: dict[tuple, list[int]] = {}
  for c, members in slices.items():
    signature = tuple((leaf, axis, len(idx)) for leaf, axis, idx in members)
    by_signature.setdefault(signature, []).append(c)

  groups = []
  for signature, comps in by_signature.items():
    first = {c: slices[c][0][2][0] for c in comps}
    comps = sorted(comps, key=lambda c: first[c])
    members, params = [], 0
    for k, (leaf, axis, r) in enumerate(signature):
      index = np.stack([np.sort(slices[c][k][2]) for c in comps])
      ids = leaf_ids[(leaf, axis)]
      role = ("producer" if produced[ids[0]] else
              "consumer" if consumed[ids[0]] else "other")
      members.append(Member(traced.paths[leaf], axis, index, role))
      if traced.is_param[leaf]:
        shape = traced.shapes[leaf]
        params += math.prod(shape) // shape[axis] * r
    reason = next((reasons[c] for c in comps if c in reasons), None)
    if reason is None:
      hit = next((m.path for m in members for p in patterns if p.search(m.path)), None)
      if hit is not None:
        reason = f"ignored ({hit})"
    effects = []
    for c in comps:
      effects += [e for e in effects_of.get(c, ()) if e not in effects]
    marks = set().union(*(marks_of.get(c, set()) for c in comps))
    groups.append(Group(id=0, width=len(comps), members=tuple(members),
                        prunable=reason is None, reason=reason,
                        flops_per_channel=float(np.mean([flops_of[c] for c in comps])),
                        params_per_channel=int(params),
                        channels=np.asarray(comps, np.int64),
                        exactness=_exactness(effects),
                        effects=tuple(effects),
                        kind=_kind(marks, [m.path for m in members if m.role == "producer"],
                                   dense)))
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
  removed: dict[tuple[str, int], set] = {}
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
      removed.setdefault((m.path, m.axis), set()).update(m.index[gone].ravel().tolist())
  out: dict[str, dict[int, np.ndarray]] = {}
  for (path, axis), gone in removed.items():
    n = sizes[path][axis]
    out.setdefault(path, {})[axis] = np.setdiff1d(np.arange(n), np.fromiter(gone, np.int64))
  return out
