"""Channel propagation through a jaxpr: a small rule per primitive ties indices that go together.

A primitive without a rule blocks the channels it touches, never guesses (docs/design/graph.md).
"""
import dataclasses
import math
import operator
import warnings

import jax.extend as jex
import numpy as np

from jaxprune.graph import interpret

Label = dict  # {tuple of axes (sorted): np.ndarray of ids}

CONST = -1  # origin of a value computed from constants only

ELEMENTWISE = frozenset("""
add sub mul div max min pow atan2 rem and or xor not eq ne lt le gt ge select_n clamp
nextafter add_any neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh
logistic sin cos tan asin acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt
integer_pow square abs erf erfc erf_inv lgamma digamma igamma convert_element_type copy
copy_p reduce_precision real imag conj sharding_constraint mesh_cast reshard
optimization_barrier stop_gradient
""".split())
NONZERO_AT_ZERO = frozenset("exp exp2 cos cosh logistic erfc log rsqrt acos ne not "
                            "lgamma digamma".split())
SHAPE_ONLY = interpret.SHAPE_ONLY
REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or "
                       "reduce_xor argmax argmin".split())
CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
WINDOWED = frozenset("reduce_window_sum reduce_window_max reduce_window_min "
                     "reduce_window".split())


@dataclasses.dataclass
class Op:
  """One conv or ``dot_general`` of the forward pass, for the FLOPs count.

  The op's multiply-accumulates are proportional to the kept fraction of each
  array in ``factors`` (the contracted channel axis, the output channel axes),
  its bias adds to that of each array in ``bias_factors``; each array holds the
  channel ids along that axis. So the FLOPs of any narrowing follow exactly.
  """
  kind: str            # "conv", "dense" (one operand is a parameter) or "dot"
  name: str            # the parameter operand's leaf path without "/kernel", or the primitive
  kernel: str | None   # leaf path of the parameter operand
  in_shape: tuple
  out_shape: tuple
  kernel_shape: tuple
  macs: int
  bias_adds: int = 0
  factors: list = dataclasses.field(default_factory=list)
  bias_factors: list = dataclasses.field(default_factory=list)
  # Why ``macs`` is not exact ("" when it is): e.g. inside a while_loop whose trip count
  # is unknown before running, counted for one iteration.
  note: str = ""

  @property
  def flops(self) -> int:
    return self.macs + self.bias_adds


class LoopCountWarning(UserWarning):
  """A FLOPs count that is a lower bound: a loop whose trip count is unknown before
  running was counted for one iteration."""


class Fold(str):
  """An effect line whose change surgery undoes: a literal scale ``s(n)`` of a product of
  two activations over ``n`` channels (attention's ``1/sqrt(head_dim)``: ``power`` -0.5;
  None for another expression of ``n``, or a literal that may be one). The masked
  original computes ``s(n0) q.k`` over the kept channels, the pruned network
  ``s(n1) q.k``; multiplying
  the query projection (its ``leaves``: kernel and bias) by ``s(n0) / s(n1)`` makes them
  equal. ``op`` is the contraction's index in :attr:`Walk.ops`, ``scale`` the literal
  product found there (``s(n0)``): :attr:`Walk.scale_at` of the pruned network gives
  ``s(n1)`` at the same index (unchanged when the scale is a configured constant).
  A ``str``, so a group's ``effects`` stay lines of text."""
  leaves: tuple = ()
  leaf_ids: tuple = ()
  power: float | None = None  # None: not a clean power of the width
  op: int = -1
  scale: float = 1.0


def exactness(effects) -> str:
  """"approximate" when an effect is not undone by surgery, "compensated" when every
  one is a :class:`Fold`, "exact" when there is none."""
  if any(not isinstance(e, Fold) for e in effects):
    return "approximate"
  return "compensated" if effects else "exact"


def _is_literal(v) -> bool:
  return isinstance(v, jex.core.Literal)


def _shape(v) -> tuple:
  return tuple(getattr(v.aval, "shape", ()))


class _Origins:
  """The origins of one level's values (read-only view of the walker's env)."""

  def __init__(self, env):
    self.env = env

  def get(self, var, default=None):
    value = self.env.get(var)
    return default if value is None else value[1]


class Walk(interpret.Interpreter):
  """Walks a jaxpr once, collecting ties, blocked ids, producers, consumers and ops;
  an abstract client of the shared walker (:class:`jaxprune.graph.interpret.Interpreter`)."""
  prune_dead = True

  def __init__(self, leaf_names: list[str]):
    self.leaf_names = leaf_names
    self.n = 0
    self.ties: list[tuple[np.ndarray, np.ndarray]] = []
    self.blocked: list[tuple[np.ndarray, str]] = []
    self.producers: list[np.ndarray] = []
    self.consumers: list[np.ndarray] = []
    self.ops: list[Op] = []
    # One line per loop whose ops are counted for one iteration (see :meth:`while_loop`).
    self.loops: list[str] = []
    # (ids, what, where): channels whose removal changes the function (a mean or a
    # max over them, a scale computed from their count), see :meth:`effect`.
    self.effects: list[tuple[np.ndarray, str, str]] = []
    # (ids, kind): what the channels are in a transformer ("heads", "head_dim",
    # "residual", "embedding"), from how the jaxpr uses them.
    self.marks: list[tuple[np.ndarray, str]] = []
    self._users: dict = {}
    self._defs: dict = {}
    self._origin: dict = {}
    self._depth = 0
    self._eqn = None
    self._live: set = set()  # the variables of the jaxpr being walked that are used
    # {index in ops: product of the literal scales next to an attention contraction}
    self.scale_at: dict[int, float] = {}
    # {leaf: ops that combine it with an activation}: a kernel used once can take a fold.
    self.leaf_uses: dict[int, int] = {}
    # {module scope (Linen name stack without the root): [channel ids of an activation's
    # last axis entering that scope]}, for :meth:`tie_free_params`.
    self.scope_inputs: dict[str, list[np.ndarray]] = {}
    self.taps: list[np.ndarray] = []  # conv kernels' spatial axes: never channels
    # (query head_dim ids, value head_dim ids, where) of each attention: scores q.k, a
    # softmax, then their product with v (see :meth:`_value_head_dim`).
    self.value_head_dims: list[tuple[np.ndarray, np.ndarray, str]] = []
    self._scores: dict = {}  # {q.k product's output variable: its head_dim ids}
    self._scores_by_ids: dict = {}  # {its heads' ids: its head_dim ids}

  # --- bookkeeping -------------------------------------------------------------------
  def fresh(self, shape) -> np.ndarray:
    size = math.prod(shape)
    ids = np.arange(self.n, self.n + size, dtype=np.int64).reshape(shape)
    self.n += size
    return ids

  def tie(self, a: np.ndarray, b: np.ndarray):
    a, b = np.broadcast_arrays(a, b)
    self.ties.append((a.ravel(), b.ravel()))

  def block(self, label: Label, reason: str):
    for ids in label.values():
      self.blocked.append((ids.ravel(), reason))

  def effect(self, label: Label, what: str):
    """Removing these channels is not the same as zeroing them: `what` changes."""
    for ids in label.values():
      self.effects.append((ids.ravel(), what, _where(self._eqn)))

  def mark(self, label: Label, kind: str):
    for ids in label.values():
      self.marks.append((ids.ravel(), kind))

  def fresh_label(self, shape) -> Label:
    return {(a,): self.fresh((n,)) for a, n in enumerate(shape) if n > 1}

  # --- label algebra -----------------------------------------------------------------
  def merge(self, labels, shapes, out_shape, what: str, origins=None) -> Label:
    """Elementwise: ids at the same position of same-shaped operands are tied.

    With `origins`, ids on an axis that an activation operand has at full size but
    without ids (token or spatial positions, or channels the graph stopped
    following), or that a constant has at full size (not broadcast: a table computed
    from the configuration), are blocked: removing them would leave that operand's
    axis whole. This keeps a learned position embedding's token axis out of the
    channels.
    """
    out: Label = {}
    if origins is not None:
      invars = self._eqn.invars if len(self._eqn.invars) == len(labels) else [None] * len(labels)
      untracked = [{a for a in range(len(s)) if s[a] > 1 and _facet(l, a) is None}
                   - self._broadcast_axes(v) if o in (None, CONST) else set()
                   for l, s, o, v in zip(labels, shapes, origins, invars)]
      for label, shape in zip(labels, shapes):  # blocked, they still flow on
        for axes, ids in label.items():
          hit = next((o for s, u, o in zip(shapes, untracked, origins) if len(s) == len(shape)
                      and any(s[a] == shape[a] and a in u for a in axes)), False)
          if hit is None:
            self.block({axes: ids}, f"'{what}' with an activation's token or spatial "
                       "axis (positions are not channels)")
          elif hit == CONST:
            n = ", ".join(str(shape[a]) for a in axes)
            self.block({axes: ids}, f"'{what}' with a constant of width {n}, computed from "
                       f"the configuration or a constant, at {_where(self._eqn)}")
    for label, shape in zip(labels, shapes):
      if not label:
        continue
      if len(shape) != len(out_shape):
        self.block(label, f"{what} with operands of different rank")
        continue
      for axes, ids in label.items():
        keep = [i for i, a in enumerate(axes) if shape[a] == out_shape[a]]
        if len(keep) < len(axes):  # broadcast from size 1: no channel there
          ids = ids[tuple(slice(None) if i in keep else 0 for i in range(len(axes)))]
          axes = tuple(axes[i] for i in keep)
          if not axes:
            continue
        self._put(out, axes, ids, what)
    return out

  def _put(self, out: Label, axes, ids, what):
    if axes in out:
      self.tie(out[axes], ids)
      return
    overlap = [k for k in out if set(k) & set(axes)]
    if overlap:
      for k in overlap:
        self.block({k: out.pop(k)}, f"{what} mixes channel axes laid out differently")
      self.block({axes: ids}, f"{what} mixes channel axes laid out differently")
      return
    out[axes] = ids

  def remap(self, label: Label, axis_map: dict, what: str, coarsen: bool) -> Label:
    """Moves facets to new axes (``axis_map[old] = new``); unmapped axes disappear.

    A facet that loses some but not all of its axes is coarsened when `coarsen`
    (its ids along the lost axes become one channel: a whole attention head) and
    blocked otherwise (a reduction over part of a split channel axis, GroupNorm).
    """
    out: Label = {}
    for axes, ids in label.items():
      kept = [i for i, a in enumerate(axes) if a in axis_map]
      if len(kept) == len(axes):
        self._put_sorted(out, [axis_map[a] for a in axes], ids, what)
      elif kept:
        if not coarsen:
          self.block({axes: ids}, f"{what} over part of a split channel axis")
          continue
        first = ids[tuple(slice(None) if i in kept else slice(0, 1) for i in range(len(axes)))]
        self.tie(ids, first)
        first = first.reshape([ids.shape[i] for i in kept])
        self._put_sorted(out, [axis_map[axes[i]] for i in kept], first, what)
    return out

  def _put_sorted(self, out, new_axes, ids, what):
    order = np.argsort(new_axes)
    self._put(out, tuple(int(new_axes[i]) for i in order), np.transpose(ids, order), what)

  # --- the walk ----------------------------------------------------------------------
  def run(self, jaxpr, labels, origins, counted, live_outs=None):
    """Walks `jaxpr`; returns the (labels, origins, counted ops) of its outputs.

    Only the eqns that an output in `live_outs` (default: every output) depends on, or
    that have effects, are walked: dead code -- also inside a nested ``jit``, whose
    unused outputs are dead in the caller -- is neither counted nor part of the graph
    (see :func:`jaxprune.graph.interpret.liveness`)."""
    results, _ = self.eval_jaxpr(jaxpr, (), list(zip(labels, origins, counted)),
                                 live_outs=live_outs)
    return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]

  # The shared walker's hooks: a value is (label, origin, counted op).
  def enter(self, frame):
    frame.data = self._users, self._defs, self._origin, self._live
    self._users, self._defs = {}, {}
    self._origin, self._live = _Origins(frame.env), frame.live_vars
    self._depth += 1
    for i, eqn in enumerate(frame.jaxpr.eqns):
      if not frame.live[i]:
        continue
      for v in eqn.invars:
        if not _is_literal(v):
          self._users.setdefault(v, []).append(eqn)
      for v in eqn.outvars:
        self._defs[v] = eqn

  def leave(self, frame):
    self._users, self._defs, self._origin, self._live = frame.data
    self._depth -= 1
    if not self._depth:
      self._check_folds()

  def read(self, frame, v):
    if _is_literal(v):
      return {}, CONST, None
    return frame.env.get(v, ({}, CONST, None))

  def equation(self, frame, i, eqn, vals, tags):
    outs = self.eqn(eqn, [i[0] for i in vals], [i[1] for i in vals], [i[2] for i in vals])
    return outs, [None] * len(eqn.outvars)

  def _check_folds(self):
    """A fold scales its leaves everywhere they are used: only where this product is
    their one use (no shared or tied weights) does it change nothing else."""
    for i, (ids, what, where) in enumerate(self.effects):
      if isinstance(what, Fold) and any(self.leaf_uses.get(l, 0) != 1 for l in what.leaf_ids):
        text = what.split(": the pruned width", 1)[0]
        self.effects[i] = (ids, f"{text} (not folded: the projection's parameters are "
                           "not read by this product alone)", "")

  def eqn(self, eqn, labels, origins, counted):
    name = eqn.primitive.name
    shapes = [_shape(v) for v in eqn.invars]
    out_shapes = [_shape(v) for v in eqn.outvars]
    # A value is "a parameter" when it only depends on parameters and constants.
    if any(o is None for o in origins):
      origin = None
    else:
      origin = next((o for o in origins if o != CONST), CONST)
    self._eqn_origins = origins
    self._eqn = eqn
    self._record_scope_inputs(eqn, labels, origins, shapes)
    if name == "scan":
      return self.scan(eqn, labels, origins, counted)
    if name == "while":
      return self.while_loop(eqn, labels, origins, counted)
    body = interpret.call_body(eqn)
    if body is not None:
      live_outs = [v in self._live for v in eqn.outvars]
      return list(zip(*self.run(body.jaxpr, labels, origins, counted, live_outs)))
    if name == "cond":
      return self.cond(eqn, labels, origins, counted)
    if None in origins:
      for o in set(origins):
        if o is not None and o != CONST:
          self.leaf_uses[o] = self.leaf_uses.get(o, 0) + 1
    rule = getattr(self, "rule_" + name, None)
    if rule is not None:
      out_labels = rule(eqn, labels, shapes, out_shapes)
    elif name in ELEMENTWISE:
      out_labels = [self.merge(labels, shapes, out_shapes[0], name, origins)] * len(out_shapes)
      if name in ("add", "sub", "add_any") and all(o is None for o in origins) and \
          len(labels) == 2 and any(k in labels[1] and not np.array_equal(v, labels[1][k])
                                   and _distinct(v) and _distinct(labels[1][k])
                                   for k, v in labels[0].items()):
        # two branches summed: a residual stream (not a GroupNorm's statistic, whose ids
        # repeat over each norm group)
        self.mark(out_labels[0], "residual")
      if name == "optimization_barrier":
        out_labels = labels
    elif name in REDUCTIONS:
      axes = set(eqn.params["axes"])
      self.reduction_effect(eqn, labels[0], axes, shapes[0])
      axis_map = {}
      for a in range(len(shapes[0])):
        if a not in axes:
          axis_map[a] = len(axis_map)
      out_labels = [self.remap(labels[0], axis_map, name, coarsen=False)]
    elif name in CUMULATIVE:
      out_labels = [self.keep_unless(labels[0], {eqn.params["axis"]}, name)]
    elif name in WINDOWED:
      out_labels = self.windowed(eqn, labels, shapes)
    elif not any(labels):
      out_labels = [{} for _ in out_shapes]
    else:
      for l in labels:
        self.block(l, f"primitive '{name}' is not followed by the graph")
      out_labels = [{} for _ in out_shapes]
    out_counted = [None] * len(out_shapes)
    if name in ("convert_element_type", "reshape", "copy", "copy_p") and counted[0] is not None:
      out_counted = [counted[0]]
    if name in ("add", "add_any") and len(labels) == 2:
      self.bias_add(eqn, origins, counted, out_labels[0], out_shapes[0])
    if name in ("conv_general_dilated", "dot_general"):
      out_counted = [len(self.ops) - 1]
    return list(zip(out_labels, [origin] * len(out_shapes), out_counted))

  def _record_scope_inputs(self, eqn, labels, origins, shapes):
    """Remembers the channels (last axis) of activations that enter a module's scope
    from outside it (the Linen name stack of the op that uses them is inside the
    scope, that of the op defining them is not)."""
    stack = str(eqn.source_info.name_stack).split("/")
    if len(stack) < 2 or not stack[0]:
      return
    for v, label, origin, shape in zip(eqn.invars, labels, origins, shapes):
      if origin is not None or not label or not shape or _is_literal(v) or v not in self._defs:
        continue
      hit = _facet(label, len(shape) - 1)
      if hit is None or hit[0] != (len(shape) - 1,):
        continue
      outer = str(self._defs[v].source_info.name_stack).split("/")
      for depth in range(2, len(stack) + 1):
        if outer[:depth] != stack[:depth]:
          self.scope_inputs.setdefault("/".join(stack[1:depth]), []).append(hit[1])

  def tie_free_params(self, leaf_ids: dict, comp: np.ndarray) -> bool:
    """Ties a parameter axis that no op produces (a learned probe or token created at
    ``x.shape[-1]``, e.g. a MAP head's ``probe`` of shape (1, 1, width)) to the channels
    of the activation entering its module, index by index, when that activation's
    channel axis has exactly its extent and is one produced group. The module computed
    the parameter's width from its input, so the rebuild narrows both together; the
    tie also makes the masked original zero the parameter's removed channels, so the
    claim of exactness still holds. Returns whether a tie was added."""
    produced, blocked = set(), set()
    for ids in self.producers:
      produced.update(np.unique(comp[ids]).tolist())
    for ids, _ in self.blocked:  # e.g. a position table's token axis: never a channel
      blocked.update(np.unique(comp[ids]).tolist())
    added = False
    taps, last = set(), {}
    for leaf, axis in leaf_ids:
      last[leaf] = max(axis, last.get(leaf, axis))
    for ids in self.taps:
      taps.update(np.unique(comp[ids]).tolist())
    for (leaf, axis), ids in leaf_ids.items():
      mine = np.unique(comp[ids]).tolist()
      if produced.intersection(mine) or blocked.intersection(mine) \
          or taps.intersection(mine) or axis != last[leaf]:
        continue  # a channel axis is the parameter's last (x.shape[-1]); taps never are
      parts = self.leaf_names[leaf].split("/")
      if len(parts) < 3:  # collection / module ... / name
        continue
      candidates = [c for c in self.scope_inputs.get("/".join(parts[1:-1]), ())
                    if c.size == ids.size]
      comps = {tuple(np.unique(comp[c])) for c in candidates}
      if len(comps) != 1 or not produced.issuperset(next(iter(comps))):
        continue  # none, or several different activations: not guessed
      self.tie(ids, candidates[0])
      added = True
    return added

  def keep_unless(self, label, axes, what):
    """Facets that do not touch `axes` pass; one that lies along them is blocked,
    unless it is split over other axes too (heads x head_dim): then it is coarsened
    to those (whole heads; rotary embeddings slice the head dimension)."""
    out = {}
    for k, ids in label.items():
      if not set(k) & axes:
        out[k] = ids
      elif set(k) - axes:
        kept = [i for i, a in enumerate(k) if a not in axes]
        first = ids[tuple(slice(None) if i in kept else slice(0, 1) for i in range(len(k)))]
        self.tie(ids, first)
        out[tuple(k[i] for i in kept)] = first.reshape([ids.shape[i] for i in kept])
      else:
        self.block({k: ids}, f"'{what}' along a channel axis")
    return out

  def cond(self, eqn, labels, origins, counted):
    results = []
    for branch in interpret.bodies(eqn):
      take = lambda xs: [xs[k] for k in branch.operands]  # pylint: disable=cell-var-from-loop
      results.append(self.run(branch.jaxpr, take(labels), take(origins), take(counted)))
    outs = []
    for i, v in enumerate(eqn.outvars):
      merged = self.merge([r[0][i] for r in results], [_shape(v)] * len(results),
                          _shape(v), "cond")
      outs.append((merged, None, None))
    return outs

  def _broadcast_axes(self, var, depth=8) -> set:
    """Axes along which `var` is a broadcast (the same value at every position)."""
    if var is None or _is_literal(var) or depth == 0 or var not in self._defs:
      return set()
    e = self._defs[var]
    name = e.primitive.name
    if name == "broadcast_in_dim":
      dims = e.params["broadcast_dimensions"]
      in_shape = _shape(e.invars[0])
      real = {d for i, d in enumerate(dims) if in_shape[i] > 1}
      return {a for a in range(len(_shape(var))) if a not in real}
    if name in ("convert_element_type", "copy", "copy_p", "neg", "not", "stop_gradient"):
      return self._broadcast_axes(e.invars[0], depth - 1)
    if name in ELEMENTWISE and len(e.outvars) == 1:
      sets = [self._broadcast_axes(v, depth - 1) for v in e.invars
              if not _is_literal(v) and _shape(v) == _shape(var)]
      return set.intersection(*sets) if sets else set()
    return set()

  def _const_value(self, var, depth=6):
    """The value of a scalar computed from literals only (e.g. ``sqrt 4.0``), or None."""
    if _is_literal(var):
      return var.val if np.ndim(var.val) == 0 else None
    if depth == 0 or var not in self._defs or _shape(var) != ():
      return None
    e = self._defs[var]
    if len(e.outvars) != 1 or e.primitive.name not in ELEMENTWISE:
      return None
    vals = [self._const_value(v, depth - 1) for v in e.invars]
    if any(v is None for v in vals):
      return None
    try:
      return np.asarray(e.primitive.bind(*[np.asarray(v) for v in vals], **e.params))[()]
    except Exception:  # pylint: disable=broad-except
      return None

  def reduction_effect(self, eqn, label, axes, shape):
    """A reduction over channels: a sum is exact (a zeroed channel adds nothing) unless
    it is then divided by the count (a mean: LayerNorm, RMSNorm, weight standardisation);
    a max, min, product or arg-max is not (a zeroed channel still takes part)."""
    reduced = {k: v for k, v in label.items() if set(k) & axes}
    if not reduced:
      return
    name = eqn.primitive.name
    if name == "reduce_sum":
      n = math.prod(shape[a] for a in axes)
      if any(abs(f * n - 1) < 1e-4 for f in self._scales(eqn.outvars[0], forward=True)):
        self.effect(reduced, f"mean over the channels (sum / {n})")
        return
      op = self._nonzero_at_zero(eqn.invars[0])
      if op is not None:  # a zeroed channel is f(0) != 0 there: it still adds
        self.effect(reduced, f"sum over the channels of {op}(...)")
      return
    self.effect(reduced, f"{name} over the channels")

  def rule_reduce_sum(self, eqn, labels, shapes, out_shapes):
    """A sum. Over part of a split channel axis -- GroupNorm's statistics: the channels
    reshaped to (..., groups, channels per group) and summed over the second -- each
    norm group's channels become one channel, removed a whole group at a time. That
    removal is exact: the kept groups' statistics run over the same channels as before,
    and a zeroed group normalises to its zeroed bias, 0 (weight standardisation or a
    LayerNorm on the same channels is still reported where it happens). Other facets
    as any reduction (:meth:`reduction_effect`)."""
    axes = set(eqn.params["axes"])
    whole = {k: v for k, v in labels[0].items() if not (set(k) & axes and set(k) - axes)}
    groups = {k: v for k, v in labels[0].items() if k not in whole}
    self.reduction_effect(eqn, whole, axes, shapes[0])
    axis_map = {}
    for a in range(len(shapes[0])):
      if a not in axes:
        axis_map[a] = len(axis_map)
    out = self.remap(whole, axis_map, "reduce_sum", coarsen=False)
    for k, ids in self.remap(groups, axis_map, "reduce_sum", coarsen=True).items():
      self._put(out, k, ids, "reduce_sum")
    return [out]

  def _nonzero_at_zero(self, var, depth=8):
    """The elementwise op with f(0) != 0 (exp, cos, logistic, adding a constant...)
    that computed `var` from zeroed channels, following elementwise ops back; None when
    a zeroed channel stays zero."""
    if depth == 0 or _is_literal(var) or var not in self._defs:
      return None
    e = self._defs[var]
    name = e.primitive.name
    if name in NONZERO_AT_ZERO:
      return name
    if name in ("add", "sub", "add_any", "max", "min") and any(
        (c := self._const_value(v)) is not None and c != 0 for v in e.invars):
      return name
    if name in ELEMENTWISE or name in SHAPE_ONLY:
      for v in e.invars:
        found = self._nonzero_at_zero(v, depth - 1)
        if found is not None:
          return found
    return None

  def _scales(self, var, forward: bool, terms: list | None = None) -> list[float]:
    """Literal factors that multiply `var` (1/c for a division by c), following
    shape-only ops forwards (its users) or backwards (what computed it); `terms` gets
    the variable holding each."""
    factors, frontier, seen = [], [var], set()
    while frontier:
      v = frontier.pop()
      if forward:
        eqns = [(e, v) for e in self._users.get(v, [])]
      else:
        eqns = [(self._defs[v], None)] if v in self._defs else []
      for e, _ in eqns:
        name = e.primitive.name
        if name in SHAPE_ONLY:
          nxt = e.outvars[0] if forward else e.invars[0]
          if not _is_literal(nxt) and nxt not in seen:
            seen.add(nxt)
            frontier.append(nxt)
        elif name in ("mul", "div") and len(e.invars) == 2:
          a, b = e.invars
          ca, cb = self._const_value(a), self._const_value(b)
          if name == "mul":
            c = cb if cb is not None else ca
            if c is not None:
              factors.append(float(c))
              if terms is not None:
                terms.append(b if cb is not None else a)
          elif cb is not None and (not forward or a is v):
            factors.append(1.0 / float(cb) if float(cb) else math.inf)
            if terms is not None:
              terms.append(b)
    return factors

  def _has_literal(self, var, value, depth=6) -> bool:
    """Whether the scalar constant `var` is computed from a literal equal to `value`
    (``sqrt 8.0`` for a width of 8)."""
    if _is_literal(var):
      return np.ndim(var.val) == 0 and float(var.val) == value
    if depth == 0 or var not in self._defs:
      return False
    return any(self._has_literal(v, value, depth - 1) for v in self._defs[var].invars)

  def loop_carry(self, ins, outs, shapes, what):
    """A loop's carry: the ids it enters with are the ids it leaves with."""
    merged = []
    for a, b, s in zip(ins, outs, shapes):
      for one, other in ((a, b), (b, a)):
        lost = {k: v for k, v in one.items() if k not in other}
        self.block(lost, f"{what} carry whose channels change between iterations")
      both = [{k: v for k, v in l.items() if k in a and k in b} for l in (a, b)]
      merged.append(self.merge(both, [s, s], s, what))
    return merged

  def scan(self, eqn, labels, origins, counted):
    """``lax.scan`` (``nn.scan``, ``fori_loop`` with fixed bounds): the body runs once
    on per-iteration slices. A stacked parameter's leading (layer) axis is dropped, so
    channel j of every layer is one channel (a stacked parameter has one width for all
    its layers); the body's FLOPs count ``length`` times."""
    p = eqn.params
    (body,), nc, ncarry = interpret.bodies(eqn), p["num_consts"], p["num_carry"]
    length = interpret.scan_length(eqn)
    in_labels = list(labels[:nc + ncarry])
    for label in labels[nc + ncarry:]:
      sliced = {}
      for axes, ids in label.items():
        if axes == (0,):
          continue  # the stacking (layer) axis
        if 0 in axes:
          self.block({axes: ids}, "scan over a channel axis")
          continue
        sliced[tuple(a - 1 for a in axes)] = ids
      in_labels.append(sliced)
    first = len(self.ops)
    outs, out_origins, _ = self.run(body.jaxpr, in_labels, list(origins),
                                    [None] * len(labels))
    for op in self.ops[first:]:
      op.macs *= length
      op.bias_adds *= length
    carry_shapes = [_shape(v) for v in eqn.invars[nc:nc + ncarry]]
    carry = self.loop_carry(labels[nc:nc + ncarry], outs[:ncarry], carry_shapes, "scan")
    ys = [{tuple(a + 1 for a in axes): ids for axes, ids in l.items()}
          for l in outs[ncarry:]]
    result_origins = [None if origins[nc + i] is None else o
                      for i, o in enumerate(out_origins[:ncarry])] + list(out_origins[ncarry:])
    return list(zip(carry + ys, result_origins, [None] * len(eqn.outvars)))

  def while_loop(self, eqn, labels, origins, counted):
    """``lax.while_loop``: the body and the condition are walked once. When the trip
    count is known before running (a ``fori_loop`` whose bounds are constants but not
    Python ints, lowered to a while over a counter: see :func:`_trip_count`), the
    body's FLOPs count that many times and the condition's one more; otherwise they
    count once, each such op carries a :attr:`Op.note` and the loop is listed in
    :attr:`Walk.loops` and warned about in one line (the count is a lower bound)."""
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond, body = interpret.bodies(eqn)  # each takes its operands of the eqn
    trips = _trip_count(eqn, self._const_value)
    carry_in = labels[cn + bn:]
    first = len(self.ops)
    outs, _, _ = self.run(body.jaxpr, [labels[k] for k in body.operands],
                          [origins[k] for k in body.operands], [None] * len(body.operands))
    after_body = len(self.ops)
    shapes = [_shape(v) for v in eqn.outvars]
    self.run(cond.jaxpr, [labels[k] for k in cond.operands],
             [origins[k] for k in cond.operands], [None] * len(cond.operands))
    if trips is not None:
      for i, op in enumerate(self.ops[first:], first):
        times = trips if i < after_body else trips + 1
        op.macs *= times
        op.bias_adds *= times
    elif len(self.ops) > first:
      where = _where(eqn) or "the forward pass"
      note = (f"inside the while_loop at {where}, counted for one iteration (its trip "
              "count is not known before running): a lower bound")
      for op in self.ops[first:]:
        op.note = op.note or note
      self.loops.append(note)
      warnings.warn(f"FLOPs: {note}", LoopCountWarning, stacklevel=2)
    carry = self.loop_carry(carry_in, outs, shapes, "while_loop")
    return [(l, None, None) for l in carry]

  def windowed(self, eqn, labels, shapes):
    p = eqn.params
    n_operands = len(labels) // 2 if eqn.primitive.name == "reduce_window" else 1
    window, strides = p["window_dimensions"], p["window_strides"]
    padding = p["padding"]
    base = p.get("base_dilation", (1,) * len(window))
    wdil = p.get("window_dilation", (1,) * len(window))
    moving = {a for a in range(len(window))
              if window[a] != 1 or strides[a] != 1 or tuple(padding[a]) != (0, 0)
              or base[a] != 1 or wdil[a] != 1}
    return [self.keep_unless(labels[i], moving, "pooling window") for i in range(n_operands)]

  def bias_add(self, eqn, origins, counted, out_label, out_shape):
    """An add of a parameter to a conv/dot_general result is that op's bias."""
    for c, o in ((counted[0], origins[1]), (counted[1], origins[0])):
      if c is not None and o not in (None, CONST):
        op = self.ops[c]
        adds = math.prod(out_shape)
        op.bias_adds += adds
        op.bias_factors = [ids.ravel() for ids in out_label.values()]
        return

  # --- rules -------------------------------------------------------------------------
  def rule_broadcast_in_dim(self, eqn, labels, shapes, out_shapes):
    dims = eqn.params["broadcast_dimensions"]
    keep = {i: d for i, d in enumerate(dims) if shapes[0][i] == out_shapes[0][d]}
    return [self.remap(labels[0], keep, "broadcast", coarsen=False)] + \
        [{} for _ in out_shapes[1:]]

  def rule_squeeze(self, eqn, labels, shapes, out_shapes):
    gone = set(a % len(shapes[0]) for a in eqn.params["dimensions"])
    axis_map = {}
    for a in range(len(shapes[0])):
      if a not in gone:
        axis_map[a] = len(axis_map)
    return [self.remap(labels[0], axis_map, "squeeze", coarsen=False)]

  def rule_transpose(self, eqn, labels, shapes, out_shapes):
    perm = eqn.params["permutation"]
    return [self.remap(labels[0], {p: j for j, p in enumerate(perm)}, "transpose", False)]

  def rule_rev(self, eqn, labels, shapes, out_shapes):
    out = {}
    for axes, ids in labels[0].items():
      for i, a in enumerate(axes):
        if a in eqn.params["dimensions"]:
          ids = np.flip(ids, i)
      out[axes] = ids
    return [out]

  def rule_reshape(self, eqn, labels, shapes, out_shapes):
    label, shape, new = labels[0], shapes[0], out_shapes[0]
    if eqn.params.get("dimensions") is not None:
      perm = eqn.params["dimensions"]
      label = self.remap(label, {p: j for j, p in enumerate(perm)}, "reshape", False)
      shape = tuple(shape[p] for p in perm)
    out: Label = {}
    for in_axes, out_axes in _reshape_blocks(shape, new):
      facets = {k: v for k, v in label.items() if set(k) & set(in_axes)}
      if not facets:
        continue
      if len(facets) > 1 or any(not set(k) <= set(in_axes) for k in facets):
        self.block(facets, "reshape merges separate channel axes")
        continue
      (axes, ids), = facets.items()
      if len(in_axes) == 1 and len(out_axes) == 1:
        out[(out_axes[0],)] = ids
        continue
      block_shape = [shape[a] for a in in_axes]
      if math.prod(block_shape) > 50_000_000:
        self.block(facets, "reshape of a very large channel block")
        continue
      index = tuple(slice(None) if a in axes else None for a in in_axes)
      grid = np.broadcast_to(ids[index] if ids.ndim else ids, block_shape)
      grid = grid.reshape([new[a] for a in out_axes])
      keep = []  # out axes along which the ids vary
      for i in range(grid.ndim):
        if grid.shape[i] > 1 and not np.all(grid == grid.take([0], axis=i)):
          keep.append(i)
      grid = grid[tuple(slice(None) if i in keep else 0 for i in range(grid.ndim))]
      if keep:
        out[tuple(out_axes[i] for i in keep)] = np.ascontiguousarray(grid)
    return [out]

  def rule_concatenate(self, eqn, labels, shapes, out_shapes):
    d = eqn.params["dimension"]
    along, rest = [], []
    for label in labels:
      along.append({k: v for k, v in label.items() if d in k})
      rest.append({k: v for k, v in label.items() if d not in k})
    out = self.merge(rest, [tuple(1 if a == d else n for a, n in enumerate(s)) for s in shapes],
                     tuple(1 if a == d else n for a, n in enumerate(out_shapes[0])),
                     "concatenate")
    if any(along):
      if any(k != (d,) for a in along for k in a):
        for a in along:
          self.block(a, "concatenate along part of a split channel axis")
        return [out]
      parts = [a[(d,)] if a else self.fresh((s[d],)) for a, s in zip(along, shapes)]
      out[(d,)] = np.concatenate(parts)
    return [out]

  def rule_pad(self, eqn, labels, shapes, out_shapes):
    config = eqn.params["padding_config"]
    moving = {a for a, (lo, hi, interior) in enumerate(config) if (lo, hi, interior) != (0, 0, 0)}
    self.block(labels[1], "pad value")
    return [self.keep_unless(labels[0], moving, "pad")]

  def rule_slice(self, eqn, labels, shapes, out_shapes):
    # The offsets are constants of the user's code: after pruning it would cut the
    # narrower axis at the same places. Only uncut channel axes are followed.
    p = eqn.params
    strides = p["strides"] or (1,) * len(shapes[0])
    cut = {a for a in range(len(shapes[0]))
           if (p["start_indices"][a], p["limit_indices"][a], strides[a]) != (0, shapes[0][a], 1)}
    return [self.keep_unless(labels[0], cut, "slice at fixed offsets")]

  def rule_split(self, eqn, labels, shapes, out_shapes):
    # Like a slice: the split points are constants of the user's code (jnp.split(x, 2)
    # and jnp.split(x, [6]) trace alike), so a pruned network would split the narrower
    # axis at the old places. The channels of a split axis stay whole.
    axis, sizes = eqn.params["axis"], [int(s) for s in eqn.params["sizes"]]
    label = self.keep_unless(labels[0], {axis}, "split at fixed offsets")
    return [dict(label) for _ in sizes]

  def rule_dynamic_slice(self, eqn, labels, shapes, out_shapes):
    cut = {a for a, (n, m) in enumerate(zip(shapes[0], out_shapes[0])) if n != m}
    for l in labels[1:]:
      self.block(l, "dynamic_slice index")
    return [self.keep_unless(labels[0], cut, "dynamic_slice")]

  def rule_dynamic_update_slice(self, eqn, labels, shapes, out_shapes):
    cut = {a for a, (n, m) in enumerate(zip(shapes[0], shapes[1])) if n != m}
    base = self.keep_unless(labels[0], cut, "dynamic_update_slice")
    update = self.keep_unless(labels[1], cut, "dynamic_update_slice")
    for l in labels[2:]:
      self.block(l, "dynamic_update_slice index")
    return [self.merge([base, update], [shapes[0], shapes[0]], out_shapes[0],
                       "dynamic_update_slice")]

  def rule_tile(self, eqn, labels, shapes, out_shapes):
    reps = eqn.params["reps"]
    return [{axes: np.tile(ids, [reps[a] for a in axes]) for axes, ids in labels[0].items()}]

  def rule_gather(self, eqn, labels, shapes, out_shapes):
    """An embedding lookup ``table[ids]`` (and any gather): an operand axis taken whole
    (a table's features) goes to its output axis; the indexed axes (the vocabulary,
    positions) are no channels that can be followed."""
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    shape = shapes[0]
    gone = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    kept_axes = [a for a in range(len(shape)) if a not in gone]
    axis_map = {a: o for a, o in zip(kept_axes, sorted(dn.offset_dims))
                if sizes[a] == shape[a]}
    indexed = set(dn.start_index_map) | gone
    out = {}
    for axes, ids in labels[0].items():
      if all(a in axis_map for a in axes):
        self._put_sorted(out, [axis_map[a] for a in axes], ids, "gather")
      elif set(axes) & indexed:
        self.block({axes: ids}, "gather along it (an embedding's vocabulary or positions)")
        if self._eqn_origins[0] not in (None, CONST):
          self.mark({axes: ids}, "vocabulary")
      else:
        self.block({axes: ids}, "gather of part of a channel axis")
    for label in labels[1:]:
      self.block(label, "gather indices")
    if self._eqn_origins[0] not in (None, CONST) and out:
      self.mark(out, "embedding")
    return [out]

  def rule_iota(self, eqn, labels, shapes, out_shapes):
    return [{}]

  def _param_name(self, origin):
    if origin in (None, CONST):
      return None
    return self.leaf_names[origin]

  def rule_dot_general(self, eqn, labels, shapes, out_shapes):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    L, R = dict(labels[0]), dict(labels[1])
    ls, rs = shapes
    pairs = list(zip(lb, rb)) + list(zip(lc, rc))
    if self._eqn_origins[0] is None and self._eqn_origins[1] is None:
      L, R = self._whole_heads(L, lb), self._whole_heads(R, rb)
    for la, ra in pairs:  # paired with an axis the graph does not follow: stays whole
      for label, a, other, b, size in ((L, la, R, ra, ls[la]), (R, ra, L, la, rs[ra])):
        f = _facet(label, a)
        if f is not None and size > 1 and _facet(other, b) is None:
          self.block({f[0]: f[1]}, "dot_general pairs it with an axis the graph does not "
                     "follow (a constant's, or token positions)")
          label.pop(f[0])
    self._tie_pairs(L, R, pairs, "dot_general")
    lfree = [a for a in range(len(ls)) if a not in lb and a not in lc]
    rfree = [a for a in range(len(rs)) if a not in rb and a not in rc]
    lmap = {a: i for i, a in enumerate(lb)}
    lmap.update({a: len(lb) + i for i, a in enumerate(lfree)})
    rmap = {a: i for i, a in enumerate(rb)}
    rmap.update({a: len(lb) + len(lfree) + i for i, a in enumerate(rfree)})
    out = self.remap(L, lmap, "dot_general", coarsen=True)
    right = self.remap(R, rmap, "dot_general", coarsen=True)
    for axes, ids in right.items():
      if axes not in out:
        self._put(out, axes, ids, "dot_general")
    # Roles: free axes of a parameter operand (a kernel) produce channels, contracted
    # axes consume them. Free axes of two activations (attention's tokens) are no
    # feature axes: they produce nothing.
    origins = self._eqn_origins
    for label, free, contract, o in ((L, lfree, lc, origins[0]), (R, rfree, rc, origins[1])):
      for axes, ids in label.items():
        if set(axes) <= set(free):
          if o not in (None, CONST):
            self.producers.append(ids.ravel())
        elif set(axes) & set(contract):
          self.consumers.append(ids.ravel())
    if origins[0] is None and origins[1] is None or lb:
      self.attention(eqn, L, R, lb, lc, rb, rc, lfree, rfree, ls)
    macs = math.prod(out_shapes[0]) * math.prod(ls[a] for a in lc)
    kernel = self._param_name(origins[1]) or self._param_name(origins[0])
    op = Op(kind="dense" if kernel else "dot",
            name=_layer_name(kernel) if kernel else f"dot_general_{len(self.ops)}",
            kernel=kernel, in_shape=ls if self._param_name(origins[1]) or not kernel else rs,
            out_shape=out_shapes[0],
            kernel_shape=(math.prod(rs[a] for a in rc), math.prod(rs[a] for a in rfree)),
            macs=macs)
    seen = set()
    for la, ra in zip(lc, rc):
      facet = _facet(L, la) or _facet(R, ra)
      if facet is not None and facet[0] not in seen:
        seen.add(facet[0])
        op.factors.append(facet[1].ravel())
    op.factors += [ids.ravel() for ids in out.values()]
    self.ops.append(op)
    return [out]

  def _whole_heads(self, label: Label, batch) -> Label:
    """A facet split into heads (a batch axis of attention) and more (head_dim, or
    query heads of a KV group) is coarsened to its head axes: the module reshapes
    with one head_dim, so only whole heads (whole KV groups) can go."""
    out = {}
    for k, ids in label.items():
      if set(k) & set(batch) and set(k) - set(batch):
        out.update(self.keep_unless({k: ids}, set(k) - set(batch), "attention heads"))
      else:
        out[k] = ids
    return out

  def attention(self, eqn, L, R, lb, lc, rb, rc, lfree, rfree, ls):
    """A product of two activations (attention's scores q.k and their use on v):
    batch axes carrying ids are heads, contracted ones the head dimension, free ones
    (the value's features) too. A literal scale next to it that is computed from the
    contracted width (1/sqrt(head_dim)) changes when that width does."""
    for label, batch, contract, free in ((L, lb, lc, lfree), (R, rb, rc, rfree)):
      for axes, ids in label.items():
        if set(axes) & set(batch):
          self.mark({axes: ids}, "heads")
        elif set(axes) & set(contract) or set(axes) <= set(free):
          self.mark({axes: ids}, "head_dim")
    self._value_head_dim(eqn, L, R, lb, lc, rb, rc, lfree, rfree)
    contracted = {}
    for la, ra in zip(lc, rc):
      for label, a in ((L, la), (R, ra)):
        f = _facet(label, a)
        if f is not None:
          contracted[f[0], id(label)] = (f, a, label is L)
    terms = []
    factors = self._scales(eqn.outvars[0], forward=True, terms=terms)
    for v in eqn.invars:
      if not _is_literal(v):
        factors += self._scales(v, forward=False, terms=terms)
    if factors:  # read at any width (a pruned network's, down to one channel)
      self.scale_at[len(self.ops)] = math.prod(factors)
    if not contracted:
      return
    n = math.prod(ls[la] for la in lc
                  if _facet(L, la) is not None or _facet(R, rc[lc.index(la)]) is not None)
    # A literal scale of the product may be computed from the contracted width: s(n) =
    # n^p (1/sqrt(head_dim)), an expression of a literal n, or a Python float that
    # cannot be told from a constant. Folding s(n0)/s(n1), read from the pruned
    # network's own trace, is right in every case (1 for a constant).
    def rank(term):
      f, var = term
      power = next((p for p in (-0.5, -1.0, 0.5, 1.0) if abs(f / n ** p - 1) < 1e-4), None)
      return (power is None, not self._has_literal(var, n)), f, power
    label = {axes: ids for ((axes, ids), _, _) in contracted.values()}
    late = self._late_scale(eqn.outvars[0], n) if n > 1 else None
    if late is not None:  # e.g. softmax(q.k) / sqrt(head_dim): not a factor of q
      self.effect(label, f"scale {late:.6g} computed from the contracted width {n} after a "
                  "non-linear op (softmax) (not folded: it does not scale the query)")
      return
    if n <= 1 or not factors:
      return
    (no_power, no_literal), f, power = min(map(rank, zip(factors, terms)))
    if not no_power:
      what = f"scale {f:.6g} = {n}^{power:g} computed from the contracted width"
      change = f"(n0/n1)^{power:g}"
    elif not no_literal:
      what = f"scale {f:.6g} computed from the contracted width {n}"
      change = "s(n0)/s(n1)"
    else:
      what = (f"literal scale {f:.6g} of a product over {n} channels (if computed from "
              "the width, it changes)")
      change = "s(n0)/s(n1), if any,"
    leaves, why = None, "no operand is a linear projection used once"
    for v in eqn.invars:  # fold into the first operand that is one (the query)
      leaves, why = self._linear_producer(v)
      if leaves is not None:
        break
    if leaves is None:
      self.effect(label, f"{what} (not folded: {why})")
      return
    names = tuple(self.leaf_names[i] for i in leaves)
    fold = Fold(f"{what} at {_where(self._eqn)}: the pruned width's change "
                f"{change} is folded into {' and '.join(names)}")
    fold.leaves, fold.power, fold.leaf_ids = names, power, leaves
    fold.op, fold.scale = len(self.ops), self.scale_at[len(self.ops)]
    for ids in label.values():
      self.effects.append((ids.ravel(), fold, ""))

  def _value_head_dim(self, eqn, L, R, lb, lc, rb, rc, lfree, rfree, limit=64):
    """Records the attention pattern by structure, not by names: a product of two
    activations one of which is computed from the scores of an earlier one without
    another product between (their softmax, a mask, a scale) pairs that product's
    contracted head_dim with the other operand's (the value's) free channel axis of the
    same size, in :attr:`value_head_dims`; else, a product that contracts channel ids
    (the scores q.k, over head_dim) is recorded as scores. The scores are found back
    through the jaxpr where both products are in one function, else by the ids on their
    batch (heads) axes (``einsum`` puts each product in a nested ``jit``)."""
    if any(self._plain_leaf(v) is not None for v in eqn.invars):
      return  # a kernel: a projection, not attention (a MAP head's probe-made query is)
    for var, label, batch, other, free in ((eqn.invars[0], L, lb, R, rfree),
                                           (eqn.invars[1], R, rb, L, lfree)):
      q_ids = self._scores_by_ids.get(_ids_key(label, batch))
      frontier, seen = [var], {var}
      while frontier and len(seen) < limit and q_ids is None:
        v = frontier.pop()
        if v in self._scores:
          q_ids = self._scores[v]
        elif v in self._defs and self._defs[v].primitive.name not in (
            "dot_general", "conv_general_dilated"):
          for u in self._defs[v].invars:
            if not _is_literal(u) and u not in seen:
              seen.add(u)
              frontier.append(u)
      if q_ids is None:
        continue
      for axes, ids in other.items():
        if len(axes) == 1 and axes[0] in free and ids.size == q_ids.size:
          self.value_head_dims.append((q_ids.ravel(), ids.ravel(), _where(eqn)))
      return
    for label, contract, batch in ((L, lc, lb), (R, rc, rb)):
      for a in contract:
        f = _facet(label, a)
        if f is not None and len(f[0]) == 1:
          self._scores[eqn.outvars[0]] = f[1]
          key = _ids_key(label, batch)
          if key:
            self._scores_by_ids[key] = f[1]
          return

  def _late_scale(self, var, n, limit=64):
    """A literal factor computed from the width `n` (a clean power, or from a literal
    n) applied to the scores `var` after a non-linear op (their softmax), before the
    next product; None if there is none."""
    frontier, seen, steps = [(var, False)], {var}, 0
    while frontier and steps < limit:
      v, after = frontier.pop()
      for e in self._users.get(v, []):
        steps += 1
        name = e.primitive.name
        if name in ("dot_general", "conv_general_dilated") or len(e.outvars) != 1:
          continue
        scaled = False
        if name in ("mul", "div"):
          for other in e.invars[1:] if name == "div" else e.invars:
            c = None if other is v else self._const_value(other)
            if c is None or not float(c):
              continue
            scaled = True
            f = float(c) if name == "mul" else 1.0 / float(c)
            if after and (self._has_literal(other, n) or any(
                abs(f / n ** p - 1) < 1e-4 for p in (-0.5, -1.0, 0.5, 1.0))):
              return f
        out = e.outvars[0]
        if out not in seen:
          seen.add(out)
          frontier.append((out, after or not (scaled or name in SHAPE_ONLY)))
    return None

  def _linear_producer(self, var, depth=16):
    """``((kernel, bias...), None)`` when `var` is a parameter kernel's product with an
    activation, plus parameter biases, through reshapes and literal scales only, each
    value and parameter used once (a scalar factor on the kernel and biases then scales
    `var`); else ``(None, why)``."""
    leaves, v = [], var
    for _ in range(depth):
      if _is_literal(v) or v not in self._defs:
        return None, "the operand is not computed in the same function as the product"
      if len(self._users.get(v, ())) != 1:
        return None, "the projection's output has other uses"
      e = self._defs[v]
      name = e.primitive.name
      if name in SHAPE_ONLY:
        v = e.invars[0]
      elif name in ("mul", "div") and len(e.invars) == 2 and \
          self._const_value(e.invars[1]) is not None:
        v = e.invars[0]
      elif name == "mul" and self._const_value(e.invars[0]) is not None:
        v = e.invars[1]
      elif name in ("add", "add_any") and len(e.invars) == 2:
        ps = [self._plain_leaf(u) for u in e.invars]
        if (ps[0] is None) == (ps[1] is None):
          return None, f"'{name}' of two activations or two parameters before the product"
        leaves.append(ps[0] if ps[0] is not None else ps[1])
        v = e.invars[1] if ps[0] is not None else e.invars[0]
      elif name == "dot_general":
        ps = [self._plain_leaf(u) for u in e.invars]
        if (ps[0] is None) == (ps[1] is None):
          return None, "the operand is not a parameter kernel's product with an activation"
        leaves.insert(0, ps[0] if ps[0] is not None else ps[1])
        return tuple(leaves), None
      else:
        return None, f"'{name}' between the projection and the product"
    return None, "the projection is too far from the product"

  def _plain_leaf(self, var, depth=8):
    """The leaf `var` is (through reshapes and casts), or None."""
    for _ in range(depth):
      if _is_literal(var):
        return None
      if var not in self._defs:
        o = self._origin.get(var)
        return o if isinstance(o, int) and o != CONST else None
      e = self._defs[var]
      if e.primitive.name not in SHAPE_ONLY:
        return None
      var = e.invars[0]
    return None

  def _tie_pairs(self, L, R, pairs, what):
    lr = dict(pairs)
    done = set()
    for la, ra in pairs:
      fl, fr = _facet(L, la), _facet(R, ra)
      if fl is None or fr is None or (fl[0], fr[0]) in done:
        continue
      done.add((fl[0], fr[0]))
      (la_axes, lids), (ra_axes, rids) = fl, fr
      if len(la_axes) == 1 and len(ra_axes) == 1:
        self.tie(lids, rids)
      elif len(la_axes) == 1:  # a coarse channel meets a split one: broadcast it
        i = ra_axes.index(ra)
        shape = [1] * len(ra_axes)
        shape[i] = -1
        self.tie(rids, lids.reshape(shape))
      elif len(ra_axes) == 1:
        i = la_axes.index(la)
        shape = [1] * len(la_axes)
        shape[i] = -1
        self.tie(lids, rids.reshape(shape))
      elif all(a in lr for a in la_axes) and sorted(lr[a] for a in la_axes) == list(ra_axes):
        order = [ra_axes.index(lr[a]) for a in la_axes]
        self.tie(lids, np.transpose(rids, order))
      else:
        self.block({la_axes: lids}, f"{what} pairs channel axes laid out differently")
        self.block({ra_axes: rids}, f"{what} pairs channel axes laid out differently")

  def rule_conv_general_dilated(self, eqn, labels, shapes, out_shapes):
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    L, R = labels
    ls, rs, os_ = shapes[0], shapes[1], out_shapes[0]
    groups, batch_groups = p["feature_group_count"], p["batch_group_count"]
    lc, ro, ri, oc = lhs_spec[1], rhs_spec[0], rhs_spec[1], out_spec[1]
    c_in, c_out = ls[lc], rs[ro]
    x_facet, o_facet, i_facet = _facet(L, lc), _facet(R, ro), _facet(R, ri)
    spatial_lhs = {a for a in lhs_spec if a != lc}
    for axes, ids in L.items():
      if set(axes) & spatial_lhs:
        self.block({axes: ids}, "conv over a channel-carrying spatial axis")
    out: Label = {}
    if o_facet is not None and len(o_facet[0]) > 1 or x_facet is not None and len(x_facet[0]) > 1:
      self.block(L, "conv of a split channel axis")
      self.block(R, "conv of a split channel axis")
    elif batch_groups != 1:
      self.block(L, "conv with batch_group_count > 1")
      self.block(R, "conv with batch_group_count > 1")
    elif groups == 1:
      if x_facet is not None and i_facet is not None:
        self.tie(x_facet[1], i_facet[1])
      elif i_facet is not None and c_in > 1:
        self.block({i_facet[0]: i_facet[1]}, "conv of input channels the graph does not "
                   "follow")
      if i_facet is not None:
        self.consumers.append(i_facet[1])
      if o_facet is not None:
        self.producers.append(o_facet[1])
        out[(oc,)] = o_facet[1]
    elif rs[ri] == 1 and groups == c_in:  # depthwise, channel multiplier c_out / c_in
      if o_facet is not None:
        per_input = o_facet[1].reshape(c_in, c_out // c_in)
        self.tie(per_input, per_input[:, :1])
        if x_facet is not None:
          self.tie(x_facet[1], per_input[:, 0])
        else:  # its input channels are not followed, so its outputs cannot go alone
          self.block({o_facet[0]: o_facet[1]}, "depthwise conv of channels the graph "
                     "does not follow")
        self.producers.append(o_facet[1])
        out[(oc,)] = o_facet[1]
    else:
      reason = f"grouped conv (feature_group_count={groups})"
      self.block(L, reason)
      self.block(R, reason)
      if o_facet is not None:
        out[(oc,)] = o_facet[1]
    self.taps.extend(ids for axes, ids in R.items() if set(axes) & set(rhs_spec[2:]))
    taps = math.prod(rs[a] for a in rhs_spec[2:])
    macs = math.prod(os_) * taps * (c_in // groups)
    kernel = self._param_name(self._eqn_origins[1])
    op = Op(kind="conv", name=_layer_name(kernel) if kernel else f"conv_{len(self.ops)}",
            kernel=kernel, in_shape=ls, out_shape=os_,
            kernel_shape=tuple(rs[a] for a in rhs_spec[2:]) + (rs[ri], rs[ro]), macs=macs)
    if groups == 1:
      facet = x_facet or i_facet
      if facet is not None:
        op.factors.append(facet[1].ravel())
    if (oc,) in out:
      op.factors.append(out[(oc,)].ravel())
    self.ops.append(op)
    return [out]



def _where(eqn) -> str:
  """Where an op is: its module path (Linen's name stack) or its source line."""
  if eqn is None:
    return ""
  stack = str(eqn.source_info.name_stack)
  if stack:
    return stack
  try:
    from jax._src import source_info_util  # pylint: disable=g-import-not-at-top
    return source_info_util.summarize(eqn.source_info)
  except Exception:  # pylint: disable=broad-except
    return ""


_COMPARE = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
            "ne": operator.ne}
_MIRROR = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "ne": "ne"}


def _trip_count(eqn, const_value, limit=10**7) -> int | None:
  """The iterations of a ``while`` known before running, or None.

  Recognised: a condition that is one comparison (``lt le gt ge ne``) of a counter in
  the carry with a bound; the body adds a literal step to the counter and returns the
  bound unchanged (a carry) or the bound is a literal or a condition constant; the
  counter's and the bound's initial values are constants. That is ``fori_loop(a, b,
  ...)`` with constant bounds that are not Python ints (those lower to a ``scan``)."""
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cond, body = (b.jaxpr for b in interpret.bodies(eqn))
  if len(cond.eqns) != 1 or cond.eqns[0].primitive.name not in _COMPARE \
      or cond.eqns[0].outvars[0] is not cond.outvars[0]:
    return None
  cmp = cond.eqns[0]
  carry_vars = list(cond.invars[cn:])

  def start(v):
    """(carry index or None, initial value or None) of a comparison operand."""
    if _is_literal(v):
      return None, (v.val if np.ndim(v.val) == 0 else None)
    if v in carry_vars:
      i = carry_vars.index(v)
      return i, const_value(eqn.invars[cn + bn + i])
    if v in cond.invars[:cn]:
      return None, const_value(eqn.invars[cond.invars.index(v)])
    return None, None

  def step(i):
    """The literal the body adds to carry i each iteration (0: passed through)."""
    out, var = body.outvars[i], body.invars[bn + i]
    if out is var:
      return 0
    e = next((e for e in body.eqns if out in e.outvars), None)
    if e is None or e.primitive.name not in ("add", "sub"):
      return None
    a, b = e.invars
    if a is var and _is_literal(b) and np.ndim(b.val) == 0:
      return b.val if e.primitive.name == "add" else -b.val
    if b is var and _is_literal(a) and np.ndim(a.val) == 0 and e.primitive.name == "add":
      return a.val
    return None

  (ia, a0), (ib, b0) = (start(v) for v in cmp.invars)
  if a0 is None or b0 is None:
    return None
  sa = 0 if ia is None else step(ia)
  sb = 0 if ib is None else step(ib)
  if sa is None or sb is None or (sa != 0) == (sb != 0):
    return None  # exactly one counter, the other side fixed
  name = cmp.primitive.name
  if sa == 0:  # the counter is on the right: mirror the comparison
    name, a0, b0, sa = _MIRROR[name], b0, a0, sb
  test = _COMPARE[name]
  if not np.issubdtype(np.asarray(a0).dtype, np.integer) or \
      not np.issubdtype(np.asarray(sa).dtype, np.integer):
    return None  # a float counter: rounding makes the count unsure
  a0, b0, sa = int(a0), int(b0), int(sa)
  if name == "ne":
    return (b0 - a0) // sa if (b0 - a0) % sa == 0 and (b0 - a0) // sa >= 0 else None
  if not test(a0, b0):
    return 0
  if (name in ("lt", "le")) != (sa > 0):
    return None  # runs away from the bound: unbounded (or until overflow)
  n = (b0 - a0) // sa if name in ("le", "ge") else -((a0 - b0) // sa)
  n = n + 1 if name in ("le", "ge") else n
  return n if 0 <= n <= limit else None


def _ids_key(label: Label, axes) -> tuple:
  """The ids a label carries on `axes` (empty: none), whatever positions they are at."""
  return tuple(sorted(ids.tobytes() for k, ids in label.items() if set(k) <= set(axes)))


def _distinct(ids: np.ndarray) -> bool:
  return np.unique(ids).size == ids.size


def _facet(label: Label, axis: int):
  for axes, ids in label.items():
    if axis in axes:
      return axes, ids
  return None


def _layer_name(kernel: str) -> str:
  parts = kernel.split("/")
  if parts[0] == "params" and len(parts) > 1:
    parts = parts[1:]
  if len(parts) > 1 and parts[-1] == "kernel":
    parts = parts[:-1]
  return "/".join(parts)


def _reshape_blocks(shape, new):
  """Minimal runs of input and output axes with equal products (row-major reshape)."""
  blocks, i, j = [], 0, 0
  while i < len(shape) and j < len(new):
    ai, aj, pi, pj = [i], [j], shape[i], new[j]
    i, j = i + 1, j + 1
    while pi != pj:
      if pi < pj:
        ai.append(i)
        pi *= shape[i]
        i += 1
      else:
        aj.append(j)
        pj *= new[j]
        j += 1
    # Trailing size-1 axes join the run they follow.
    while i < len(shape) and shape[i] == 1 and (j >= len(new) or new[j] != 1):
      ai.append(i)
      i += 1
    while j < len(new) and new[j] == 1 and (i >= len(shape) or shape[i] != 1):
      aj.append(j)
      j += 1
    blocks.append((ai, aj))
  if i < len(shape) or j < len(new):
    blocks.append((list(range(i, len(shape))), list(range(j, len(new)))))
  return blocks
