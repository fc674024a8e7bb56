"""TAS width search on any model, over the channel groups of its dependency graph.

:class:`SearchSpace` turns a Linen or NNX model into a TAS supernet (tas.md §1-§5)
without changing the model's code:

- every prunable channel group of :func:`jaxprune.graph.trace` is a searchable width
  whose candidates are channel prefixes, :func:`jaxprune.models.width_candidates` of
  its width (rounded up to ``round_to``), with one logit vector alpha (N(0, 0.01));
- :meth:`SearchSpace.sample` draws |I| = ``num_picks`` candidates per group with
  :func:`jaxprune.kernels.gumbel_select`;
- :meth:`SearchSpace.apply` runs the model's own forward pass (its jaxpr, interpreted
  once per trace) and, at every producer of a searched group, replaces the producer's
  output by the CWI mix of the picks (§4):
  ``sum_j w_j * CWI(y[..., :C_j] -> max C)``, zero beyond ``max C``. The output ``y`` is
  taken at the end of the producer's per-channel affine chain: after its bias add and
  after a batch norm that follows it (before any activation), where TAS mixes
  ``BN_j(y[:C_j])``;
- :meth:`SearchSpace.expected_cost` and :meth:`SearchSpace.argmax_cost` are E_cost
  and F_cost of §5 from the graph's own op table (the FLOPs counter's convention):
  each op's MACs times the product over its channel factors of the expected (or
  argmax) kept fraction;
- :meth:`SearchSpace.derive` gives the argmax width of every group, and
  :meth:`SearchSpace.keep` the ``keep`` of :func:`jaxprune.surgery.prune` that
  builds the derived network.

Differences from the dedicated :class:`jaxprune.models.TASResNet` (the official
supernet), all consequences of searching the user's network as it is:

- **one width per group.** Channels the graph couples (a residual stream: the stem,
  every block's last conv and the shortcut convs of a stage) share one width and one
  pick; TASResNet gives every conv its own logits and adds narrower tensors into
  wider ones. With TASResNet's picks tied across such a group, both compute the same
  logits, costs and gradients (``tests/test_search.py``);
- **one batch norm per channel, not per candidate.** In train mode a channel's batch
  statistics do not depend on the candidate (TASResNet's own note), so
  ``BN_j(y[:C_j]) == BN(y)[:C_j]`` when the candidates' affine rows are equal: the
  generic search shares the model's one scale/bias and running statistics across
  candidates (TASResNet starts its rows equal; they drift apart as each candidate
  trains only when picked);
- **the network's own layers.** A stride-2 CIFAR shortcut is mixed after the model's
  1x1 conv (no BN, as the plain ResNet and the derived network have); TASResNet adds
  a search-only BN there (tas.md §4).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
from flax import nnx
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from jaxprune import kernels
from jaxprune.errors import UserError
from jaxprune.graph import group as graph_lib
from jaxprune.graph import tracing
from jaxprune.graph.propagate import _subjaxpr
from jaxprune.models import external
from jaxprune.models.tas_resnet import Selection, width_candidates

_ARCH_INIT_STD = 0.01  # tas.md §1
_AFFINE = ("add", "sub", "mul", "div")
_PASS = ("convert_element_type", "copy", "copy_p")
_SHAPE = ("reshape", "transpose", "broadcast_in_dim")


def rounded_candidates(width: int, round_to: int = 1) -> tuple[int, ...]:
  """Width candidates of a group (tas.md §1), rounded up to multiples of `round_to`
  (capped at the full width; duplicates merged)."""
  base = width_candidates(width)
  if round_to <= 1:
    return base
  return tuple(sorted({min(width, int(math.ceil(c / round_to) * round_to)) for c in base}))


@dataclasses.dataclass
class _Factor:
  const: float  # kept fraction of the ids outside every searched group
  terms: list  # [(searched group index, [n_candidates] fraction of the ids kept)]


def _as_linen(model, variables):
  """The engine's model form: a Linen module called with ``train``, and its variables."""
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise UserError("an nnx.Module carries its own variables: pass variables=None.")
    wrapper, variables = external.from_nnx(model)
    return wrapper, variables
  if isinstance(model, nn.Module):
    if variables is None:
      raise UserError(f"the Linen module {type(model).__name__} needs its variables.")
    if not tracing.accepts_train(model):
      model = external.WithTrain(model, external.mode_flag(model))
    return model, variables
  raise UserError(f"SearchSpace: {type(model).__name__} is neither a Linen module nor an "
                  "nnx.Module.")


class SearchSpace:
  """The TAS width search space of a model (see the module docstring).

  Attributes:
    model: the model as a Linen module taking ``train`` (an NNX model is wrapped
      in :class:`jaxprune.models.external.FromNNX`).
    variables: its variables (for an NNX model, the wrapper's).
    graph: the dependency graph the space was built from.
    groups: the searched :class:`jaxprune.graph.Group` s, in call order.
    names: the key of each searched group's logits in ``arch["width_logits"]``.
    candidates: each searched group's candidate widths.
    excluded: ``{group id: reason}`` of prunable groups left at full width.
    num_picks: |I|.
  """

  def __init__(self, model, variables, input_shape: Sequence[int], *, num_picks: int = 2,
               round_to: int = 1, ignore: Sequence[str] = ()):
    if int(num_picks) != num_picks or num_picks < 1:
      raise UserError(f"num_picks must be a positive int, got {num_picks!r} (TAS uses 2).")
    self.model, self.variables = _as_linen(model, variables)
    self.input_shape = tuple(input_shape)
    self.num_picks = int(num_picks)
    self.round_to = int(round_to)
    self.graph = graph_lib.trace(self.model, self.variables, input_shape, ignore=ignore,
                                 round_to=round_to)
    found = self._mix_points(jnp.zeros((1, *input_shape), jnp.float32))
    self.excluded: dict[int, str] = {}
    groups = []
    shapes = dict(zip(self.graph.traced.paths, self.graph.traced.shapes))
    for g in self.graph.prunable():
      cands = rounded_candidates(g.width, round_to)
      # The mix acts on the last axis of a producer's output: the group's channels must
      # be that axis, in order (a kernel's last axis; not attention heads, not a
      # flattened spatial copy).
      wrong = [m.path for m in g.members if m.role == "producer" and (
          m.path not in found or found[m.path] != g.width or m.index.shape[1] != 1
          or m.axis != len(shapes[m.path]) - 1
          or not np.array_equal(m.index[:, 0], np.arange(g.width)))]
      if len(cands) < self.num_picks:
        self.excluded[g.id] = f"{len(cands)} width candidates < num_picks={num_picks}"
      elif wrong:
        self.excluded[g.id] = (f"producer {wrong[0]} does not put the group's channels on "
                               "its output's last axis")
      else:
        groups.append(g)
    if not groups:
      raise UserError("SearchSpace: the model has no searchable channel group "
                      f"({len(self.graph.prunable())} prunable; excluded: "
                      f"{self.excluded or 'none'}).")
    self.groups = groups
    self.candidates = [rounded_candidates(g.width, round_to) for g in groups]
    first_op = {}
    for i, op in enumerate(self.graph.ops):
      first_op.setdefault(op.kernel, i)
    self.names = [_group_name(min(g.producers, key=lambda p: first_op.get(p, 1 << 30)))
                  for g in groups]
    if len(set(self.names)) != len(self.names):
      self.names = [f"{n}#{g.id}" for n, g in zip(self.names, groups)]
    self._group_of_kernel = {p: s for s, g in enumerate(groups) for p in g.producers}
    self._costs = self._cost_table()

  # --- architecture parameters -----------------------------------------------------

  def init_arch(self, key: jax.Array) -> dict[str, Any]:
    """A fresh ``arch`` tree: ``{"width_logits": {name: N(0, 0.01) [n_candidates]}}``."""
    return {"width_logits": {
        n: _ARCH_INIT_STD * jax.random.normal(jax.random.fold_in(key, s), (len(c),))
        for s, (n, c) in enumerate(zip(self.names, self.candidates))}}

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
    comp_to = {}
    for s, g in enumerate(self.groups):
      for c, comp in enumerate(g.channels):
        comp_to[int(comp)] = (s, c)
    comps = self.graph.components

    def factor(ids):
      ids = np.asarray(ids)
      n = ids.size
      const, counts = 0, {}
      for comp in comps[ids]:
        hit = comp_to.get(int(comp))
        if hit is None:
          const += 1
        else:
          counts.setdefault(hit[0], []).append(hit[1])
      terms = []
      for s, channels in counts.items():
        channels = np.asarray(channels)
        terms.append((s, np.asarray([np.sum(channels < c) / n for c in self.candidates[s]],
                                    np.float32)))
      return _Factor(const / n if n else 1.0, terms)

    table = []
    for op in self.graph.ops:
      table.append((float(op.macs), [factor(f) for f in op.factors],
                    float(op.bias_adds), [factor(f) for f in op.bias_factors]))
    return table

  def _cost(self, dists, with_bias: bool) -> jax.Array:
    def frac(f: _Factor):
      out = jnp.asarray(f.const, jnp.float32)
      for s, m in f.terms:
        out = out + dists[s] @ jnp.asarray(m)
      return out
    total = jnp.zeros((), jnp.float32)
    for macs, factors, bias_adds, bias_factors in self._costs:
      term = jnp.asarray(macs, jnp.float32)
      for f in factors:
        term = term * frac(f)
      total = total + term
      if with_bias and bias_adds:
        term = jnp.asarray(bias_adds, jnp.float32)
        for f in bias_factors:
          term = term * frac(f)
        total = total + term
    return total

  def expected_cost(self, arch: Mapping[str, Any]) -> jax.Array:
    """E_cost (tas.md §5): every op's MACs times the product of its factors' expected
    kept fractions under ``softmax(alpha)`` (a product of expectations; bias adds left
    out, as the official expected cost does). Differentiable, jit-safe."""
    return self._cost([jax.nn.softmax(jnp.asarray(a, jnp.float32))
                       for a in self.width_logits(arch)], with_bias=False)

  def argmax_cost(self, arch: Mapping[str, Any]) -> jax.Array:
    """F_cost (tas.md §5): the exact FLOPs of the argmax network (bias adds included),
    as ``graph.predict(keep(arch))``, as a traced float32 scalar."""
    return self._cost([jax.nn.one_hot(jnp.argmax(a), a.shape[-1], dtype=jnp.float32)
                       for a in self.width_logits(arch)], with_bias=True)

  # --- the search-mode forward (tas.md §4) -----------------------------------------

  def apply(self, variables, x, arch: Mapping[str, Any] | None = None, *, train: bool,
            tau=None, key: jax.Array | None = None,
            selections: Sequence[Selection] | None = None, rngs=None):
    """The model's forward with every searched group's producers CWI-mixed.

    Args:
      variables: the model's variables (``params``, ``batch_stats``, ...).
      x: a batch of inputs.
      arch: the ``arch`` tree (with ``tau`` and ``key``, picks are sampled), or None
        with explicit ``selections``.
      train: the model's train mode (batch statistics, updated collections).
      selections: one :class:`Selection` per searched group (overrides sampling).
      rngs: Linen rngs for the model (e.g. ``{"dropout": key}``).

    Returns:
      ``logits`` (eval) or ``(logits, updated non-param collections)`` (train).
    """
    if selections is None:
      selections = self.sample(arch, tau, key)
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
    outs = _Interpreter(paths, self._group_of_kernel, list(selections)).run(
        closed, leaves + [x])
    return jax.tree_util.tree_unflatten(jax.tree.structure(out_shape), outs)

  def _mix_points(self, x) -> dict[str, int]:
    """``{producer kernel path: channel count at its mixing point}`` (abstract run)."""
    variables = self.variables
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    paths = [tracing.leaf_name(p) for p, _ in flat]
    leaves = [jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)) for _, l in flat]
    closed = jax.make_jaxpr(lambda ls, x: self.model.apply(
        jax.tree_util.tree_unflatten(treedef, ls), x, train=False))(leaves, x)
    interp = _Interpreter(paths, None, None)
    jax.eval_shape(lambda ls, x: interp.run(closed, list(ls) + [x]), leaves, x)
    return interp.found


def _group_name(path: str) -> str:
  """A readable key for a group: the layer path of its first producer in call order."""
  parts = path.split("/")
  if parts[0] in ("params",):
    parts = parts[1:]
  return "/".join(parts[:-1]) or path


class _Interpreter:
  """Evaluates a jaxpr, replacing every searched producer's output by its CWI mix.

  ``group_of_kernel`` maps a producer's kernel path to its searched group; ``mixes``
  gives each group's :class:`Selection`. With both None it only records the mixing
  points (``found``: kernel path -> channels there).
  """

  def __init__(self, paths, group_of_kernel, mixes):
    self.paths = paths
    self.group_of_kernel = group_of_kernel
    self.mixes = mixes
    self.found: dict[str, int] = {}

  def run(self, closed, args):
    tags = [("leaf", p) for p in self.paths] + [None]
    return self._eval(closed.jaxpr, closed.consts, args, tags, top=True)

  # Static analysis of one jaxpr level: kernel tags and chain ends.
  def _analyse(self, jaxpr, arg_tags, top: bool = False):
    """``(ends, open, recurse)``: chain ends to mix at this level ``{var: kernel}``,
    chains that leave through an output ``{out index: kernel}`` (the parent continues
    them: a conv wrapped in a custom_vjp is a producer of its caller), and the nested
    eqns to evaluate inside (they hold an end)."""
    tags, defs, uses = {}, {}, {}
    for v, t in zip(jaxpr.invars, arg_tags):
      tags[v] = t
    for i, eqn in enumerate(jaxpr.eqns):
      for v in eqn.invars:
        if not isinstance(v, jex.core.Literal):
          uses.setdefault(v, []).append(i)
      for v in eqn.outvars:
        defs[v] = i
    starts = {}  # var produced by a layer -> kernel path
    recurse = set()
    for i, eqn in enumerate(jaxpr.eqns):
      in_tags = [None if isinstance(v, jex.core.Literal) else tags.get(v) for v in eqn.invars]
      name = eqn.primitive.name
      if name in ("conv_general_dilated", "dot_general"):
        leaf_side = [s for s, t in enumerate(in_tags) if t and t[0] == "leaf"]
        if len(leaf_side) == 1 and _is_kernel(in_tags[leaf_side[0]][1]):
          starts[eqn.outvars[0]] = in_tags[leaf_side[0]][1]
          continue
      if name in _PASS or name in _SHAPE:
        if in_tags and in_tags[0] is not None and in_tags[0][0] == "leaf":
          tags[eqn.outvars[0]] = in_tags[0]
        continue
      nested = _subjaxpr(eqn)
      if nested is not None and any(t and t[0] == "leaf" for t in in_tags):
        inner_ends, inner_open, _ = self._analyse(nested[0], in_tags)
        if inner_ends:
          recurse.add(i)
        for k, kernel in inner_open.items():
          starts[eqn.outvars[k]] = kernel
    ends, open_ends = {}, {}
    out_index = {v: k for k, v in enumerate(jaxpr.outvars)
                 if not isinstance(v, jex.core.Literal)}
    for v, kernel in starts.items():
      while v not in out_index:
        nxt = [j for j in uses.get(v, ()) if _continues(jaxpr.eqns[j], v, defs, jaxpr)]
        if len(nxt) != 1:
          break
        v = jaxpr.eqns[nxt[0]].outvars[0]
      if v in out_index and not top:
        open_ends[out_index[v]] = kernel
      else:
        ends[v] = kernel
    return ends, open_ends, recurse

  def _eval(self, jaxpr, consts, args, arg_tags, top: bool = False):
    ends, _, recurse = self._analyse(jaxpr, arg_tags, top)
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    tag_env = dict(zip(jaxpr.invars, arg_tags))
    read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
    for i, eqn in enumerate(jaxpr.eqns):
      vals = [read(v) for v in eqn.invars]
      in_tags = [None if isinstance(v, jex.core.Literal) else tag_env.get(v)
                 for v in eqn.invars]
      if i in recurse:
        inner, inner_consts = _subjaxpr(eqn)
        outs = self._eval(inner, inner_consts, vals, in_tags)
      else:
        with eqn.ctx.manager:
          outs = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
          outs = [outs]
      name = eqn.primitive.name
      if name in _PASS or name in _SHAPE:
        if in_tags and in_tags[0] is not None:
          tag_env[eqn.outvars[0]] = in_tags[0]
      for v, o in zip(eqn.outvars, outs):
        if v in ends:
          o = self._mix(ends[v], o)
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

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


def _is_kernel(path: str) -> bool:
  return path.startswith("params/")


def _per_channel(u, shape, defs, jaxpr) -> bool:
  """Whether `u` is constant along every axis of `shape` but the last (a scalar, a
  ``[C]`` / ``[1, ..., C]`` vector, or one broadcast to the full shape)."""
  if isinstance(u, jex.core.Literal):
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
    oshape = () if isinstance(operand, jex.core.Literal) else tuple(operand.aval.shape)
    return all(d == 1 or out_axis == len(ushape) - 1 for d, out_axis in zip(oshape, dims))
  if eqn.primitive.name in _PASS:
    return _per_channel(eqn.invars[0], shape, defs, jaxpr)
  return False


def _continues(eqn, v, defs, jaxpr) -> bool:
  """Whether `eqn` continues `v`'s per-channel affine chain (a bias add, a norm)."""
  name = eqn.primitive.name
  if name in _PASS:
    return eqn.invars[0] is v
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
