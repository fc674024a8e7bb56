"""Removing groups of channels from any model: ``prune(keep)`` and the target-driven
``prune_to`` (graph groups -> per-leaf slices -> rebuilt network)."""
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxprune import flops
from jaxprune import graph as graph_lib
from jaxprune import latency
from jaxprune.errors import UserError
from jaxprune.surgery import blocks as blocks_lib
from jaxprune.surgery import importance, targets
from jaxprune.surgery.rebuild import (Pruned, compensate, forward, masked_original,
                                      probe_inputs, rebuild, refuse_shapes_only, slice_tree)


def apply_slices(model, variables, slices, input_shape, call: Callable | None = None,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Pruned:
  """:func:`rebuild` for modules; a pure function's params are sliced as they are."""
  if graph_lib.tracing.model_kind(model, variables) == "function":
    small = slice_tree(variables, slices, path_fn=graph_lib.tracing.leaf_name)
    return Pruned(model=model, variables=small, shapes={})
  return rebuild(model, variables, slices, input_shape, call, overrides=overrides)


def prune(model, variables, input_shape: Sequence[int], keep: Mapping[Any, Sequence[int]],
          call: Callable | None = None, *, graph: graph_lib.Graph | None = None,
          overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Pruned:
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
    overrides: ``{module path: {attribute: value}}`` for :func:`rebuild`: the int
      attributes of user modules that the rebuild cannot derive (e.g. an attention's
      ``heads`` / ``kv_heads`` after a head group is narrowed). Never guessed: when
      the pruned network fails in such a module, the one-line error names it, its int
      attributes, and (a hint) one equal to a narrowed head group's old width.

  Returns:
    A :class:`jaxprune.surgery.Pruned`: ``.model`` runs and trains at the smaller
    widths (a new ``nnx.Module`` for NNX), ``.variables`` are its variables (None
    for NNX), ``.approximate`` the ``{group id: effects}`` of the narrowed groups
    whose removal is approximate (empty: the result is the masked original's
    function).

  Example:
    >>> g = graph.trace(model, variables, (32, 32, 3))
    >>> small = surgery.prune(model, variables, (32, 32, 3), {g.groups[1].id: [0, 2, 5]})
  """
  refuse_shapes_only("prune", model, variables)
  g = graph or graph_lib.trace(model, variables, input_shape, call)
  keep = check_keep(g, keep)
  try:
    small = apply_slices(model, variables, graph_lib.kept_slices(g, keep), input_shape, call,
                         overrides)
  except UserError as e:
    raise _with_head_hint(e, g, keep, variables) from e
  small = compensate(g, keep, small, input_shape, call)
  small.approximate = approximate_groups(g, keep)
  check_masked(model, variables, input_shape, keep, call, g, small, overrides)
  return small


CHECK_EXAMPLES = 4  # random inputs the rebuilt network is checked on
CHECK_RTOL = 1e-4  # of the output's scale (float32; 4 ulps of a narrower output dtype)


def _narrowed(g: graph_lib.Graph, keep) -> dict[int, np.ndarray]:
  return {gid: kept for gid, kept in keep.items()
          if np.unique(kept).size < g.groups[gid].width}


# A program run once on a few examples: compiled fast, not for speed (what
# ``jax_disable_most_optimizations`` sets).
QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled_forward(model, variables, call, x):
  """:func:`jaxprune.surgery.rebuild.forward` as one program compiled without XLA's
  optimizations (a fresh network's first eager run compiles every op on its own: 2-7x
  slower for one call)."""
  if variables is None and isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, xs: forward(nnx.merge(graphdef, st), None, call, xs),
                   compiler_options=QUICK_COMPILE)(state, x)
  return jax.jit(lambda v, xs: forward(model, v, call, xs),
                 compiler_options=QUICK_COMPILE)(variables, x)


def check_masked(model, variables, input_shape, keep: Mapping[int, np.ndarray],
                 call: Callable | None, g: graph_lib.Graph, small: Pruned,
                 overrides=None) -> None:
  """Raises a :class:`UserError` unless `small` computes what the original computes
  with the removed channels zeroed, on :data:`CHECK_EXAMPLES` random inputs
  (:func:`jaxprune.surgery.rebuild.probe_inputs`), for the narrowed groups whose removal
  is exact or compensated (an approximate group changes the function by design: when
  one is narrowed, the check runs on a second rebuild with only the others narrowed).

  The graph says which parameter slices a channel owns; the rebuilt network is the
  user's code run at the new widths. Code that decides something from a width that no
  parameter slice shows (a head count in an int attribute with the head size inferred,
  a channel shuffle's reshape, a scale taken from ``x.shape[-1]``) computes another
  function there; this check is what turns that into one line instead of a silently
  different network. The line names the first narrowed group that shows it alone."""
  exact = {gid: kept for gid, kept in _narrowed(g, keep).items()
           if g.groups[gid].exactness != "approximate"}
  if not exact:
    return
  x = probe_inputs(input_shape, CHECK_EXAMPLES)

  def difference(sel, built=None):
    if built is None:
      built = compensate(g, sel, apply_slices(model, variables, graph_lib.kept_slices(
          g, sel), input_shape, call, overrides), input_shape, call)
    ref = jax.tree.leaves(_compiled_forward(*masked_original(
        model, variables, graph_lib.kept_slices(g, sel)), call, x))
    got = jax.tree.leaves(_compiled_forward(built.model, built.variables, call, x))
    worst, scale, rtol = 0.0, 0.0, CHECK_RTOL
    for a, b in zip(ref, got):
      if not jax.numpy.issubdtype(jax.numpy.result_type(a), jax.numpy.inexact):
        continue
      a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
      if a64.shape != b64.shape:
        return float("inf"), 1.0, rtol
      worst = max(worst, float(np.max(np.abs(a64 - b64), initial=0.0)))
      scale = max(scale, float(np.max(np.abs(a64), initial=0.0)))
      rtol = max(rtol, 4 * float(jax.numpy.finfo(jax.numpy.result_type(a)).eps))
    return worst, max(scale, 1e-3), rtol

  def differs(sel, built=None):
    diff, scale, rtol = difference(sel, built)
    return diff > rtol * scale, diff, scale

  whole = len(exact) == len(_narrowed(g, keep))
  bad, diff, scale = differs(exact, small if whole else None)
  if not bad:
    return
  if len(exact) == 1:
    culprit = next(iter(exact))
  else:  # the first group that shows it alone (None: only together)
    culprit = next((gid for gid in sorted(exact) if differs({gid: exact[gid]})[0]), None)
  where = ""
  if culprit is not None:
    group = g.groups[culprit]
    where = (f"; narrowing group {culprit} ({group.kind}, {group.width} -> "
             f"{np.unique(exact[culprit]).size}, first member {group.members[0].path}) "
             "alone shows it" + (f"; an int attribute of its module equal to {group.width} is "
                                 "likely the head count" if group.kind == "heads" else ""))
  raise UserError(
      f"prune: the rebuilt network is not the original with the removed channels zeroed "
      f"(max difference {diff:.3g} at output scale {scale:.3g} on {CHECK_EXAMPLES} random "
      f"inputs{where}): the model's code computes something else at the smaller width "
      "(e.g. a head count held in an int attribute, a channel shuffle, a scale taken from "
      "a width); pass overrides={module path: {attribute: value}} for such an attribute, "
      "or keep the group whole with ignore=[a leaf-path pattern of its members].")


def _with_head_hint(e: UserError, g: graph_lib.Graph, keep, variables) -> UserError:
  """`e` with a hint when the failing module has an int attribute equal to the old
  width of a narrowed head group inside it (likely the count to override)."""
  mpath, attrs = getattr(e, "module_path", None), getattr(e, "int_attrs", {})
  if mpath is None or not attrs:
    return e
  hints = []
  for gid, kept in keep.items():
    group = g.groups[gid]
    n = np.unique(kept).size
    if group.kind != "heads" or n == group.width:
      continue
    inside = any((m.path.split("/", 1)[1] if variables is not None else m.path)
                 .startswith(f"{mpath}/" if mpath else "") for m in group.members)
    for name, value in attrs.items():
      if inside and value == group.width:
        hints.append(f"{name}={value} equals the {group.width} heads of group {gid}, "
                     f"now {n}")
  if not hints:
    return e
  return UserError(f"{e} Likely to override (a hint, not applied): {'; '.join(hints)}.")


def approximate_groups(g: graph_lib.Graph, keep: Mapping[Any, Any]) -> dict[int, tuple]:
  """``{group id: effects}`` of the narrowed groups whose removal is approximate: the
  pruned network computes a different function than the masked original there (a
  mean over the channels, a width-derived scale; see :attr:`jaxprune.graph.Group.effects`)."""
  out = {}
  for key, kept in keep.items():
    group = g.groups[key.id if isinstance(key, graph_lib.Group) else int(key)]
    if np.unique(np.asarray(kept)).size < group.width and group.exactness == "approximate":
      out[group.id] = group.effects
  return out


def check_keep(g: graph_lib.Graph, keep: Mapping[Any, Any]) -> dict[int, np.ndarray]:
  """``keep`` as ``{group id: int64 indices}``: a boolean mask (the group's width long)
  becomes the indices it selects; a non-integer key or index is a :class:`UserError`
  (never truncated: 0.7 is not group 0, and True is not channel 1)."""
  if not isinstance(keep, Mapping):
    raise UserError(f"keep must map group ids to kept channels, got {type(keep).__name__}")
  out = {}
  for key, kept in keep.items():
    if isinstance(key, graph_lib.Group):
      gid = key.id
    elif isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
      gid = int(key)
    else:
      raise UserError(f"keep has the key {key!r}: a group id is an int (or a Group)")
    if not 0 <= gid < len(g.groups):
      raise UserError(f"no group {gid}: the graph has {len(g.groups)} groups")
    width = g.groups[gid].width
    arr = np.asarray(kept)
    if arr.dtype == np.bool_:  # a mask over the group's channels
      if arr.shape != (width,):
        raise UserError(f"keep[{gid}] is a boolean mask of shape {arr.shape}; group {gid} "
                        f"has {width} channels, so the mask needs shape ({width},)")
      arr = np.flatnonzero(arr)
    elif arr.size and not np.issubdtype(arr.dtype, np.integer):
      raise UserError(f"keep[{gid}] holds {arr.dtype} values ({arr.ravel()[:4].tolist()}"
                      f"{'...' if arr.size > 4 else ''}): give int channel indices or a "
                      "boolean mask")
    if arr.ndim > 1:
      raise UserError(f"keep[{gid}] has shape {arr.shape}: give a 1-D list of channels")
    if gid in out:
      raise UserError(f"keep names group {gid} twice")
    out[gid] = arr.astype(np.int64).reshape(-1)
  return out


def prune_to(model, variables, input_shape: Sequence[int], *, criterion: str = "l1",
             flops_ratio: float | None = None, params_ratio: float | None = None,
             latency_ratio: float | None = None, latency_table=None, batch_size: int = 1,
             latency_grid: int = targets.DEFAULT_GRID,
             global_ranking: bool = False, round_to: int | None = None,
             ignore: Sequence[str] = (),
             grads: Any = None, key: jax.Array | None = None,
             call: Callable | None = None, exact_only: bool = False,
             overrides: Mapping[str, Mapping[str, Any]] | None = None,
             calibrate: bool = True, calibration_rounds: int = targets.CALIBRATION_ROUNDS,
             latency_timer: Callable | None = None, depth: bool = False
             ) -> tuple[Pruned, dict]:
  """Prunes `model` to a FLOPs, params or latency ratio by a criterion, in one call.

  Args:
    model, variables, input_shape, call: as for :func:`prune`.
    criterion: "l1", "l2", "bn_scale", "taylor" (needs `grads`) or "random"
      (needs `key`); see :mod:`jaxprune.surgery.importance`.
    flops_ratio / params_ratio: the target fraction of the unpruned network's
      FLOPs or params.
    latency_ratio: the target fraction of the unpruned network's latency on this
      device (ask 0.5 for a 2x speed-up), by a per-op latency table
      (:mod:`jaxprune.latency`): every conv and dense op timed alone at
      ``batch_size`` on each group's :func:`jaxprune.surgery.targets.latency_grid`
      candidates (``latency_grid`` allowed widths per group, multiples of
      ``round_to``). Give exactly one of the three targets.
    latency_table: a table measured before (``info["latency_table"]`` of an
      earlier call on the same model, or :func:`jaxprune.latency.load`);
      default: measured now (ResNet-56 at batch 1: ~20 s on a CPU).
    batch_size: the batch the latency table times (the batch you will serve).
    latency_grid: latency candidates per group (at most; more is finer and slower
      to measure).
    global_ranking: rank channels across groups instead of about the same
      fraction per group; with a latency target, greedy by importance per ms (see
      :mod:`jaxprune.surgery.targets`).
    round_to: kept widths a multiple of this (or the whole group). Default None:
      the backend's for this model, :func:`jaxprune.latency.default_round_to` (8 on
      a CPU; 16 for a model of dense convs on an AVX-512 CPU at XLA's stock settings),
      where, under a FLOPs or params target, a group not wider than it stays whole
      while the target is reachable so (a narrower one runs about as long on the
      backend's vectors), else it is pruned at the largest of ``round_to // 2, ...,
      1`` below its width (:func:`jaxprune.surgery.targets.default_steps`); a
      latency target's table measures both; an int is used as given (1: any width).
    ignore: leaf-path patterns of groups to leave whole (see
      :func:`jaxprune.graph.trace`).
    grads: the gradients of a loss, for "taylor".
    key: for "random".
    exact_only: narrow only groups whose removal is exact or compensated
      (:attr:`jaxprune.graph.Group.exactness`): the pruned network computes what
      the original with those channels zeroed does. By default approximate groups
      (a transformer's residual width under LayerNorm/RMSNorm, a head dimension
      under a 1/sqrt(head_dim) scale) are pruned too, as Torch-Pruning does, and
      listed in ``info["approximate"]``.
    overrides: as for :func:`prune` (passed to :func:`rebuild`).
    calibrate: with ``latency_ratio``, close the loop on the measured speed-up
      (default): the table leaves out what is not a conv or dense (norms,
      activations, adds, fusion), so the selection is rebuilt and the whole network
      timed against the base (``latency_timer``); while the measured speed-up is
      under the requested one, the table budget is tightened (a secant step, see
      :func:`jaxprune.surgery.targets.calibrate_budget`), at most
      ``calibration_rounds`` timings. When no round meets it, the fastest is kept
      and one line says what was reached. False: the table's selection, untimed.
    calibration_rounds: the most selections timed (each a rebuild and a timing).
    latency_timer: ``timer(pruned) -> (base ms, pruned ms)`` for the calibration;
      default :func:`jaxprune.latency.compare_inference` on the jitted
      eval-mode forwards at ``batch_size`` (base and pruned alternated, median of
      ``CALIBRATION_TIMING_ROUNDS`` rounds, compile excluded).
    depth: with ``latency_ratio``, also remove whole residual blocks ``x + f(x)``
      (modules of their own, found in the jaxpr: :mod:`jaxprune.surgery.blocks`;
      every stage keeps its first block): channel steps and blocks are ranked
      together by importance per ms (a block's importance is what its prunable
      groups keep), :func:`jaxprune.surgery.targets.select_blocks_and_channels`.
      At batch 1 a narrow conv costs about what a wide one does, so only removing
      layers buys time there (docs/design/surgery.md). Not with a Linen ``call``.

  Returns:
    ``(pruned, info)``: the :class:`Pruned` network and ``{"keep": {group id:
    kept indices}, "before": {"flops", "params"}, "after": {"flops", "params"},
    "graph": the traced graph, "approximate": {group id: effects} of the narrowed
    groups whose removal changes the function (fine-tune after), "round_to": the
    multiple used, "fitted_round_to": {group id: its finer multiple} of the groups
    not wider than a default round_to pruned at one, "narrow_whole": the ids of
    such groups kept whole}``; with a latency
    target also ``"latency_table"`` (reuse it) and ``"predicted_speedup"`` (the
    table's full latency over its latency at the kept widths); calibrated, also
    ``"measured_speedup"`` (base ms over pruned ms, whole networks),
    ``"measured_ms"`` (``{"base", "pruned"}``) and ``"calibration"``
    (``{"rounds", "met", "requested_speedup", "budget", "tries": [{"budget",
    "predicted_speedup", "measured_speedup"}], "timing"}``). With ``depth``,
    ``"removed_blocks"`` (module paths, also ``pruned.removed_blocks``),
    ``"removable_blocks"`` and ``"excluded_stages"`` ({stage: why its blocks stay});
    ``"keep"`` and ``"after"`` are then of the network with those blocks removed
    (``"after"`` counted by :func:`jaxprune.flops.count`).

  Example:
    >>> small, info = surgery.prune_to(model, variables, (32, 32, 3), flops_ratio=0.5)
    >>> info["after"]["flops"] / info["before"]["flops"]   # <= 0.5, within 0.02 of it
    >>> fast, info = surgery.prune_to(model, variables, (32, 32, 3), latency_ratio=0.5)
    >>> info["measured_speedup"]                           # >= 2.0 (or one line why not)
  """
  fit_round_to = round_to is None  # the backend's default, fitted to narrow groups
  if not fit_round_to:
    round_to = targets.check_round_to(round_to)
  if latency_ratio is None and latency_table is not None:
    raise UserError("latency_table is for latency_ratio; give latency_ratio too")
  if latency_ratio is None and latency_timer is not None:
    raise UserError("latency_timer is for latency_ratio; give latency_ratio too")
  if not isinstance(calibrate, (bool, np.bool_)):
    raise UserError(f"calibrate={calibrate!r}: give True (time the whole network and "
                    "tighten the latency budget until the speed-up is met) or False")
  if (isinstance(calibration_rounds, bool) or not isinstance(calibration_rounds, (
      int, np.integer)) or calibration_rounds < 1):
    raise UserError(f"calibration_rounds={calibration_rounds!r}: the most selections "
                    "timed, an int >= 1")
  if latency_timer is not None and not callable(latency_timer):
    raise UserError(f"latency_timer is a {type(latency_timer).__name__}; give "
                    "timer(pruned) -> (base ms, pruned ms)")
  if not isinstance(depth, (bool, np.bool_)):
    raise UserError(f"depth={depth!r}: give True (remove whole residual blocks too) or False")
  if depth and latency_ratio is None:
    raise UserError("depth=True removes residual blocks under a latency target: give "
                    "latency_ratio (FLOPs and params targets remove channels only)")
  if depth and call is not None and graph_lib.tracing.model_kind(model, variables) == "linen":
    raise UserError("depth=True: a Linen model run under call= cannot skip its blocks; "
                    "give the module whose __call__ is the forward")
  calibrating = latency_ratio is not None and bool(calibrate)
  if calibrating and latency_timer is None:
    _check_timeable(model, variables, input_shape)
  if latency_ratio is not None and (isinstance(batch_size, bool) or not isinstance(
      batch_size, (int, np.integer)) or batch_size < 1):
    raise UserError(f"batch_size={batch_size!r}: the latency table's batch, an int >= 1")
  refuse_shapes_only("prune_to", model, variables)
  g = graph_lib.trace(model, variables, input_shape, call, ignore=ignore,
                      round_to=1 if fit_round_to else round_to)
  if fit_round_to:  # the backend's multiple for this model's ops (its traced program)
    round_to = g.round_to = latency.default_round_to(
        profile=latency.jaxpr_profile(g.traced.jaxpr.jaxpr))
  values = graph_lib.named_leaves(model, variables)
  groups = g.prunable(exact_only=exact_only)
  if exact_only and not groups and g.prunable():
    raise UserError(f"exact_only=True: none of the {len(g.prunable())} prunable groups "
                    "can be removed exactly (each is approximate: print the graph for why)")
  scores = importance.group_scores(g, values, criterion, grads=grads, key=key, groups=groups)
  table = None
  if latency_ratio is not None and scores:
    table = latency_table_for(g, list(scores), round_to, batch_size, latency_grid,
                              latency_table, fit_round_to=fit_round_to)
  calibration, removed, depth_info = None, [], {}
  if depth and table is not None:
    found, excluded = removable_blocks(model, variables, input_shape, call, g, scores)
    depth_info = {"removable_blocks": [b.prefix for b in found], "excluded_stages": excluded}
    choose = lambda ratio: targets.select_blocks_and_channels(
        g, scores, latency_ratio=ratio, latency_table=table, blocks=found)
    every = frozenset().union(*[b.ops for b in found]) if found else frozenset()
    skip_of = lambda prefixes: frozenset().union(
        *[b.ops for b in found if b.prefix in prefixes]) if prefixes else frozenset()
  elif table is not None:
    choose = lambda ratio: (targets.select_channels(
        g, scores, latency_ratio=ratio, latency_table=table,
        global_ranking=global_ranking, round_to=round_to, fit_round_to=fit_round_to), [])
    every = frozenset()
    skip_of = lambda prefixes: frozenset()

  def build(kp, prefixes):
    small = prune(model, variables, input_shape, kp, call, graph=g, overrides=overrides)
    return remove_blocks(small, prefixes)

  if table is not None and calibrating:
    timer = latency_timer or _default_timer(model, variables, input_shape, call, batch_size)
    small, keep, removed, calibration = _calibrated(
        table, scores, latency_ratio, choose, every, skip_of, calibration_rounds, timer,
        build, "latency_timer (given)" if latency_timer is not None else TIMING)
  elif table is not None:
    keep, removed = choose(latency_ratio)
    small = build(keep, removed)
  else:
    keep = targets.select_channels(g, scores, flops_ratio=flops_ratio,
                                  params_ratio=params_ratio, latency_ratio=latency_ratio,
                                  latency_table=table, global_ranking=global_ranking,
                                  fit_round_to=fit_round_to)
    small = prune(model, variables, input_shape, keep, call, graph=g, overrides=overrides)
  after = g.predict(keep)
  if removed:
    after = flops.count(small.model, small.variables, input_shape, call)
    after = {"flops": int(after["flops"]), "params": int(after["params"])}
  if fit_round_to and latency_ratio is None:  # the rule select_channels applied
    metric, ratio = ("flops", flops_ratio) if flops_ratio is not None else (
        "params", params_ratio)
    steps = targets.default_steps(g, scores, round_to, metric, ratio)
  else:
    steps = targets.group_round_to(g, scores, round_to, fit_round_to)
  width = lambda gid: g.groups[gid].width
  info = {"keep": keep, "before": g.predict({}), "after": after, "graph": g,
          "approximate": small.approximate, "round_to": round_to,
          "fitted_round_to": {gid: r for gid, r in steps.items()
                              if r != round_to and r < width(gid)},
          "narrow_whole": sorted(gid for gid, r in steps.items() if fit_round_to
                                 and r == width(gid) <= round_to)}
  if table is not None:
    info["latency_table"] = table
    info["predicted_speedup"] = table.full / table.at(
        table.index({gid: len(kept) for gid, kept in keep.items()}), skip_of(removed))
  if depth:
    info.update(depth_info, removed_blocks=list(removed))
  if calibration is not None:
    info["measured_speedup"] = calibration.pop("measured_speedup")
    info["measured_ms"] = calibration.pop("measured_ms")
    info["calibration"] = calibration
  return small, info


def _module_path(path: str, kind: str) -> str:
  """A leaf path without its collection (Linen; NNX paths have none)."""
  return path.split("/", 1)[1] if kind == "linen" and "/" in path else path


def removable_blocks(model, variables, input_shape, call, g: graph_lib.Graph,
                     scores: Mapping[int, Any]):
  """``([RemovableBlock], {stage: why its blocks stay})``: the residual blocks of
  `model` that a smaller network may skip (:func:`jaxprune.surgery.blocks.skippable_stages`;
  a stage keeps its first block unless it follows a projection block), each with the
  ops of ``g`` inside it and the scored groups whose members all are; a block with no
  scored group inside stays (it has no importance to rank it by)."""
  linen, lvars = blocks_lib.linen_form(model, variables, call)
  x = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                   graph_lib.tracing.example_inputs(input_shape))
  closed, paths, _ = blocks_lib.eval_jaxpr(linen, lvars, x)
  kind = g.traced.kind
  op_paths = [None if op.kernel is None else _module_path(op.kernel, kind) for op in g.ops]
  stages, excluded = blocks_lib.skippable_stages(
      linen, lvars, closed, paths, len(jax.tree.leaves(x)),
      lambda rng: probe_inputs(input_shape, 1, seed=int(rng.integers(1 << 31))),
      ["params/" + p for p in op_paths if p is not None])
  found = []
  for name, st in stages:
    unscored = []
    for b in st.blocks[0 if st.merged else 1:]:
      inside = lambda p: p.startswith(b.prefix + "/")
      ops = frozenset(i for i, p in enumerate(op_paths) if p is not None and inside(p))
      groups = frozenset(gid for gid in scores if all(
          inside(_module_path(m.path, kind)) for m in g.groups[gid].members))
      if groups:
        found.append(targets.RemovableBlock(b.prefix, ops, groups))
      else:
        unscored.append(b.prefix)
    if unscored:
      excluded[name] = (f"blocks {unscored} have no prunable group of their own (nothing "
                        "to rank them by)")
  return found, excluded


def remove_blocks(small: Pruned, prefixes: Sequence[str]) -> Pruned:
  """`small` with the residual blocks at module paths `prefixes` skipped
  (:func:`jaxprune.surgery.blocks.skip_blocks`); ``removed_blocks`` lists them."""
  if not prefixes:
    return small
  model, small_vars = blocks_lib.skip_blocks(small.model, small.variables, prefixes)
  return dataclasses.replace(small, model=model, variables=small_vars,
                             removed_blocks=tuple(prefixes))


CALIBRATION_TIMING_ROUNDS = 15  # alternated rounds of base and pruned per calibration timing


def _calibrated(table, scores, ratio: float, choose: Callable, every, skip_of: Callable,
                rounds: int, timer: Callable, build: Callable, description: str):
  """``(pruned, keep, removed blocks, calibration)``: the latency selection
  (``choose(ratio) -> (keep, removed block prefixes)``) whose whole network, timed by
  ``timer``, meets ``ratio`` (:func:`jaxprune.surgery.targets.calibrate_budget`)."""
  floor = table.at(table.index({gid: int(table.candidates[table.group_ids.index(gid)][0])
                                for gid in scores}), every) / table.full
  keeps, timed = {}, {}
  choose(ratio)  # the table can reach it (else one line)

  def predicted(sel):
    return table.full / table.at(table.index(dict(sel[0])), skip_of(sel[1]))

  def select(b):
    keep, removed = choose(min(1.0, max(b, floor)))
    sel = (tuple(sorted((gid, int(kept.size)) for gid, kept in keep.items())),
           tuple(removed))
    keeps.setdefault(sel, (keep, list(removed)))
    return sel

  def measure(sel):
    small = build(*keeps[sel])
    base_ms, ms = (float(v) for v in timer(small))
    if not (np.isfinite(base_ms) and np.isfinite(ms) and base_ms > 0 and ms > 0):
      raise UserError(f"latency_timer returned ({base_ms}, {ms}) ms: give two positive times")
    timed[sel] = (small, base_ms, ms)
    blocks = f", {len(sel[1])} blocks removed" if sel[1] else ""
    latency.log_line(f"calibration round {len(timed)}: predicted {predicted(sel):.2f}x, "
                     f"measured {base_ms / ms:.2f}x (base {base_ms:.3g} ms, pruned {ms:.3g} "
                     f"ms; requested {1 / ratio:.2f}x{blocks})")
    return ms / base_ms

  chosen, tries = targets.calibrate_budget(ratio, floor, select, measure, rounds)
  sel = tries[chosen]["selection"]
  small, base_ms, ms = timed[sel]
  met = ms / base_ms <= ratio
  if not met:
    latency.log_line(f"calibration: reached {base_ms / ms:.2f}x of the requested "
                   f"{1 / ratio:.2f}x after {len(tries)} rounds (the fastest selection is "
                   f"kept{'; the smallest network the table allows' if tries[chosen]['budget'] <= floor * (1 + 1e-9) else ''})")
  return small, keeps[sel][0], keeps[sel][1], {
      "rounds": len(tries), "met": bool(met), "requested_speedup": 1 / ratio,
      "budget": tries[chosen]["budget"], "measured_speedup": base_ms / ms,
      "measured_ms": {"base": base_ms, "pruned": ms},
      "tries": [{"budget": t["budget"],
                 "predicted_speedup": predicted(t["selection"]),
                 "measured_speedup": timed[t["selection"]][1] / timed[t["selection"]][2]}
                for t in tries],
      "timing": description}


def _check_timeable(model, variables, input_shape):
  """The default calibration timer runs one float input of ``(batch, *input_shape)``."""
  if not (isinstance(input_shape, (tuple, list)) and all(
      isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in input_shape)):
    raise UserError("latency_ratio calibration times one float input of shape (batch, "
                    "*input_shape); for several inputs give latency_timer=, or "
                    "calibrate=False")


class _EvalForward:
  """A model's eval-mode forward as ``apply(variables, x, train=False)`` (what
  :func:`jaxprune.latency.compare_inference` calls), for any model kind."""

  def __init__(self, model, variables, call):
    self.kind = graph_lib.tracing.model_kind(model, variables)
    self.model, self.call = model, call
    if self.kind == "nnx":
      from flax import nnx  # pylint: disable=g-import-not-at-top
      self.graphdef, self.state = nnx.split(graph_lib.tracing.eval_copy(model))
    else:
      self.state = variables

  def apply(self, v, x, train: bool = False):
    del train
    if self.kind == "nnx":
      from flax import nnx  # pylint: disable=g-import-not-at-top
      module = nnx.merge(self.graphdef, v)
      return self.call(module, x) if self.call is not None else module(x)
    return forward(self.model, v, self.call, x)


def _default_timer(model, variables, input_shape, call, batch_size: int) -> Callable:
  """``timer(pruned) -> (base ms, pruned ms)`` by :func:`latency.compare_inference`."""
  base = _EvalForward(model, variables, call)

  rounds = [CALIBRATION_TIMING_ROUNDS]

  def timer(small):
    fast = _EvalForward(small.model, small.variables, call)
    nets = {"base": (base, base.state), "pruned": (fast, fast.state)}
    while True:
      ms = latency.compare_inference(nets, tuple(input_shape), batch_size, rounds[0])
      want = int(min(CALIBRATION_TIMING_MAX_ROUNDS, max(CALIBRATION_TIMING_ROUNDS, math.ceil(
          CALIBRATION_TIMING_S * 1e3 / (ms["base"] + ms["pruned"])))))
      if want <= rounds[0] or rounds[0] * (ms["base"] + ms["pruned"]) >= 500:
        rounds[0] = max(rounds[0], want)
        return ms["base"], ms["pruned"]
      rounds[0] = want  # fast networks: time again with more rounds (noise)
  return timer


CALIBRATION_TIMING_S = 2.0  # about this long per calibration timing (more rounds for fast nets)
CALIBRATION_TIMING_MAX_ROUNDS = 200
TIMING = (
    "latency.compare_inference: jitted eval-mode forwards of the base and the pruned "
    f"network at the table's batch, alternated, median of {CALIBRATION_TIMING_ROUNDS} to "
    f"{CALIBRATION_TIMING_MAX_ROUNDS} rounds (about {CALIBRATION_TIMING_S:g} s of calls), "
    "compile excluded")


def latency_table_for(g: graph_lib.Graph, group_ids, round_to: int, batch_size: int,
                      grid: int = targets.DEFAULT_GRID, table=None,
                      fit_round_to: bool = False, **measure_kwargs):
  """The latency table of a latency target on ``g``: ``table`` when given (checked to
  be planned for this graph's ops and to cover ``group_ids``), else measured now on
  :func:`jaxprune.surgery.targets.latency_candidates`."""
  if table is None:
    return latency.measure(targets.latency_candidates(g, group_ids, round_to, grid,
                                                     fit_round_to),
                           batch_size, **measure_kwargs)
  if not isinstance(table, latency.LatencyTable):
    raise UserError(f"latency_table is a {type(table).__name__}; give a "
                    "latency.LatencyTable (info['latency_table'] of an earlier prune_to)")
  if any(gid >= len(g.groups) for gid in table.group_ids):
    raise UserError("latency_table was planned for another model (its groups are not "
                    "this graph's)")
  same = latency.plan(latency.Candidates.of(g, dict(zip(table.group_ids, table.candidates))),
                      table.batch_size)
  for k in ("ops_sha256", "programs_sha256"):
    if same.fingerprint[k] != table.fingerprint[k]:
      raise UserError("latency_table was planned for another model or other widths (its "
                      "ops differ from this graph's); measure a new one")
  missing = sorted(set(group_ids) - set(table.group_ids))
  if missing:
    raise UserError(f"latency_table does not cover the prunable groups {missing}; measure "
                    "a new one (latency_table=None)")
  return table
