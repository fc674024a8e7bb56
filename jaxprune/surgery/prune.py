"""Remove groups of channels from any model: ``prune(keep)`` and the target-driven ``prune_to``.

``prune`` is the one mechanism: trace the graph (:mod:`jaxprune.graph`), turn the
kept channels of each group into per-leaf slices (:func:`jaxprune.graph.kept_slices`)
and rebuild the network at those widths (:func:`jaxprune.surgery.rebuild`).
``prune_to`` puts a criterion (:mod:`jaxprune.surgery.importance`) and a target
(:mod:`jaxprune.surgery.pruner`) in front of it.
"""
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jaxprune import graph as graph_lib
from jaxprune.surgery import importance, pruner
from jaxprune.surgery.rebuild import Pruned, rebuild, slice_tree


def apply_slices(model, variables, slices, input_shape, call: Callable | None = None) -> Pruned:
  """:func:`rebuild` for modules; a pure function's params are sliced as they are."""
  if graph_lib.tracing.model_kind(model, variables) == "function":
    small = slice_tree(variables, slices, path_fn=graph_lib.tracing.leaf_name)
    shapes = {}
    return Pruned(model=model, variables=small, shapes=shapes)
  return rebuild(model, variables, slices, input_shape, call)


def prune(model, variables, input_shape: Sequence[int], keep: Mapping[Any, Sequence[int]],
          call: Callable | None = None, *, graph: graph_lib.Graph | None = None) -> Pruned:
  """The smaller network that keeps ``keep[group]`` channels of each group.

  Args:
    model: a Linen module, an ``nnx.Module`` (variables None) or a function
      ``f(params, x)``.
    variables: Linen variables (all collections), None for NNX, a function's params.
    input_shape: one example's shape, e.g. (32, 32, 3).
    keep: ``{group id or Group: kept channel indices}`` of
      ``graph.trace(model, variables, input_shape, call)``; other groups keep all.
    call: NNX ``call(module, x)`` / Linen ``call(variables, x)``.
    graph: the traced graph, when the caller has it already.

  Returns:
    A :class:`jaxprune.surgery.Pruned`: ``.model`` runs and trains at the smaller
    widths (a new ``nnx.Module`` for NNX), ``.variables`` are its variables (None
    for NNX).

  Example:
    >>> g = graph.trace(model, variables, (32, 32, 3))
    >>> small = surgery.prune(model, variables, (32, 32, 3), {g.groups[1].id: [0, 2, 5]})
  """
  g = graph or graph_lib.trace(model, variables, input_shape, call)
  return apply_slices(model, variables, graph_lib.kept_slices(g, keep), input_shape, call)


def prune_to(model, variables, input_shape: Sequence[int], *, criterion: str = "l1",
             flops_ratio: float | None = None, params_ratio: float | None = None,
             global_ranking: bool = False, round_to: int = 1, ignore: Sequence[str] = (),
             grads: Any = None, key: jax.Array | None = None,
             call: Callable | None = None) -> tuple[Pruned, dict]:
  """Prunes `model` to a FLOPs or params ratio by a criterion, in one call.

  Args:
    model, variables, input_shape, call: as for :func:`prune`.
    criterion: "l1", "l2", "bn_scale", "taylor" (needs `grads`) or "random"
      (needs `key`); see :mod:`jaxprune.surgery.importance`.
    flops_ratio / params_ratio: the target fraction of the unpruned network's
      FLOPs or params (exactly one).
    global_ranking: rank channels across groups instead of the same fraction
      per group.
    round_to: kept widths a multiple of this.
    ignore: leaf-path patterns of groups to leave whole (see
      :func:`jaxprune.graph.trace`).
    grads: the gradients of a loss, for "taylor".
    key: for "random".

  Returns:
    ``(pruned, info)``: the :class:`Pruned` network and ``{"keep": {group id:
    kept indices}, "before": {"flops", "params"}, "after": {"flops", "params"},
    "graph": the traced graph}``.

  Example:
    >>> small, info = surgery.prune_to(model, variables, (32, 32, 3), flops_ratio=0.5)
    >>> info["after"]["flops"] / info["before"]["flops"]   # <= 0.5
  """
  g = graph_lib.trace(model, variables, input_shape, call, ignore=ignore, round_to=round_to)
  values = graph_lib.named_leaves(model, variables)
  scores = importance.group_scores(g, values, criterion, grads=grads, key=key)
  keep = pruner.select_channels(g, scores, flops_ratio=flops_ratio,
                                params_ratio=params_ratio, global_ranking=global_ranking)
  small = prune(model, variables, input_shape, keep, call, graph=g)
  return small, {"keep": keep, "before": g.predict({}), "after": g.predict(keep), "graph": g}
