"""The one interpreter of jaxprs: nested jaxprs, liveness, evaluation with hooks.

Every reader of a model's jaxpr goes through it; a new primitive is taught here once.
"""
import dataclasses
from typing import Any

import jax.extend as jex

# The two ops that are a layer when one operand is a parameter leaf (its kernel).
LAYERS = frozenset(("conv_general_dilated", "dot_general"))
# Ops that move or cast values without computing: a tag (a leaf, a layer's output)
# passes through them.
SHAPE_ONLY = frozenset("reshape broadcast_in_dim convert_element_type squeeze expand_dims "
                       "transpose copy copy_p".split())
# Of those, the ones that keep the shape too (casts and copies).
CASTS = frozenset("convert_element_type copy copy_p".split())

# Nested jaxprs. A *call* (jit, closed_call, custom_jvp_call, custom_vjp_call,
# remat/checkpoint, shard_map, ...) keeps its body under one of these params and runs it
# once on its operands, invars and outvars 1:1. The loops and the branch map operands
# differently and are entered by :func:`bodies`.
CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
LOOPS = frozenset(("scan", "while", "cond"))


@dataclasses.dataclass(frozen=True)
class Body:
  """One nested jaxpr of an equation and how the equation's operands enter it.

  Attributes:
    jaxpr: the open jaxpr.
    consts: its constants.
    operands: per invar of `jaxpr`, the index of the eqn's operand it receives
      (a scan's ``xs`` enter sliced along their leading axis).
    kind: "call", "scan", "while_cond", "while_body" or "branch".
  """
  jaxpr: Any
  consts: tuple
  operands: tuple
  kind: str


def _open(j):
  if isinstance(j, jex.core.ClosedJaxpr):
    return j.jaxpr, tuple(j.consts)
  if isinstance(j, jex.core.Jaxpr):
    return j, ()
  return None


def call_body(eqn) -> Body | None:
  """The body of a call-like eqn (its invars and outvars 1:1 with the eqn's), or None
  (also for loops and ``cond``: see :func:`bodies`)."""
  if eqn.primitive.name in LOOPS:
    return None
  for key in CALL_PARAMS:
    opened = _open(eqn.params.get(key))
    if opened is None:
      continue
    inner, consts = opened
    if len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(eqn.outvars):
      return Body(inner, consts, tuple(range(len(eqn.invars))), "call")
  return None


def bodies(eqn) -> list[Body]:
  """Every nested jaxpr of `eqn` with its operand map ([] for a plain primitive)."""
  name, p, n = eqn.primitive.name, eqn.params, len(eqn.invars)
  if name == "scan":
    inner, consts = _open(p["jaxpr"])
    return [Body(inner, consts, tuple(range(n)), "scan")]
  if name == "while":
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond, body = _open(p["cond_jaxpr"]), _open(p["body_jaxpr"])
    return [Body(*cond, tuple(range(cn)) + tuple(range(cn + bn, n)), "while_cond"),
            Body(*body, tuple(range(cn, n)), "while_body")]
  if name == "cond":
    return [Body(*_open(b), tuple(range(1, n)), "branch") for b in p["branches"]]
  body = call_body(eqn)
  if body is not None:
    return [body]
  out = []  # a primitive unknown here that holds jaxprs: entered by nobody, still listed
  for value in p.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      opened = _open(v)
      if opened is not None:
        out.append(Body(*opened, (), "other"))
  return out


def scan_length(eqn) -> int:
  """How many times a body of `eqn` runs per run of `eqn` when known (1 otherwise)."""
  return eqn.params["length"] if eqn.primitive.name == "scan" else 1


def is_literal(v) -> bool:
  return isinstance(v, jex.core.Literal)


def uses_defs(jaxpr, eqns=None) -> tuple[dict, dict]:
  """``({var: [eqn index reading it]}, {var: eqn index defining it})`` of one level
  (`eqns`: the indices to consider, default all)."""
  uses, defs = {}, {}
  for i in range(len(jaxpr.eqns)) if eqns is None else eqns:
    eqn = jaxpr.eqns[i]
    for v in eqn.invars:
      if not is_literal(v):
        uses.setdefault(v, []).append(i)
    for v in eqn.outvars:
      defs[v] = i
  return uses, defs


def liveness(jaxpr, live_outs=None) -> tuple[list[bool], set]:
  """Which eqns of `jaxpr` the outputs marked in `live_outs` (default all) depend on
  (effectful eqns always count), and the set of variables they read or return. A call
  only reads the operands its live outputs need; loops and ``cond`` read all of theirs."""
  if live_outs is None:
    live_outs = [True] * len(jaxpr.outvars)
  live = {v for v, keep in zip(jaxpr.outvars, live_outs) if keep and not is_literal(v)}
  flags = [False] * len(jaxpr.eqns)
  for i in range(len(jaxpr.eqns) - 1, -1, -1):
    eqn = jaxpr.eqns[i]
    used = [v in live for v in eqn.outvars]
    if not (eqn.effects or any(used)):
      continue
    flags[i] = True
    reads = eqn.invars
    body = None if eqn.effects else call_body(eqn)
    if body is not None:
      _, inner_live = liveness(body.jaxpr, used)
      reads = [v for v, iv in zip(eqn.invars, body.jaxpr.invars) if iv in inner_live]
    live.update(v for v in reads if not is_literal(v))
  return flags, live


def bind(eqn, vals) -> list:
  """The eqn's outputs on concrete (or traced) operands `vals`."""
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
  return list(outs) if eqn.primitive.multiple_results else [outs]


@dataclasses.dataclass
class Frame:
  """One jaxpr level being interpreted.

  Attributes:
    jaxpr: the open jaxpr.
    env: ``{var: value}`` so far.
    tags: ``{var: tag}`` so far (a client's label of a value; absent: None).
    top: whether this is the outermost level.
    live: per eqn, whether it is interpreted (None: all).
    live_vars: the variables the live eqns read or return (with ``prune_dead``).
    data: the client's own per-level state (set in :meth:`Interpreter.enter`).
  """
  jaxpr: Any
  env: dict
  tags: dict
  top: bool = False
  live: list | None = None
  live_vars: set | None = None
  data: Any = None


class Interpreter:
  """Interprets a jaxpr equation by equation; clients override the hooks.

  By default a call is entered (its body interpreted with the caller's operands and
  tags), every other eqn bound on its operands' values: a concrete evaluation equal
  to ``jax.core.eval_jaxpr``. A client observes or replaces an eqn's operands or
  outputs in :meth:`equation`, keeps per-level state in :meth:`enter`, and may hold
  abstract values (propagate's channel labels) by overriding :meth:`read` and
  :meth:`equation`. With ``prune_dead`` only the eqns an output marked live depends
  on are interpreted (:func:`liveness`).
  """
  prune_dead = False

  def interpret(self, closed, args, tags=None) -> list:
    """The outputs of a closed jaxpr on `args` (`tags`: one per arg, or None)."""
    outs, _ = self.eval_jaxpr(closed.jaxpr, closed.consts, args, tags, top=True)
    return outs

  def eval_jaxpr(self, jaxpr, consts, args, tags=None, *, live_outs=None, top=False):
    """``(outputs, their tags)`` of one level."""
    frame = Frame(jaxpr, dict(zip(jaxpr.constvars, consts)), {}, top)
    frame.env.update(zip(jaxpr.invars, args))
    if tags is not None:
      frame.tags.update((v, t) for v, t in zip(jaxpr.invars, tags) if t is not None)
    if self.prune_dead:
      frame.live, frame.live_vars = liveness(jaxpr, live_outs)
    self.enter(frame)
    for i, eqn in enumerate(jaxpr.eqns):
      if frame.live is not None and not frame.live[i]:
        continue
      vals = [self.read(frame, v) for v in eqn.invars]
      in_tags = [None if is_literal(v) else frame.tags.get(v) for v in eqn.invars]
      outs, out_tags = self.equation(frame, i, eqn, vals, in_tags)
      for v, o, t in zip(eqn.outvars, outs, out_tags):
        frame.env[v] = o
        if t is not None:
          frame.tags[v] = t
    results = [self.read(frame, v) for v in jaxpr.outvars]
    result_tags = [None if is_literal(v) else frame.tags.get(v) for v in jaxpr.outvars]
    self.leave(frame)
    return results, result_tags

  # --- hooks -------------------------------------------------------------------------
  def enter(self, frame: Frame):
    """Called before a level's first eqn (its env holds its consts and args)."""

  def leave(self, frame: Frame):
    """Called after a level's outputs are read."""

  def read(self, frame: Frame, v):
    return v.val if is_literal(v) else frame.env[v]

  def descend(self, frame: Frame, i: int, eqn, tags) -> bool:
    """Whether to interpret the body of the call `eqn` (else it is bound whole)."""
    return True

  def equation(self, frame: Frame, i: int, eqn, vals, tags):
    """``(outputs, output tags)`` of eqn `i` of the level on operand values `vals`."""
    body = call_body(eqn)
    if body is not None and self.descend(frame, i, eqn, tags):
      return self.eval_jaxpr(body.jaxpr, body.consts, vals, tags)
    return bind(eqn, vals), [None] * len(eqn.outvars)


def all_eqns(jaxpr, times: int = 1):
  """``(eqn, times)`` for every eqn of `jaxpr` and of every jaxpr nested in it, depth
  first; ``times``: how often it runs per run of `jaxpr` where a scan says (a while
  loop's body and both branches of a cond count once)."""
  for eqn in jaxpr.eqns:
    yield eqn, times
    for body in bodies(eqn):
      yield from all_eqns(body.jaxpr, times * scan_length(eqn))


__all__ = ["Body", "CALL_PARAMS", "all_eqns", "CASTS", "Frame", "Interpreter", "LAYERS", "LOOPS",
           "SHAPE_ONLY", "bind", "bodies", "call_body", "is_literal", "liveness",
           "scan_length", "uses_defs"]
