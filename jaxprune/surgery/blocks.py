"""Skippable residual blocks of any model, found in its jaxpr, and the network with some
skipped: the depths of TAS's graph space and `prune_to(depth=True)` (docs/design/surgery.md)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UserError
from jaxprune.graph import interpret
from jaxprune.graph import adapters
from jaxprune.graph import tracing

# Elementwise ops a block's output may pass through (with constant other operands),
# also inside a call (jax.nn.relu is a custom_jvp call).
_UNARY = {"max", "min", "tanh", "logistic", "abs", "erf", "exp", "integer_pow", "mul", "div",
          "add", "sub"} | interpret.CASTS


@dataclasses.dataclass
class Block:
  """One identity-shortcut block ``y = post(x + f(x))`` of a jaxpr level."""
  x: object                  # the block's input var
  out: object                # the add's output var
  y: object                  # the block's output var (after the elementwise tail)
  eqns: frozenset            # indices of f's eqns
  params: frozenset          # leaf paths f reads
  prefix: str                # the module path holding the block ("" if none)
  layers: int                # convs / matmuls in f (nested ones included)


@dataclasses.dataclass
class Stage:
  """A chain of blocks; ``merged``: its input is a projection block's output (the
  stage's first block, always kept)."""
  blocks: list
  merged: bool

  @property
  def n(self) -> int:
    return len(self.blocks) + int(self.merged)

  def position(self, b: int) -> int:
    """The stage position (1-based) of its ``b``-th identity block."""
    return b + 1 + int(self.merged)

  def outputs(self) -> list:
    """The vars after 1..n blocks."""
    first = [self.blocks[0].x] if self.merged else []
    return first + [blk.y for blk in self.blocks]

  @property
  def key(self) -> tuple:
    return tuple(blk.params for blk in self.blocks)


_is_lit = interpret.is_literal


def _count_layers(eqn) -> int:
  """The convs and matmuls of `eqn` and of every jaxpr nested in it (once per body,
  as the graph's op table lists them)."""
  if eqn.primitive.name in interpret.LAYERS:
    return 1
  return sum(_count_layers(e) for body in interpret.bodies(eqn) for e in body.jaxpr.eqns)


def _common_prefix(paths) -> str:
  split = [p.split("/")[1:-1] for p in paths]  # drop the collection and the leaf name
  if not split:
    return ""
  out = []
  for parts in zip(*split):
    if len(set(parts)) != 1:
      break
    out.append(parts[0])
  return "/".join(out)


def linen_form(model, variables, call=None):
  """``(module, variables)``: the engine's model form, a Linen module called with
  ``train`` (an NNX model in :class:`jaxprune.graph.adapters.FromNNX`)."""
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise UserError("an nnx.Module carries its own variables: pass variables=None.")
    return adapters.from_nnx(model, call=call)
  if isinstance(model, nn.Module):
    if variables is None:
      raise UserError(f"the Linen module {type(model).__name__} needs its variables.")
    if call is not None:
      return adapters.WithCall(model, call), variables
    if not tracing.accepts_train(model):
      model = adapters.WithTrain(model, adapters.mode_flag(model))
    return model, variables
  raise UserError(f"{type(model).__name__} is neither a Linen module nor an nnx.Module.")


def eval_jaxpr(model, variables, x):
  """``(closed eval-mode jaxpr over (leaves..., inputs...), leaf paths, abstract
  leaves)`` of a :func:`linen_form` model."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  paths = [tracing.leaf_name(p) for p, _ in flat]
  leaves = [jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)) for _, l in flat]
  closed = jax.make_jaxpr(lambda ls, x: model.apply(
      jax.tree_util.tree_unflatten(treedef, ls), x, train=False))(leaves, x)
  return closed, paths, leaves


def find_stages(jaxpr, leaf_paths: Sequence[str | None], data_index: int,
                allow_outputs: bool = False) -> list[Stage]:
  """The stages of one jaxpr level.

  Args:
    jaxpr: the model's forward (an open jaxpr; its invars are the variable leaves
      and the input).
    leaf_paths: per invar, its leaf path (None for the input).
    data_index: the index of the model input among the invars.
    allow_outputs: only the first output (the logits) counts: ``f``'s values may
      feed the other outputs (train mode: the updated batch statistics).
  """
  eqns = jaxpr.eqns
  n_eq = len(eqns)
  uses, defs = interpret.uses_defs(jaxpr)
  outputs = {v for v in jaxpr.outvars if not _is_lit(v)}
  live = set(range(n_eq))
  if allow_outputs:  # the eqns the logits depend on
    outputs = {v for v in jaxpr.outvars[:1] if not _is_lit(v)}
    flags, _ = interpret.liveness(jaxpr, [True] + [False] * (len(jaxpr.outvars) - 1))
    live = {i for i, f in enumerate(flags) if f}
  bit = {}  # var -> its own bit
  anc = {}  # data var -> bits of the data vars it depends on
  srcs = {}  # non-data var -> leaf paths it derives from
  data_var = jaxpr.invars[data_index]
  bit[data_var] = 1 << n_eq
  anc[data_var] = 0
  for v, p in zip(jaxpr.invars, leaf_paths):
    if v is not data_var:
      srcs[v] = frozenset([p]) if p else frozenset()
  for v in jaxpr.constvars:
    srcs[v] = frozenset()
  for i, e in enumerate(eqns):
    ins = [v for v in e.invars if not _is_lit(v)]
    data_ins = [v for v in ins if v in anc]
    if data_ins:
      a = 0
      for v in data_ins:
        a |= anc[v] | bit[v]
      for v in e.outvars:
        anc[v] = a
        bit[v] = 1 << i
    else:
      s = frozenset().union(*[srcs.get(v, frozenset()) for v in ins])
      for v in e.outvars:
        srcs[v] = s

  def is_const(v):
    return _is_lit(v) or v not in anc

  def tail(v):
    """``v`` continued through the elementwise ops only it feeds."""
    while v not in outputs and len([k for k in uses.get(v, ()) if k in live]) == 1:
      e = eqns[[k for k in uses[v] if k in live][0]]
      if ((e.primitive.name not in _UNARY and interpret.call_body(e) is None)
          or len(e.outvars) != 1
          or tuple(e.outvars[0].aval.shape) != tuple(v.aval.shape)
          or any(u is not v and not is_const(u) for u in e.invars)
          or sum(u is v for u in e.invars) != 1 or _count_layers(e)):
        break
      if e.primitive.name in ("mul", "div", "add", "sub") and any(
          u is not v and (np.ndim(u.val) if _is_lit(u) else len(u.aval.shape)) != 0
          for u in e.invars):
        break  # a per-channel affine op is a layer's, not the block's tail
      v = e.outvars[0]
    return v

  blocks, merges = [], set()
  for i, e in enumerate(eqns):
    if e.primitive.name != "add" or len(e.invars) != 2:
      continue
    a, b = e.invars
    if is_const(a) or is_const(b) or a is b:
      continue
    if tuple(a.aval.shape) != tuple(b.aval.shape):
      continue
    a_in_b = bool(anc[b] & bit[a])
    b_in_a = bool(anc[a] & bit[b])
    if a_in_b == b_in_a:
      if not a_in_b:
        merges.add(tail(e.outvars[0]))
      continue
    x, fo = (a, b) if a_in_b else (b, a)
    inside = set()
    for j in range(defs.get(x, -1) + 1, i):
      ej = eqns[j]
      if not any(v in anc for v in ej.outvars):
        continue
      o = ej.outvars[0]
      dep_x = any(u is x for u in ej.invars) or bool(anc[o] & bit[x])
      feeds = o is fo or bool(anc[fo] & bit[o])
      if dep_x and feeds:
        inside.add(j)
    ok = True
    for j in inside:
      for v in eqns[j].outvars:
        if v is fo:
          continue
        if v in outputs or any(k not in inside and k in live for k in uses.get(v, ())):
          ok = False
    layers = sum(_count_layers(eqns[j]) for j in inside)
    if not ok or not layers:
      continue
    params = frozenset().union(*[srcs.get(u, frozenset()) for j in inside
                                 for u in eqns[j].invars
                                 if not _is_lit(u) and u not in anc])
    params = frozenset(p for p in params if p and p.startswith("params/"))
    if not params:
      continue
    blocks.append(Block(x=x, out=e.outvars[0], y=tail(e.outvars[0]),
                        eqns=frozenset(inside), params=params,
                        prefix=_common_prefix(params), layers=layers))
  # Nested blocks (a block inside another's f) are left out.
  nested = {id(b) for b in blocks for c in blocks
            if b is not c and defs.get(b.out) in c.eqns}
  blocks = [b for b in blocks if id(b) not in nested and not any(
      defs.get(c.out) in b.eqns for c in blocks if c is not b)]
  by_x = {}
  for blk in blocks:
    by_x.setdefault(blk.x, []).append(blk)
  ys = {blk.y for blk in blocks}
  stages = []
  for blk in blocks:
    if blk.x in ys:
      continue  # not a chain head
    chain = [blk]
    while len(by_x.get(chain[-1].y, ())) == 1:
      chain.append(by_x[chain[-1].y][0])
    stages.append(Stage(blocks=chain, merged=blk.x in merges))
  return [s for s in stages if s.n > 1]


class _Skipping(interpret.Interpreter):
  """Binds the top level's eqns (calls whole), replacing the outputs ``skip`` maps."""

  def __init__(self, skip: Mapping):
    self.skip = skip

  def descend(self, frame, i, eqn, tags) -> bool:
    return False

  def equation(self, frame, i, eqn, vals, tags):
    outs, out_tags = super().equation(frame, i, eqn, vals, tags)
    return [frame.env[self.skip[v]].astype(o.dtype) if v in self.skip else o
            for v, o in zip(eqn.outvars, outs)], out_tags


def eval_skipping(closed, args, skip: Mapping):
  """Evaluates a closed jaxpr with the vars ``skip`` maps replaced: ``y := x`` (in
  ``y``'s dtype, e.g. a block of a bfloat16 model whose input is float32)."""
  return _Skipping(skip).interpret(closed, args)


class SkipBlocks(nn.Module):
  """A Linen model with some of its submodules skipped (they return their input).

  Attributes:
    jaxprune_skip_inner: the model (a Linen module, called with this module's arguments);
      its variables are this module's, without the skipped submodules'.
    skipped: the ``/``-joined module paths of the skipped blocks.
  """
  jaxprune_skip_inner: nn.Module  # named so as not to clash with the user's submodules
  skipped: tuple[str, ...] = ()

  def setup(self):
    nn.share_scope(self, self.jaxprune_skip_inner)

  def __call__(self, *args, **kwargs):
    skipped = set(self.skipped)

    def skip(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and "/".join(context.module.path) in skipped:
        return args[0]
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(skip):
      return self.jaxprune_skip_inner(*args, **kwargs)


class _Identity(nnx.Module):
  """A skipped NNX block: returns its input."""

  def __call__(self, x, *args, **kwargs):
    return x


def _drop(tree, prefixes):
  """`tree` (``{collection: nested dict}``) without the subtrees at `prefixes`."""
  out = {}
  for collection, sub in tree.items():
    sub = jax.tree.map(lambda a: a, dict(sub), is_leaf=lambda a: not isinstance(a, Mapping))
    for prefix in prefixes:
      *parents, last = prefix.split("/")
      node = sub
      for k in parents:
        node = node.get(k, {}) if isinstance(node, Mapping) else {}
      if isinstance(node, dict):
        node.pop(last, None)
    out[collection] = sub
  return out


def _nnx_parent(module, prefix):
  *parents, last = prefix.split("/")
  node = module
  for k in parents:
    node = node[int(k)] if k.isdigit() and isinstance(node, (list, tuple, nnx.List)) \
        else getattr(node, k)
  return node, last


def skip_blocks(model, variables, prefixes: Sequence[str]):
  """``(model, variables)`` of the network with the blocks at module paths `prefixes`
  skipped (each returns its input).

  `model` is a Linen module (wrapped in :class:`SkipBlocks`, called as before), a
  user's NNX model in its :class:`jaxprune.graph.adapters.FromNNX` wrapper (the NNX
  attributes are replaced by an identity module, and the result wrapped again) or an
  ``nnx.Module`` (``variables`` None; a copy with the attributes replaced).
  """
  prefixes = tuple(prefixes)
  if not prefixes:
    return model, variables
  if isinstance(model, nnx.Module):
    module = nnx.clone(model)
    _replace_nnx(module, prefixes)
    return module, None
  small = _drop(dict(variables), prefixes)
  if isinstance(model, adapters.FromNNX):
    module = model.module(variables)
    _replace_nnx(module, prefixes)
    draw = model.split.draw
    fresh = None if draw is None else (lambda key: _drop(draw(key), prefixes))
    wrapper, wvars = adapters.from_nnx(module, fresh, model.call)
    return wrapper, wvars
  if not isinstance(model, nn.Module):
    raise UserError(f"skip_blocks: {type(model).__name__} is not a Linen or NNX module.")
  return SkipBlocks(model, prefixes), small


def _replace_nnx(module, prefixes):
  for prefix in prefixes:
    parent, last = _nnx_parent(module, prefix)
    if last.isdigit() and isinstance(parent, (list, nnx.List)):
      parent[int(last)] = _Identity()
    else:
      setattr(parent, last, _Identity())


def _block_modules(st, paths) -> list[list[str]]:
  """Candidate module paths of a stage's blocks, innermost first: their parameters'
  common prefix, then each module above it that holds no other parameter, while the
  blocks' modules stay distinct and not nested."""
  params = [p for p in paths if p.startswith("params/")]
  out = []
  for lift in range(8):
    level = []
    for b in st.blocks:
      parts = b.prefix.split("/") if b.prefix else []
      if len(parts) <= lift:
        return out
      level.append("/".join(parts[:len(parts) - lift]))
    if len(set(level)) != len(level) or any(
        q.startswith(p + "/") for p in level for q in level if p != q):
      return out
    if any(p.startswith(f"params/{m}/") and p not in b.params
           for b, m in zip(st.blocks, level) for p in params):
      return out
    out.append(level)
  return out


def _skips_exactly(model, variables, closed, paths, blocks, example) -> bool:
  """Whether skipping `blocks`' modules computes what the jaxpr does with ``y := x``
  (random weights, one example from ``example(rng)``)."""
  rng = np.random.default_rng(0)
  concrete = []
  for p, a in zip(paths, jax.tree.leaves(variables)):
    shape, dtype = np.shape(a), jnp.result_type(a)
    if p.endswith(("var", "scale")):
      concrete.append(jnp.asarray(rng.uniform(0.5, 1.5, shape), dtype))
    else:
      concrete.append(jnp.asarray(rng.normal(0, 0.3, shape), dtype))
  variables = jax.tree_util.tree_unflatten(jax.tree.structure(variables), concrete)
  x = example(rng)
  want = eval_skipping(closed, concrete + jax.tree.leaves(x), {b.y: b.x for b in blocks})
  try:
    small_model, small = skip_blocks(model, variables, [b.prefix for b in blocks])
    got = jax.tree.leaves(small_model.apply(small, x, train=False))
    return len(got) == len(want) and all(
        np.shape(g) == np.shape(w) and np.allclose(g, w, rtol=1e-4, atol=1e-4)
        for g, w in zip(got, want))
  except Exception:  # pylint: disable=broad-except
    return False


def skippable_stages(model, variables, closed, paths: Sequence[str], num_inputs: int,
                     example, op_kernels: Sequence[str]):
  """The stages of `model` whose blocks a smaller network can skip.

  Args:
    model: a Linen module taking ``train`` (an NNX model in its ``FromNNX`` wrapper).
    variables: its variables (abstract or concrete).
    closed: the model's eval-mode closed jaxpr over ``(leaves..., inputs...)``.
    paths: the leaf path of each variable leaf (``params/...``).
    num_inputs: the number of input leaves after them.
    example: ``example(rng)``: one input (its leaves in ``closed``'s order).
    op_kernels: the kernel path of every conv and matmul of the model's graph.

  Returns:
    ``(stages, excluded)``: ``[(name, Stage)]`` whose blocks' ``prefix`` is the module
    the network skips (every block but a stage's first, which a stage keeps unless it
    is ``merged``, computes what the jaxpr does with ``y := x``), and ``{name: reason}``
    of the stages left out.
  """
  found = find_stages(closed.jaxpr, list(paths) + [None] * num_inputs, len(paths))
  kept, excluded = [], {}
  for st in found:
    prefixes = [b.prefix for b in st.blocks]
    name = prefixes[0] if len(prefixes) == 1 else f"{prefixes[0]}..{prefixes[-1]}"
    if not all(prefixes):
      name = f"stage{len(kept) + len(excluded)}"
    reason = None
    # The block's module: the common prefix of its parameters, or a module above it
    # (a block whose parameters all sit in a submodule of its branch, e.g.
    # ``layers_1/layer``: the block ``layers_1`` adds its input back).
    levels = _block_modules(st, paths)
    if not levels:
      reason = "its blocks are not modules of their own (the smaller network skips modules)"
    elif any(sum(k in b.params for k in op_kernels) != b.layers for b in st.blocks):
      reason = "a block has matmuls without parameters (their cost is not mapped)"
    if reason:
      excluded[name] = reason
      continue
    for level in levels:
      lifted = dataclasses.replace(st, blocks=[
          dataclasses.replace(b, prefix=p) for b, p in zip(st.blocks, level)])
      if _skips_exactly(model, variables, closed, paths,
                        lifted.blocks[0 if lifted.merged else 1:], example):
        name = level[0] if len(level) == 1 else f"{level[0]}..{level[-1]}"
        kept.append((name, lifted))
        break
    else:
      excluded[name] = ("skipping its block modules does not give the block's input (a "
                        "block module is not x -> y)")
  return kept, excluded


__all__ = ["Block", "SkipBlocks", "Stage", "eval_jaxpr", "eval_skipping", "find_stages",
           "linen_form", "skip_blocks", "skippable_stages"]
