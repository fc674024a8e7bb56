"""TAS search on any model (a :class:`jaxprune.search.Space`): its graph's channel groups
are the widths, its skippable residual blocks the depths (docs/methods/tas.md §1-§7)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import flops
from jaxprune import kernels
from jaxprune import surgery
from jaxprune.errors import UserError
from jaxprune.graph import group as graph_lib
from jaxprune.graph import tracing
from jaxprune.graph import interpret
from jaxprune.search.base import ARCH_INIT_STD, Selection
from jaxprune.search.base import depth_candidates, fitted_candidates, rounded_candidates
from jaxprune.surgery import blocks as blocks_lib
from jaxprune import latency as latency_lib
from jaxprune.surgery.rebuild import probe_inputs

_AFFINE = ("add", "sub", "mul", "div")
_PASS = interpret.CASTS


class SearchSpace:
  """The TAS width search space of a model (see the module docstring).

  Attributes:
    model: the model as a Linen module taking ``train`` (an NNX model is wrapped
      in :class:`jaxprune.models.adapters.FromNNX`).
    variables: its variables (for an NNX model, the wrapper's).
    graph: the dependency graph the space was built from.
    groups: the searched :class:`jaxprune.graph.Group` s, in call order.
    names: the key of each searched group's logits in ``arch["width_logits"]``.
    candidates: each searched group's candidate widths.
    excluded: ``{group id: reason}`` of prunable groups left at full width.
    num_picks: |I|.

  ``round_to`` rounds every group's candidates up to its multiples; with
  ``fit_round_to=True`` (TAS's backend-default ``round_to``) a group it would leave with
  fewer than ``num_picks`` candidates uses the largest of ``round_to // 2, ..., 1`` that
  does not (:func:`fitted_candidates`), instead of being excluded. Given ``target_ratio``
  too (the search's FLOPs ratio), groups not wider than ``round_to`` are left whole while
  the other groups' smallest candidates, at every searched stage's smallest depth, still
  reach it (as ``surgery.prune_to``'s default,
  :func:`jaxprune.surgery.targets.default_steps`: on the vectors that chose the default
  a narrower such group saves FLOPs, not time).
  """
  kind = "graph"  # its name in the Space protocol (tas.space=graph)

  def __init__(self, model, variables, input_shape: Any, call=None, *, num_picks: int = 2,
               round_to: int = 1, ignore: Sequence[str] = (), depth: bool = True,
               fit_round_to: bool = False, target_ratio: float | None = None):
    if (isinstance(num_picks, bool) or not isinstance(num_picks, (int, np.integer))
        or num_picks < 2):
      raise UserError(f"num_picks must be an int >= 2, got {num_picks!r}: with one pick the "
                      "sampled width gets weight 1 and the width logits no gradient "
                      "(TAS uses 2).")
    if (isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer))
        or round_to < 1):
      raise UserError(f"round_to must be an int >= 1, got {round_to!r}.")
    self.model, self.variables = blocks_lib.linen_form(model, variables, call)
    self.input_shape = (tuple(input_shape) if tracing.is_shape(input_shape)
                        else input_shape)
    self.num_picks = int(num_picks)
    self.round_to = int(round_to)
    self.graph = graph_lib.trace(self.model, self.variables, input_shape, ignore=ignore,
                                 round_to=round_to)
    closed, paths, leaves = blocks_lib.eval_jaxpr(self.model, self.variables,
                                                  self._example())
    found = self._mix_points(closed, paths, leaves)
    self.excluded: dict[int, str] = {}
    groups = []

    def candidates_of(width):
      return (fitted_candidates(width, round_to, self.num_picks) if fit_round_to
              else rounded_candidates(width, round_to))
    shapes = dict(zip(self.graph.traced.paths, self.graph.traced.shapes))
    for g in self.graph.prunable():
      cands = candidates_of(g.width)
      # The mix acts on the last axis of a producer's output: the group's channels must
      # be that axis, in order (a kernel's last axis; not attention heads, not a
      # flattened spatial copy).
      producers = [m for m in g.members if m.role == "producer"]
      unseen = [m.path for m in producers if m.path not in found]
      wrong = [m.path for m in producers if m.path in found and (
          found[m.path] != g.width or m.index.shape[1] != 1
          or m.axis != len(shapes[m.path]) - 1
          or not np.array_equal(m.index[:, 0], np.arange(g.width)))]
      if len(cands) < self.num_picks:
        self.excluded[g.id] = f"{len(cands)} width candidates < num_picks={num_picks}"
      elif unseen:
        self.excluded[g.id] = (f"producer {unseen[0]}: no conv or matmul reads it as its "
                               "kernel alone (computed from other values first), so its "
                               "output cannot be mixed")
      elif wrong:
        spans = [m for m in producers if m.path == wrong[0]][0].index.shape[1]
        self.excluded[g.id] = (
            f"producer {wrong[0]}: a channel of the group spans {spans} of its output "
            "channels (a whole GroupNorm group or head), and the width mix acts on single "
            "channels" if spans > 1 else
            f"producer {wrong[0]} does not put the group's channels on its output's last axis")
      else:
        groups.append(g)
    self.stages, self.depth_names, self.excluded_stages = [], [], {}
    self.depth_candidates = []
    if depth:
      self._find_stages(closed, paths, leaves)
    if fit_round_to and target_ratio is not None:
      whole = self._narrow_whole(groups, target_ratio, candidates_of)
      for g in whole:
        self.excluded[g.id] = (f"not wider than round_to={round_to}, the backend's default: "
                               "left whole (narrowing it saves FLOPs, not time)")
      groups = [g for g in groups if g not in whole]
    if not groups:
      raise UserError("SearchSpace: the model has no searchable channel group "
                      f"({len(self.graph.prunable())} prunable; excluded: "
                      f"{self.excluded or 'none'}).")
    self.groups = groups
    self.candidates = [candidates_of(g.width) for g in groups]
    first_op = {}
    for i, op in enumerate(self.graph.ops):
      first_op.setdefault(op.kernel, i)
    self.names = [_group_name(min(g.producers, key=lambda p: first_op.get(p, 1 << 30)))
                  for g in groups]
    if len(set(self.names)) != len(self.names):
      self.names = [f"{n}#{g.id}" for n, g in zip(self.names, groups)]
    self._group_of_kernel = {p: s for s, g in enumerate(groups) for p in g.producers}
    self._costs = self._cost_table()

  def _narrow_whole(self, groups, ratio: float, candidates_of) -> list:
    """Those of the searchable ``groups`` not wider than ``round_to``, when some is wider
    and the others' smallest candidates (these and the unsearched groups whole) at every
    searched stage's smallest depth reach ``ratio`` of the FLOPs; else none."""
    narrow = [g for g in groups if g.width <= self.round_to]
    if not narrow or len(narrow) == len(groups):
      return []
    # The argmax cost of that network: the space's own count, over the other groups.
    self.groups = [g for g in groups if g not in narrow]
    self.candidates = [candidates_of(g.width) for g in self.groups]
    self._costs = self._cost_table()
    first = lambda n: np.eye(n)[0]  # candidates and depths are sorted: the smallest
    cost = self._cost([first(len(c)) for c in self.candidates],
                      [first(len(c)) for c in self.depth_candidates], with_bias=True, xp=np)
    return narrow if cost <= ratio * self.graph.flops * (1 + 1e-12) else []

  # --- depth (tas.md §1, §4, §5) ----------------------------------------------------

  def _find_stages(self, closed, paths, leaves):
    """The depth-searched stages: :func:`jaxprune.surgery.blocks.skippable_stages` of the
    eval-mode jaxpr (``excluded_stages``: name -> reason for the others)."""
    del leaves
    kept, self.excluded_stages = blocks_lib.skippable_stages(
        self.model, self.variables, closed, paths, self._num_inputs(), self._example,
        [op.kernel for op in self.graph.ops])
    self.stages = [st for _, st in kept]
    self.depth_names = [name for name, _ in kept]
    self.depth_candidates = [depth_candidates(st.n) for st in self.stages]

  def init_depth(self, key: jax.Array) -> dict[str, jax.Array]:
    return {n: ARCH_INIT_STD * jax.random.normal(jax.random.fold_in(key, s), (len(c),))
            for s, (n, c) in enumerate(zip(self.depth_names, self.depth_candidates))}

  def depth_logits(self, arch: Mapping[str, Any]) -> list[jax.Array]:
    return [arch["depth_logits"][n] for n in self.depth_names]

  def sample_depths(self, arch: Mapping[str, Any], tau, key: jax.Array) -> list[jax.Array]:
    """The Gumbel-softmax vector over every stage's depth candidates (tas.md §2)."""
    return [kernels.gumbel_softmax(jax.random.fold_in(key, (1 << 30) + s), beta, tau)
            for s, beta in enumerate(self.depth_logits(arch))]

  def derive_depths(self, arch: Mapping[str, Any]) -> list[int]:
    """The argmax depth of every searched stage (tas.md §7), on the host."""
    return [int(c[int(np.argmax(np.asarray(b)))])
            for c, b in zip(self.depth_candidates, self.depth_logits(arch))]

  def skipped(self, arch: Mapping[str, Any]) -> list[str]:
    """Module paths of the blocks the argmax depths drop."""
    out = []
    for st, d in zip(self.stages, self.derive_depths(arch)):
      out += [b.prefix for i, b in enumerate(st.blocks) if st.position(i) > d]
    return out

  # --- architecture parameters -----------------------------------------------------

  def init_arch(self, key: jax.Array) -> dict[str, Any]:
    """A fresh ``arch`` tree: ``{"width_logits": {name: N(0, 0.01) [n_candidates]}}``,
    and ``"depth_logits": {stage name: N(0, 0.01) [n_depth_candidates]}`` when the
    model has searched stages."""
    wkey, dkey = jax.random.split(key)
    arch = {"width_logits": {
        n: ARCH_INIT_STD * jax.random.normal(jax.random.fold_in(wkey, s), (len(c),))
        for s, (n, c) in enumerate(zip(self.names, self.candidates))}}
    if self.stages:
      arch["depth_logits"] = self.init_depth(dkey)
    return arch

  def width_logits(self, arch: Mapping[str, Any]) -> list[jax.Array]:
    return [arch["width_logits"][n] for n in self.names]

  def sample(self, arch: Mapping[str, Any], tau, key: jax.Array) -> list[Selection]:
    """|I| picks per searched group (tas.md §2), with their mixing weights."""
    out = []
    for s, (alpha, cands) in enumerate(zip(self.width_logits(arch), self.candidates)):
      indices, weights = kernels.gumbel_select(jax.random.fold_in(key, s), alpha, tau,
                                               k=self.num_picks)
      widths = jnp.asarray(cands, jnp.int32)[indices]
      out.append(Selection(indices, weights, widths))
    return out

  def derive(self, arch: Mapping[str, Any]) -> dict[int, int]:
    """``{group id: argmax width}`` (tas.md §7), on the host."""
    return {g.id: int(c[int(np.argmax(np.asarray(a)))])
            for g, c, a in zip(self.groups, self.candidates, self.width_logits(arch))}

  def keep(self, arch: Mapping[str, Any]) -> dict[int, np.ndarray]:
    """The derived network's ``keep`` for :func:`jaxprune.surgery.prune`: channel
    prefixes of the argmax widths (candidates are prefixes, §4)."""
    return {gid: np.arange(w) for gid, w in self.derive(arch).items()}

  # --- costs (tas.md §5) ------------------------------------------------------------

  @property
  def flops_max(self) -> int:
    """FLOPs of the full network (the FLOPs counter's)."""
    return self.graph.flops

  def _cost_table(self):
    factor = latency_lib.channel_factor(self.graph, self.groups, self.candidates)
    reach = {}
    for t, st in enumerate(self.stages):
      for b, blk in enumerate(st.blocks):
        for k in blk.params:
          reach[k] = (t, st.position(b))
    table = []
    for op in self.graph.ops:
      table.append((float(op.macs), [factor(f) for f in op.factors],
                    float(op.bias_adds), [factor(f) for f in op.bias_factors],
                    reach.get(op.kernel)))
    return table

  def _cost(self, dists, depth_dists, with_bias: bool, xp=jnp):
    f32 = jnp.float32 if xp is jnp else np.float64

    def frac(f: latency_lib.Factor):
      out = xp.asarray(f.const, f32)
      for s, m in f.terms:
        out = out + dists[s] @ xp.asarray(m, f32)
      return out
    reaches = self.reach(depth_dists) or [None] * len(self._costs)
    total = xp.zeros((), f32)
    for (macs, factors, bias_adds, bias_factors, at), reach in zip(self._costs, reaches):
      term = xp.asarray(macs, f32)
      for f in factors:
        term = term * frac(f)
      if with_bias and bias_adds:
        bias = xp.asarray(bias_adds, f32)
        for f in bias_factors:
          bias = bias * frac(f)
        term = term + bias
      if at is not None:
        term = term * reach
      total = total + term
    return total

  def reach(self, depth_dists) -> list | None:
    """Per op of ``graph.ops``: the probability that a depth drawn from ``depth_dists``
    (one distribution per searched stage) reaches the op's block, the reverse cumulative
    sum at its position (tas.md §5); 1.0 outside searched stages. None without stages."""
    if not self.stages:
      return None
    reach_of = {}
    for t, (cands, q) in enumerate(zip(self.depth_candidates, depth_dists)):
      for p in range(1, max(cands) + 1):
        reach_of[(t, p)] = sum(q[j] for j, c in enumerate(cands) if c >= p)
    return [1.0 if row[4] is None else reach_of[row[4]] for row in self._costs]

  def _dists(self, arch, argmax: bool, xp=jnp):
    def one(a):
      a = xp.asarray(a, jnp.float32 if xp is jnp else np.float64)
      if argmax:
        return (xp.arange(a.shape[-1]) == xp.argmax(a)).astype(a.dtype)
      if xp is jnp:
        return jax.nn.softmax(a)
      e = np.exp(a - a.max())
      return e / e.sum()
    return ([one(a) for a in self.width_logits(arch)],
            [one(b) for b in self.depth_logits(arch)])

  def expected_cost(self, arch: Mapping[str, Any]) -> jax.Array:
    """E_cost (tas.md §5): every op's MACs times the product of its factors' expected
    kept fractions under ``softmax(alpha)`` (a product of expectations; bias adds left
    out, as the official expected cost does), times the probability under
    ``softmax(beta)`` that the depth reaches the op's block. Differentiable, jit-safe."""
    return self._cost(*self._dists(arch, False), with_bias=False)

  def argmax_cost(self, arch: Mapping[str, Any]) -> jax.Array:
    """F_cost (tas.md §5): the exact FLOPs of the argmax network (bias adds included;
    the blocks beyond the argmax depths dropped), as a traced float32 scalar."""
    return self._cost(*self._dists(arch, True), with_bias=True)

  def predict(self, arch: Mapping[str, Any]) -> int:
    """F_cost on the host, exactly (float64): the FLOPs counter's count of
    :meth:`derived_network`."""
    return int(round(float(self._cost(*self._dists(arch, True, np), with_bias=True, xp=np))))

  def derived_network(self, arch: Mapping[str, Any], variables=None):
    """``(model, variables)`` of the derived network (tas.md §7): every searched group
    cut to its argmax prefix by :func:`jaxprune.surgery.prune`, the blocks beyond every
    stage's argmax depth skipped (:func:`jaxprune.surgery.blocks.skip_blocks`).

    ``variables`` default to the space's; the derived network's FLOPs are checked
    against :meth:`predict`."""
    variables = self.variables if variables is None else variables
    if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(variables)):
      variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), variables)
    pruned = surgery.prune(self.model, variables, self.input_shape, self.keep(arch))
    model, small = blocks_lib.skip_blocks(pruned.model, pruned.variables, self.skipped(arch))
    got = flops.count(model, small, self.input_shape)["flops"]
    want = self.predict(arch)
    if got != want:
      raise UserError(f"derived network: {got} FLOPs counted, {want} predicted by the "
                      "search space (a bug: please report it with the model).")
    return model, small

  # --- the search recipe's protocol (jaxprune.search.Space) -------------------------

  def init(self, key: jax.Array):
    """``(params, model_state, arch)`` of a fresh search: the model's own init."""
    pkey, akey = jax.random.split(key)
    variables = dict(self.model.init(pkey, self._example(), train=False))
    params = variables.pop("params")
    return params, variables, self.init_arch(akey)

  def forward(self, params, model_state, arch, x, tau, key: jax.Array):
    """The train-mode search forward (:meth:`apply`): ``(logits, new model_state)``."""
    logits, updates = self.apply({"params": params, **model_state}, x, arch, train=True,
                                 tau=tau, key=key,
                                 rngs={"dropout": jax.random.fold_in(key, 1)})
    return logits, {**model_state, **updates}

  def record(self, arch: Mapping[str, Any]) -> dict:
    """The space's keys of an ``arch_history.jsonl`` line (concrete ``arch``)."""
    widths = self.derive(arch)
    return {
        "expected_flops": float(self.expected_cost(arch)),
        "argmax_flops": self.predict(arch),
        "width_candidates": [list(c) for c in self.candidates],
        "width_probs": [np.asarray(jax.nn.softmax(a)).tolist()
                        for a in self.width_logits(arch)],
        "depth_candidates": [list(c) for c in self.depth_candidates],
        "depth_probs": [np.asarray(jax.nn.softmax(b)).tolist()
                        for b in self.depth_logits(arch)],
        "argmax_widths": [widths[g.id] for g in self.groups],
        "argmax_blocks": self.derive_depths(arch), "skipped_blocks": self.skipped(arch),
        "conv_names": list(self.names), "stage_names": list(self.depth_names)}

  def derived_from(self, record: Mapping[str, Any]):
    """``(model, architecture)`` of a :meth:`record`: the user's network with every
    searched group cut to its argmax prefix and the blocks beyond every stage's argmax
    depth skipped (:meth:`derived_network` of the record's one-hot ``arch``; the
    variables are a fresh init's: only the shape is used, it is retrained)."""
    def one_hot(cands, pick):
      return jnp.asarray([0.0 if c != pick else 1.0 for c in cands])
    arch = {"width_logits": {n: one_hot(c, w) for n, c, w in
                             zip(self.names, self.candidates, record["argmax_widths"])}}
    if self.stages:
      arch["depth_logits"] = {n: one_hot(c, d) for n, c, d in zip(
          self.depth_names, self.depth_candidates, record["argmax_blocks"])}
    variables = jax.device_get(self.model.init(jax.random.key(0), self._example(),
                                               train=False))
    model, _ = self.derived_network(arch, variables)
    return model, {"widths": dict(zip(record["conv_names"], record["argmax_widths"])),
                   "blocks": dict(zip(self.depth_names, record["argmax_blocks"])),
                   "skipped_blocks": self.skipped(arch)}

  # --- the search-mode forward (tas.md §4) -----------------------------------------

  def apply(self, variables, x, arch: Mapping[str, Any] | None = None, *, train: bool,
            tau=None, key: jax.Array | None = None,
            selections: Sequence[Selection] | None = None,
            depth_probs: Sequence[jax.Array] | None = None, rngs=None):
    """The model's forward with every searched group's producers CWI-mixed and every
    searched stage's output mixed over its depth candidates.

    Args:
      variables: the model's variables (``params``, ``batch_stats``, ...).
      x: a batch of inputs.
      arch: the ``arch`` tree (with ``tau`` and ``key``, picks and depth weights are
        sampled), or None with explicit ``selections``.
      train: the model's train mode (batch statistics, updated collections).
      selections: one :class:`Selection` per searched group (overrides sampling).
      depth_probs: one weight vector per searched stage (overrides sampling; with
        explicit ``selections`` and none given, every stage runs at full depth).
      rngs: Linen rngs for the model (e.g. ``{"dropout": key}``).

    Returns:
      ``logits`` (eval) or ``(logits, updated non-param collections)`` (train).
    """
    if selections is None:
      selections = self.sample(arch, tau, key)
      if depth_probs is None and self.stages:
        depth_probs = self.sample_depths(arch, tau, key)
    mutable = [c for c in variables if c != "params"]

    def fn(v, x):
      if train:
        return self.model.apply(v, x, train=True, mutable=mutable, rngs=rngs or {})
      return self.model.apply(v, x, train=False)
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    paths = [tracing.leaf_name(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    closed, out_shape = jax.make_jaxpr(
        lambda ls, x: fn(jax.tree_util.tree_unflatten(treedef, ls), x),
        return_shape=True)(leaves, x)
    if len(selections) != len(self.groups):
      raise UserError(f"apply: {len(selections)} selections for {len(self.groups)} "
                      "searched groups.")
    stage_ends = {}
    if depth_probs is not None and self.stages:
      if len(depth_probs) != len(self.stages):
        raise UserError(f"apply: {len(depth_probs)} depth weight vectors for "
                        f"{len(self.stages)} searched stages.")
      here = {st.key: st for st in blocks_lib.find_stages(
          closed.jaxpr, paths + [None] * len(jax.tree.leaves(x)), len(paths),
          allow_outputs=train)}
      for st, probs in zip(self.stages, depth_probs):
        found = here.get(st.key)
        if found is None:
          raise UserError(f"apply: the stage of blocks {[b.prefix for b in st.blocks]} "
                          f"is not found in the {'train' if train else 'eval'}-mode pass.")
        outs = found.outputs()
        stage_ends[outs[-1]] = [(outs[d - 1], probs[j])
                                for j, d in enumerate(depth_candidates(st.n))]
    outs = _Interpreter(paths, self._group_of_kernel, list(selections), stage_ends).run(
        closed, leaves + jax.tree.leaves(x))
    return jax.tree_util.tree_unflatten(jax.tree.structure(out_shape), outs)

  def _num_inputs(self) -> int:
    return len(jax.tree.leaves(tracing.example_inputs(self.input_shape)))

  def _example(self, rng=None):
    """A batch of one example of the input(s) (:func:`tracing.example_inputs`): zeros,
    or with ``rng`` surgery's probe (:func:`jaxprune.surgery.rebuild.probe_inputs`:
    normal floats, integer inputs and masks zeros and ones) seeded from it."""
    if rng is None:
      return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                          tracing.example_inputs(self.input_shape))
    return probe_inputs(self.input_shape, 1, seed=int(rng.integers(1 << 31)))

  def _mix_points(self, closed, paths, leaves) -> dict[str, int]:
    """``{producer kernel path: channel count at its mixing point}`` (abstract run)."""
    x = tracing.example_inputs(self.input_shape)
    interp = _Interpreter(paths, None, None)
    jax.eval_shape(lambda ls, x: interp.run(closed, list(ls) + jax.tree.leaves(x)), leaves, x)
    return interp.found


def _group_name(path: str) -> str:
  """A readable key for a group: the layer path of its first producer in call order."""
  parts = path.split("/")
  if parts[0] in ("params",):
    parts = parts[1:]
  return "/".join(parts[:-1]) or path


class _Interpreter(interpret.Interpreter):
  """Evaluates a jaxpr, replacing every searched producer's output by its CWI mix.

  ``group_of_kernel`` maps a producer's kernel path to its searched group; ``mixes``
  gives each group's :class:`Selection`. With both None it only records the mixing
  points (``found``: kernel path -> channels there).
  """

  def __init__(self, paths, group_of_kernel, mixes, stage_ends=None):
    self.paths = paths
    self.group_of_kernel = group_of_kernel
    self.mixes = mixes
    # {the var after a stage's last block: [(var after candidate depth, weight)]}
    self.stage_ends = stage_ends or {}
    self.found: dict[str, int] = {}

  def run(self, closed, args):
    tags = [("leaf", p) for p in self.paths] + [None] * (len(args) - len(self.paths))
    return self.interpret(closed, args, tags)

  # Static analysis of one jaxpr level: kernel tags and chain ends.
  def _analyse(self, jaxpr, arg_tags, top: bool = False):
    """``(ends, open, recurse)``: chain ends to mix at this level ``{var: kernel}``,
    chains that leave through an output ``{out index: kernel}`` (the parent continues
    them: a conv wrapped in a custom_vjp is a producer of its caller), and the nested
    eqns to evaluate inside (they hold an end)."""
    tags = {}
    for v, t in zip(jaxpr.invars, arg_tags):
      tags[v] = t
    uses, defs = interpret.uses_defs(jaxpr)
    starts = {}  # var produced by a layer -> kernel path
    recurse = set()
    for i, eqn in enumerate(jaxpr.eqns):
      in_tags = [None if interpret.is_literal(v) else tags.get(v) for v in eqn.invars]
      name = eqn.primitive.name
      if name in interpret.LAYERS:
        leaf_side = [s for s, t in enumerate(in_tags) if t and t[0] == "leaf"]
        if len(leaf_side) == 1 and _is_kernel(in_tags[leaf_side[0]][1]):
          starts[eqn.outvars[0]] = in_tags[leaf_side[0]][1]
          continue
      tag = _leaf_tag(eqn, in_tags)
      if tag is not None:
        tags[eqn.outvars[0]] = tag
      if name in interpret.SHAPE_ONLY:
        continue
      body = interpret.call_body(eqn)
      if body is not None and any(t and t[0] == "leaf" for t in in_tags):
        inner_ends, inner_open, _ = self._analyse(body.jaxpr, in_tags)
        if inner_ends:
          recurse.add(i)
        for k, kernel in inner_open.items():
          starts[eqn.outvars[k]] = kernel
    ends, open_ends = {}, {}
    out_index = {v: k for k, v in enumerate(jaxpr.outvars) if not interpret.is_literal(v)}
    for v, kernel in starts.items():
      while v not in out_index:
        nxt = [j for j in uses.get(v, ()) if _continues(jaxpr.eqns[j], v, defs, jaxpr)]
        if len(nxt) > 1:
          nxt = _past_duplicate_casts(nxt, jaxpr, uses, defs)
        if len(nxt) != 1:
          break
        v = jaxpr.eqns[nxt[0]].outvars[0]
      if v in out_index and not top:
        open_ends[out_index[v]] = kernel
      else:
        ends[v] = kernel
    return ends, open_ends, recurse

  def enter(self, frame):
    arg_tags = [frame.tags.get(v) for v in frame.jaxpr.invars]
    frame.data = self._analyse(frame.jaxpr, arg_tags, frame.top)

  def descend(self, frame, i, eqn, tags) -> bool:
    return i in frame.data[2]

  def equation(self, frame, i, eqn, vals, tags):
    outs, _ = super().equation(frame, i, eqn, vals, tags)
    ends = frame.data[0]
    tag = _leaf_tag(eqn, tags)
    mixed = []
    for v, o in zip(eqn.outvars, outs):
      if v in ends:
        o = self._mix(ends[v], o)
      if frame.top and v in self.stage_ends:
        # A stage's output: its candidate depths mixed (tas.md §4; one residual
        # stream, so the CWI alignment is the identity).
        # (Summed in float32 at least, like the CWI mix.)
        o = sum(jnp.asarray(w, jnp.float32) * (o if u is v else frame.env[u])
                for u, w in self.stage_ends[v]).astype(o.dtype)
      mixed.append(o)
    return mixed, [tag] + [None] * (len(outs) - 1)

  def _mix(self, kernel, y):
    self.found[kernel] = int(y.shape[-1]) if y.ndim else 0
    if self.group_of_kernel is None or kernel not in self.group_of_kernel:
      return y
    sel = self.mixes[self.group_of_kernel[kernel]]
    c_full = y.shape[-1]
    cwi = jax.vmap(kernels.cwi_matrix_traced, (0, None, None))(
        sel.widths, sel.out_width, c_full)  # [k, C, C]
    mix = jnp.einsum("k,kcd->cd", sel.weights.astype(jnp.float32), cwi)
    return jnp.matmul(y.astype(jnp.float32), mix).astype(y.dtype)


def _leaf_tag(eqn, in_tags):
  """The leaf an eqn's output is computed from alone: a cast, reshape or transpose of a
  parameter, or any op on one parameter (a weight-standardised kernel, ``(w -
  mean(w)) / std(w)``), so that the conv reading it is that kernel's layer."""
  if len(eqn.outvars) != 1:
    return None
  name = eqn.primitive.name
  if name in interpret.SHAPE_ONLY:
    t = in_tags[0] if in_tags else None
    return t if t is not None and t[0] == "leaf" else None
  tags = [t for t, v in zip(in_tags, eqn.invars) if not interpret.is_literal(v)]
  if tags and all(t is not None and t[0] == "leaf" for t in tags) and len(set(tags)) == 1:
    return tags[0]
  return None


def _is_kernel(path: str) -> bool:
  return path.startswith("params/")


def _per_channel(u, shape, defs, jaxpr) -> bool:
  """Whether `u` is constant along every axis of `shape` but the last (a scalar, a
  ``[C]`` / ``[1, ..., C]`` vector, or one broadcast to the full shape)."""
  if interpret.is_literal(u):
    return np.ndim(u.val) == 0
  ushape = tuple(u.aval.shape)
  if not ushape or all(d == 1 for d in ushape[:-1]):
    return len(ushape) <= len(shape)
  i = defs.get(u)
  if i is None:
    return False
  eqn = jaxpr.eqns[i]
  if eqn.primitive.name == "broadcast_in_dim":
    operand = eqn.invars[0]
    dims = eqn.params["broadcast_dimensions"]
    oshape = () if interpret.is_literal(operand) else tuple(operand.aval.shape)
    return all(d == 1 or out_axis == len(ushape) - 1 for d, out_axis in zip(oshape, dims))
  if eqn.primitive.name in _PASS:
    return _per_channel(eqn.invars[0], shape, defs, jaxpr)
  return False


def _past_duplicate_casts(nxt, jaxpr, uses, defs) -> list[int]:
  """Of several identical casts of one value (a norm of a bfloat16 model casts its
  input once for the statistics, once to normalise it), the one whose result the chain
  continues from; ``nxt`` unchanged when they are not such casts."""
  eqns = [jaxpr.eqns[j] for j in nxt]
  if any(e.primitive.name not in _PASS or e.primitive is not eqns[0].primitive
         or e.params != eqns[0].params for e in eqns):
    return nxt
  onward = [j for j in nxt if any(
      _continues(jaxpr.eqns[k], jaxpr.eqns[j].outvars[0], defs, jaxpr)
      for k in uses.get(jaxpr.eqns[j].outvars[0], ()))]
  return onward if len(onward) == 1 else nxt


def _continues(eqn, v, defs, jaxpr) -> bool:
  """Whether `eqn` continues `v`'s per-channel affine chain (a bias add, a norm)."""
  name = eqn.primitive.name
  if name in _PASS:
    return eqn.invars[0] is v
  if name == "reshape":  # leading axes regrouped (a vmapped layer), channels kept last
    out = tuple(eqn.outvars[0].aval.shape)
    return (eqn.invars[0] is v and bool(out) and bool(v.aval.shape)
            and out[-1] == v.aval.shape[-1] and eqn.params.get("dimensions") is None)
  if name not in _AFFINE or len(eqn.invars) != 2:
    return False
  a, b = eqn.invars
  if a is v and b is not v:
    other = b
  elif b is v and a is not v and name != "div":
    other = a
  else:
    return False
  if tuple(eqn.outvars[0].aval.shape) != tuple(v.aval.shape):
    return False
  return _per_channel(other, tuple(v.aval.shape), defs, jaxpr)


__all__ = ["SearchSpace", "rounded_candidates"]
