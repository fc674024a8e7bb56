"""A target-driven pruner: which channels to keep so that the network meets a FLOPs or params ratio.

The pruner knows only targets and rankings; the graph knows the wiring
(:mod:`jaxprune.graph`), a criterion the scores (:mod:`jaxprune.surgery.importance`).
Counts are exact at every step: :meth:`jaxprune.graph.Graph.predict` computes the
FLOPs and params of any narrowing from the trace.

- Local ranking: every prunable group keeps the same fraction of its channels,
  its best-scored ones; the fraction is the largest that meets the target.
- Global ranking: channels of all groups compete; scores are divided by their
  group's mean so that layers of different scale compare, and the lowest go
  first until the target is met.

Kept widths are multiples of ``round_to`` (a group narrower than ``round_to``
stays whole) and at least one channel.
"""
import math
from collections.abc import Mapping

import numpy as np

from jaxprune.errors import UserError
from jaxprune.graph import Graph


def check_round_to(round_to) -> int:
  """``round_to`` as an int >= 1; anything else (2.5, True, 0) is a :class:`UserError`."""
  if (isinstance(round_to, (bool, np.bool_)) or not isinstance(round_to, (int, np.integer))
      or round_to < 1):
    raise UserError(f"round_to={round_to!r}: kept widths are rounded to a multiple of "
                    "this; give an int >= 1")
  return int(round_to)


def _round(n: int, width: int, round_to: int) -> int:
  if round_to > 1:
    n = int(math.ceil(n / round_to) * round_to)
  return int(min(width, max(1, n)))


def _top(score: np.ndarray, n: int) -> np.ndarray:
  return np.sort(np.argsort(-score, kind="stable")[:n])


def select_channels(graph: Graph, scores: Mapping[int, np.ndarray], *,
                    flops_ratio: float | None = None, params_ratio: float | None = None,
                    global_ranking: bool = False,
                    round_to: int | None = None) -> dict[int, np.ndarray]:
  """The channels to keep, per group, to reach a FLOPs or params ratio.

  Args:
    graph: from :func:`jaxprune.graph.trace`.
    scores: ``{group id: per-channel importance}`` for the groups that may shrink
      (:func:`jaxprune.surgery.importance.group_scores`).
    flops_ratio: target FLOPs as a fraction of the unpruned network's, in (0, 1].
    params_ratio: target params fraction instead (give exactly one).
    global_ranking: rank channels across groups (see the module docstring).
    round_to: kept widths a multiple of this (default the graph's ``round_to``).

  Returns:
    ``{group id: sorted kept channel indices}``.

  Raises:
    UserError: for a missing or out-of-range target, or one the network cannot
      reach (every group at its smallest allowed width is still above it).
  """
  if (flops_ratio is None) == (params_ratio is None):
    raise UserError("give exactly one target: flops_ratio or params_ratio")
  metric, ratio = ("flops", flops_ratio) if flops_ratio is not None else ("params", params_ratio)
  if not 0 < ratio <= 1:
    raise UserError(f"{metric}_ratio must be in (0, 1], got {ratio}")
  if not scores:
    raise UserError("no prunable group to select channels from")
  round_to = check_round_to(graph.round_to if round_to is None else round_to)
  full = graph.predict({})[metric]
  target = ratio * full
  widths = {gid: graph.groups[gid].width for gid in scores}

  if global_ranking:
    normed = {gid: np.asarray(s, np.float64) / max(float(np.mean(s)), 1e-30)
              for gid, s in scores.items()}

    def keep_at(t):
      return {gid: _top(s, _round(int((s >= t).sum()), widths[gid], round_to))
              for gid, s in normed.items()}
    lo, hi = 0.0, max(float(s.max()) for s in normed.values()) * (1 + 1e-9) + 1e-12
  else:
    def keep_at(t):
      return {gid: _top(s, _round(int(round(widths[gid] * (1 - t))), widths[gid], round_to))
              for gid, s in scores.items()}
    lo, hi = 0.0, 1.0

  if graph.predict(keep_at(hi))[metric] > target:
    smallest = graph.predict(keep_at(hi))[metric]
    raise UserError(f"cannot reach {metric}_ratio={ratio}: the smallest network the "
                    f"prunable groups allow (round_to={round_to}) has "
                    f"{smallest / full:.3f} of the {metric}")
  if graph.predict(keep_at(lo))[metric] <= target:
    return keep_at(lo)
  for _ in range(50):  # smallest threshold (least pruning) that meets the target
    mid = (lo + hi) / 2
    if graph.predict(keep_at(mid))[metric] <= target:
      hi = mid
    else:
      lo = mid
  return keep_at(hi)
