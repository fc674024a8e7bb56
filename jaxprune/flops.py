"""Analytic FLOPs and parameter counts of any model, from the jaxpr of its forward pass
(the official TAS counter's convention, tas.md §5). No per-architecture tables here.
"""

from collections.abc import Callable, Mapping, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UserError
from jaxprune.graph import group as graph_group
from jaxprune.graph import interpret
from jaxprune.graph.propagate import LoopCountWarning
from jaxprune.graph.tracing import as_function, trace_jaxpr


def count_layers(model, variables, input_shape: Any, call: Callable | None = None,
                 *, batched: bool | None = None, dtype: Any = jnp.float32,
                 nonzero: bool = False) -> list[dict[str, Any]]:
  """Per-op FLOPs of every conv and matrix product, in call order.

  Args:
    model: a Linen module (called as ``model.apply(variables, x)`` plus
      ``train=False`` when its ``__call__`` takes ``train``), an ``nnx.Module``
      (called in eval mode) or a function ``f(params, x)``.
    variables: Linen variables (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
      ``jax.eval_shape(model.init, ...)``), None for NNX, a function's params.
    input_shape: shape of one example without the batch axis, e.g. (32, 32, 3);
      a leading batch of 1 is accepted; a ``jax.ShapeDtypeStruct`` (integer token
      ids) or a pytree of those and shapes for several inputs
      (:func:`jaxprune.graph.tracing.example_inputs`).
    call: NNX ``call(module, x)``, Linen ``call(variables, x)``, for a forward
      that needs more than x (several inputs, or to select the result among the
      outputs: only what the outputs depend on is counted).
    batched: whether `input_shape` starts with the batch axis; None guesses
      (a leading 1 on a shape of two or more axes is a batch).
    dtype: dtype of the dummy input.
    nonzero: count, for each op with one operand computed from the variables
      alone (a kernel, also masked, sliced or top-k'ed), the MACs of that
      operand's nonzero entries on the given (concrete) variables:
      ``nnz(weight) * uses of an entry`` (a product: the other operand's free
      dims; a conv: the output positions). A dense weight gives the dense count;
      a product of two activations and the bias adds stay dense; a ``scan``
      counts every iteration's nonzeros, a ``while`` its first iteration's (times
      its trip count where known, as the dense count).

  Returns:
    One dict per op: ``name`` (the kernel's module path, e.g. ``stage0_block0/conv_a``),
    ``kind`` ("conv", "dense": a product with a parameter, "dot": between
    activations), ``kernel`` (leaf path or None), ``in_shape``, ``out_shape``
    (with the batch axis of 1), ``kernel_shape`` (HWIO for a conv, (in, out) for
    a product), ``macs``, ``bias_adds``, ``flops`` = macs + bias_adds and ``note``:
    "" when the count is exact, else why not (an op inside a ``while_loop`` whose trip
    count is unknown before running is counted for one iteration; a
    :class:`LoopCountWarning` names the loop). Loops with a
    known trip count (``scan``, ``nn.scan``, ``fori_loop`` with constant bounds)
    count every iteration.

  Raises:
    UserError: when the forward pass has no conv or matrix product to count, or
      with ``nonzero=True`` when the variables are abstract.
  """
  if nonzero:
    leaves = _concrete_leaves(model, variables, call)
  traced = trace_jaxpr(model, variables, input_shape, call, batched=batched, dtype=dtype)
  w = graph_group.walk(traced)[0]
  if not w.ops:
    raise UserError(f"{_name(model)} has no convolution or matrix product in its forward "
                    "pass: nothing to count (its FLOPs would read 0)")
  macs = [int(op.macs) for op in w.ops]
  if nonzero:
    macs = _nonzero_macs(traced, leaves, w.ops)
  return [{"name": op.name, "kind": op.kind, "kernel": op.kernel,
           "in_shape": tuple(op.in_shape), "out_shape": tuple(op.out_shape),
           "kernel_shape": tuple(op.kernel_shape), "macs": m,
           "bias_adds": int(op.bias_adds), "flops": m + int(op.bias_adds), "note": op.note}
          for op, m in zip(w.ops, macs)]


def _concrete_leaves(model, variables, call) -> list:
  _, tree, _ = as_function(model, variables, call)
  leaves = jax.tree.leaves(tree)
  if any(isinstance(l, jax.ShapeDtypeStruct) for l in leaves):
    raise UserError("flops.count(..., nonzero=True) reads the weights' values: pass "
                    "concrete variables (arrays, e.g. from model.init), not abstract ones "
                    "(jax.eval_shape).")
  return leaves


def _nonzero_op_macs(eqn, vals, tags, out_shape) -> tuple[int, int] | None:
  """``(nnz(weight) * uses, weight.size * uses)`` of one execution of a conv / dot_general
  with one input-free operand (its weight), None for any other (counted dense)."""
  free = [t is None for t in tags]  # operands that do not depend on the model's input
  if eqn.primitive.name == "dot_general" and free.count(True) == 1:
    w = free.index(True)  # every entry of the weight meets the other's free positions
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    other, skip = (1, set(rc) | set(rb)) if w == 0 else (0, set(lc) | set(lb))
    uses = math.prod(d for a, d in enumerate(np.shape(vals[other])) if a not in skip)
  elif eqn.primitive.name == "conv_general_dilated" and free == [False, True]:
    w, out_feature = 1, eqn.params["dimension_numbers"].out_spec[1]
    uses = math.prod(d for a, d in enumerate(out_shape) if a != out_feature)  # positions
  else:
    return None  # two activations (attention), or two weights
  weight = np.asarray(vals[w])
  return int(np.count_nonzero(weight)) * uses, weight.size * uses


class _Nonzero(interpret.Interpreter):
  """Concrete evaluation that records each conv / dot_general's nonzero MACs in the walk's
  order (the same live eqns, nested calls, every branch of a ``cond``, each iteration of a
  ``scan``, one of a ``while``). A value's tag is True when it depends on the input."""
  prune_dead = True

  def __init__(self):
    self.records: list[tuple[int, int] | None] = []

  def read(self, frame, v):
    return v.val if interpret.is_literal(v) else frame.env.get(v)  # dead: never read

  def equation(self, frame, i, eqn, vals, tags):
    name = eqn.primitive.name
    out_tags = [True if any(tags) else None] * len(eqn.outvars)
    body = interpret.call_body(eqn)
    if body is not None and _has_layers(body.jaxpr):
      live = [frame.live_vars is None or v in frame.live_vars for v in eqn.outvars]
      return self.eval_jaxpr(body.jaxpr, body.consts, vals, tags, live_outs=live)
    outs = interpret.bind(eqn, vals)
    if name in interpret.LAYERS:
      self.records.append(_nonzero_op_macs(eqn, vals, tags, np.shape(outs[0])))
    elif name in interpret.LOOPS and any(_has_layers(b.jaxpr) for b in interpret.bodies(eqn)):
      self._loop(eqn, vals, tags)
    return outs, out_tags

  def _run(self, body, vals, tags):
    return self.eval_jaxpr(body.jaxpr, body.consts, [vals[k] for k in body.operands],
                           [tags[k] for k in body.operands])

  def _loop(self, eqn, vals, tags):
    """Counts a loop's ops as the walk does: a ``scan`` every iteration (each op's records
    summed over them), a ``while`` its body then its condition once on the first carry,
    a ``cond`` every branch."""
    name, p = eqn.primitive.name, eqn.params
    if name == "cond":
      for body in interpret.bodies(eqn):
        self._run(body, vals, tags)
      return
    if name == "while":
      cond, body = interpret.bodies(eqn)
      self._run(body, vals, tags)
      self._run(cond, vals, tags)
      return
    (body,) = interpret.bodies(eqn)
    nc, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = vals[:nc], vals[nc:nc + ncarry], vals[nc + ncarry:]
    tags = list(tags)
    first, per = len(self.records), None
    for t in (reversed(range(length)) if p["reverse"] else range(length)):
      outs, out_tags = self.eval_jaxpr(body.jaxpr, body.consts,
                                       consts + carry + [x[t] for x in xs], tags)
      carry = outs[:ncarry]
      tags[nc:nc + ncarry] = [a or b for a, b in zip(tags[nc:nc + ncarry], out_tags)]
      done = self.records[first:]
      del self.records[first:]
      per = done if per is None else [None if r is None or d is None else
                                      (r[0] + d[0], r[1] + d[1]) for r, d in zip(per, done)]
    self.records.extend(per or [])


def _has_layers(jaxpr) -> bool:
  return any(e.primitive.name in interpret.LAYERS for e, _ in interpret.all_eqns(jaxpr))


def _nonzero_macs(traced, leaves: Sequence[Any], ops: Sequence[Any]) -> list[int]:
  """Per op of the walk (``ops``), the MACs of its weight operand's nonzero entries.

  The traced forward is evaluated on the concrete ``leaves`` and a zero input, tracking
  which values depend on the input; at each conv / ``dot_general`` with one input-free
  operand (the weight: a kernel leaf or anything computed from the variables alone) the
  MACs are ``nnz(weight) * uses of an entry`` (a product: the other operand's free
  dims; a conv: its output positions, batch included). A product of two activations
  keeps its dense count. Loops count as the walk counts them: a ``scan`` every
  iteration, a ``while`` its first iteration times the walk's multiplier (its trip
  count when known, else 1 and the op's note). Bias adds are not changed (one add per
  output entry, as the dense count).
  """
  xs = [jnp.zeros(s, d) for s, d in zip(traced.input_shapes, traced.input_dtypes)]
  counter = _Nonzero()
  counter.interpret(traced.jaxpr, list(leaves) + xs,
                    [None] * len(leaves) + [True] * len(xs))
  records = counter.records
  if len(records) != len(ops):
    raise AssertionError(f"nonzero count: {len(records)} ops evaluated, {len(ops)} walked")
  out = []
  for op, record in zip(ops, records):
    if record is None:
      out.append(int(op.macs))
      continue
    nz, dense = record  # the walk's count is dense times what it multiplies (a while's trips)
    times, rest = divmod(int(op.macs), dense) if dense else (0, int(op.macs))
    if rest:
      raise AssertionError(f"nonzero count: op {op.name} has {op.macs} MACs, {dense} "
                           "evaluated per run")
    out.append(nz * times)
  return out


def _name(model) -> str:
  return getattr(model, "__name__", None) or type(model).__name__


def count_params(variables: Mapping[str, Any] | Any) -> int:
  """Trainable parameter entries.

  ``variables`` is a Linen variables dict (its ``params`` collection is counted,
  BN statistics excluded), an ``nnx.Module`` (its ``nnx.Param`` leaves) or a
  params pytree (every leaf).
  """
  from flax import nnx
  if isinstance(variables, nnx.Module):
    tree = nnx.state(variables, nnx.Param)
  elif isinstance(variables, Mapping) and "params" in variables:
    tree = variables["params"]
  else:
    tree = variables
  return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


def count(model, variables, input_shape: Any, call: Callable | None = None, *,
          batched: bool | None = None, nonzero: bool = False) -> dict[str, int]:
  """FLOPs (multiply-accumulates + bias adds) per example and trainable parameters.

  Convention of the official TAS counter (tas.md §5): CIFAR-10 ResNet-20 gives
  40.81M FLOPs.

  Args:
    model: a Linen module, an ``nnx.Module`` (variables None) or a function
      ``f(params, x)``; any layers, including a user's own written with
      ``lax``/``jnp`` (grouped and depthwise convs included).
    variables: Linen variables (concrete or abstract), None for NNX, a
      function's params.
    input_shape: shape of one example, e.g. (32, 32, 3); a leading batch of 1
      is accepted.
    call: see :func:`count_layers`.
    batched: see :func:`count_layers`.
    nonzero: count the MACs of each weight's nonzero entries (concrete variables;
      see :func:`count_layers`): a pruned or masked network's FLOPs.

  Returns:
    ``{"flops": int, "params": int}``; when the FLOPs are only a lower bound (a
    ``while_loop`` with a trip count unknown before running, counted for one
    iteration) also ``"exact": False`` and ``"note"``, the first such loop's line
    (every one is in :func:`count_layers`' ``note`` and warned about).

  Example:
    >>> model = models.cifar_resnet(20)
    >>> variables = jax.eval_shape(model.init, jax.random.key(0),
    ...                            jnp.zeros((1, 32, 32, 3)))
    >>> flops.count(model, variables, (32, 32, 3))["flops"]
    40813194
    >>> flops.count(nnx_model, None, (28, 28, 1))       # an nnx.Module
  """
  layers = count_layers(model, variables, input_shape, call, batched=batched,
                        nonzero=nonzero)
  out = {"flops": int(sum(layer["flops"] for layer in layers)),
         "params": count_params(model if variables is None else variables)}
  notes = [layer["note"] for layer in layers if layer["note"]]
  if notes:
    out.update(exact=False, note=notes[0])
  return out


__all__ = ["LoopCountWarning", "count", "count_layers", "count_params"]
