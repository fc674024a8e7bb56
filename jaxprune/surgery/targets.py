"""Channel selection under a target: which channels to keep so that the network meets a
FLOPs, params or latency ratio (``select_channels``, ``calibrate_budget``); the algorithm:
docs/design/surgery.md."""
import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping

import numpy as np

from jaxprune.errors import UserError
from jaxprune.graph import Graph

SLACK = 0.02  # how far under a target (a fraction of the full network) is close enough
DEFAULT_GRID = 8  # latency candidates per group: ResNet-56 at batch 1 times in ~20 s on CPU


def check_round_to(round_to) -> int:
  """``round_to`` as an int >= 1; anything else (2.5, True, 0) is a :class:`UserError`."""
  if (isinstance(round_to, (bool, np.bool_)) or not isinstance(round_to, (int, np.integer))
      or round_to < 1):
    raise UserError(f"round_to={round_to!r}: kept widths are rounded to a multiple of "
                    "this; give an int >= 1")
  return int(round_to)


def fitted_round_to(width: int, round_to: int) -> int:
  """The multiple a group of ``width`` channels is pruned at under a backend-default
  ``round_to`` (``prune_to(round_to=None)``): the largest of ``round_to, round_to // 2,
  ..., 1`` below ``width``, so that a group as narrow as the default can still shrink
  (as :func:`jaxprune.search.space.fitted_candidates` does for TAS); 1 for ``width`` 1."""
  r = int(round_to)
  while r > 1 and r >= width:
    r //= 2
  return max(r, 1)


def group_round_to(graph: Graph, group_ids, round_to: int,
                   fit_round_to: bool = False) -> dict[int, int]:
  """``{group id: the multiple its kept widths take}``: ``round_to``, or with
  ``fit_round_to`` the :func:`fitted_round_to` of the group's width."""
  return {int(gid): (fitted_round_to(graph.groups[gid].width, round_to) if fit_round_to
                     else int(round_to)) for gid in group_ids}


def default_steps(graph: Graph, group_ids, round_to: int, metric: str,
                  ratio: float) -> dict[int, int]:
  """The per-group multiples of a backend-default ``round_to`` under a FLOPs or params
  ``ratio``: a group not wider than ``round_to`` stays whole (its step is its width)
  while the target is reachable so and some group is wider — on the backend's vectors a
  narrower one runs about as long (docs/design/surgery.md) — else every group takes its
  :func:`group_round_to` with ``fit_round_to``. A latency target measures this instead:
  its table's candidates are the fitted ones."""
  fitted = group_round_to(graph, group_ids, round_to, fit_round_to=True)
  width = {gid: graph.groups[gid].width for gid in fitted}
  if metric == "latency" or all(w <= round_to for w in width.values()):
    return fitted
  whole = {gid: (width[gid] if width[gid] <= round_to else r) for gid, r in fitted.items()}
  smallest = {gid: np.arange(int(allowed_widths(width[gid], r)[0]))
              for gid, r in whole.items()}
  reachable = graph.predict(smallest)[metric] <= ratio * graph.predict({})[metric] * (
      1 + 1e-12)
  return whole if reachable else fitted


def allowed_widths(width: int, round_to: int = 1) -> np.ndarray:
  """The kept widths a group may have: multiples of ``round_to`` below ``width``, and
  ``width`` (ascending)."""
  return np.asarray(list(range(round_to, width, round_to)) + [width], np.int64)


def latency_grid(width: int, round_to: int = 1, size: int = DEFAULT_GRID) -> tuple:
  """A group's latency-table candidates: the allowed widths nearest to
  ``width * i / size`` for i = 1..size (duplicates merged; the full width last)."""
  allowed = allowed_widths(width, round_to)
  return tuple(sorted({int(allowed[_nearest(allowed, width * i / size)])
                       for i in range(1, size + 1)} | {width}))


def latency_candidates(graph: Graph, group_ids, round_to: int = 1,
                       size: int = DEFAULT_GRID, fit_round_to: bool = False):
  """The :class:`jaxprune.latency.Candidates` of a latency target: the
  :func:`latency_grid` of every group in ``group_ids`` (at its
  :func:`group_round_to`)."""
  from jaxprune import latency  # pylint: disable=g-import-not-at-top
  if (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
    raise UserError(f"latency_grid={size!r}: the number of latency-table candidates per "
                    "group; give an int >= 1")
  steps = group_round_to(graph, group_ids, round_to, fit_round_to)
  return latency.Candidates.of(graph, {gid: latency_grid(graph.groups[gid].width, r, size)
                                       for gid, r in steps.items()})


def _nearest(allowed: np.ndarray, x: float) -> int:
  """Index of the allowed width nearest to ``x`` (ties to the larger)."""
  pos = int(np.searchsorted(allowed, x))
  if pos <= 0:
    return 0
  if pos >= allowed.size:
    return allowed.size - 1
  return pos if allowed[pos] - x <= x - allowed[pos - 1] else pos - 1


def _top(score: np.ndarray, n: int) -> np.ndarray:
  return np.sort(np.argsort(-score, kind="stable")[:n])


def select_channels(graph: Graph, scores: Mapping[int, np.ndarray], *,
                    flops_ratio: float | None = None, params_ratio: float | None = None,
                    latency_ratio: float | None = None, latency_table=None,
                    global_ranking: bool = False, round_to: int | None = None,
                    fit_round_to: bool = False) -> dict[int, np.ndarray]:
  """The channels to keep, per group, to reach a FLOPs, params or latency ratio.

  Args:
    graph: from :func:`jaxprune.graph.trace`.
    scores: ``{group id: per-channel importance}`` for the groups that may shrink
      (:func:`jaxprune.surgery.importance.group_scores`).
    flops_ratio: target FLOPs as a fraction of the unpruned network's, in (0, 1].
    params_ratio: target params fraction instead.
    latency_ratio: target latency as a fraction of the full network's in
      ``latency_table`` (give exactly one of the three).
    latency_table: a measured :class:`jaxprune.latency.LatencyTable` whose groups
      include every scored group (:func:`latency_candidates`); its candidates are
      the allowed widths.
    global_ranking: rank channels across groups (docs/design/surgery.md).
    round_to: kept widths a multiple of this (default the graph's ``round_to``;
      for latency, the table's candidates already are).
    fit_round_to: ``round_to`` is the backend's default (``prune_to``'s): a group not
      wider than it stays whole while the target is reachable so, else it is pruned at
      the largest of ``round_to // 2, ..., 1`` below its width (:func:`default_steps`,
      :func:`fitted_round_to`).

  Returns:
    ``{group id: sorted kept channel indices}``.

  Raises:
    UserError: for a missing or out-of-range target, or one the network cannot
      reach (every group at its smallest allowed width is still above it).
  """
  given = {k: v for k, v in (("flops", flops_ratio), ("params", params_ratio),
                             ("latency", latency_ratio)) if v is not None}
  if len(given) != 1:
    raise UserError("give exactly one target: flops_ratio, params_ratio or latency_ratio")
  (metric, ratio), = given.items()
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)) \
      or not 0 < ratio <= 1:
    raise UserError(f"{metric}_ratio must be in (0, 1], got {ratio!r}")
  if not scores:
    raise UserError("no prunable group to select channels from")
  round_to = check_round_to(graph.round_to if round_to is None else round_to)
  scores = {int(gid): np.asarray(s, np.float64) for gid, s in scores.items()}
  widths = {gid: graph.groups[gid].width for gid in scores}

  if metric == "latency":
    table = latency_table
    if table is None:
      raise UserError("latency_ratio needs a latency_table (surgery.prune_to measures one)")
    missing = sorted(set(scores) - set(table.group_ids))
    if missing:
      raise UserError(f"the latency table does not cover groups {missing}: plan it with "
                      "surgery.targets.latency_candidates for the groups you prune")
    if not np.all(np.isfinite(table.program_ms)):
      raise UserError("the latency table has no times yet: measure it first")
    allowed = {gid: np.asarray(table.candidates[table.group_ids.index(gid)], np.int64)
               for gid in scores}
    full = table.full
    cost = lambda counts: table.at(table.index(counts))
  else:
    steps = (default_steps(graph, widths, round_to, metric, ratio) if fit_round_to
             else group_round_to(graph, widths, round_to))
    allowed = {gid: allowed_widths(w, steps[gid]) for gid, w in widths.items()}
    full = graph.predict({})[metric]
    # Each group's ranking once: a selection's hundreds of predictions take prefixes of it
    # (the same kept channels as _top; predict reads them as a set, unsorted).
    order = {gid: np.argsort(-s, kind="stable") for gid, s in scores.items()}
    cost = lambda counts: graph.predict(
        {gid: order[gid][:n] for gid, n in counts.items()})[metric]
  target = ratio * full

  smallest = {gid: int(a[0]) for gid, a in allowed.items()}
  if cost(smallest) > target * (1 + 1e-12):
    unit = "of the table's latency" if metric == "latency" else f"of the {metric}"
    why = (f"round_to={round_to}, the backend's default, narrower groups at a finer "
           "multiple; round_to=1 allows any width" if fit_round_to else f"round_to={round_to}")
    raise UserError(f"cannot reach {metric}_ratio={ratio}: the smallest network the "
                    f"prunable groups allow ({why}) has {cost(smallest) / full:.3f} {unit}")
  if metric == "latency" and global_ranking:
    kept = {gid: np.concatenate([[0.0], np.cumsum(np.sort(_normed(s))[::-1])])
            for gid, s in scores.items()}
    value = lambda counts: sum(float(kept[gid][n]) for gid, n in counts.items())
    counts = _adjust(_halp(table, scores, allowed, target)[0], allowed, cost, target,
                     SLACK * full, value=value)
  else:
    counts = _fit(scores, allowed, cost, target, global_ranking, SLACK * full)
  return {gid: _top(scores[gid], counts[gid]) for gid in scores}


@dataclasses.dataclass(frozen=True)
class RemovableBlock:
  """A residual block ``x + f(x)`` that a smaller network may skip (``prune_to``'s
  ``depth=True``; found by :func:`jaxprune.surgery.blocks.skippable_stages`)."""
  prefix: str         # its module path: the smaller network skips this module
  ops: frozenset      # indices into ``graph.ops`` of its convs and matmuls
  groups: frozenset   # ids of the scored groups whose channels are all inside it


def select_blocks_and_channels(graph: Graph, scores: Mapping[int, np.ndarray], *,
                               latency_ratio: float, latency_table, blocks
                               ) -> tuple[dict[int, np.ndarray], list[str]]:
  """The channels to keep and the residual blocks to remove for a latency ratio:
  channel steps and whole blocks ranked together by importance per ms of the table
  (a block's importance is what its groups keep; docs/design/surgery.md).

  Args:
    graph, scores, latency_ratio, latency_table: as in :func:`select_channels`.
    blocks: the :class:`RemovableBlock` s; each needs at least one scored group
      inside it (its importance).

  Returns:
    ``({group id: sorted kept channel indices}, [module paths of removed blocks])``;
    a removed block's groups are kept whole (the block is gone).

  Raises:
    UserError: as :func:`select_channels`; the smallest network counts every block
      removed.
  """
  if isinstance(latency_ratio, bool) or not isinstance(
      latency_ratio, (int, float, np.floating)) or not 0 < latency_ratio <= 1:
    raise UserError(f"latency_ratio must be in (0, 1], got {latency_ratio!r}")
  if not scores:
    raise UserError("no prunable group to select channels from")
  blocks = list(blocks)
  scores = {int(gid): np.asarray(sc, np.float64) for gid, sc in scores.items()}
  for b in blocks:
    if not b.groups or not set(b.groups) <= set(scores):
      raise UserError(f"block {b.prefix}: its groups {sorted(b.groups)} are not all scored "
                      "(a block's importance is what its scored groups keep)")
  table = latency_table
  if table is None or set(scores) - set(table.group_ids):
    raise UserError("latency_table must cover every scored group "
                    "(surgery.targets.latency_candidates)")
  if not np.all(np.isfinite(table.program_ms)):
    raise UserError("the latency table has no times yet: measure it first")
  allowed = {gid: np.asarray(table.candidates[table.group_ids.index(gid)], np.int64)
             for gid in scores}
  target = latency_ratio * table.full
  smallest = table.index({gid: int(a[0]) for gid, a in allowed.items()})
  every = frozenset().union(*[b.ops for b in blocks]) if blocks else frozenset()
  if table.at(smallest, every) > target * (1 + 1e-12):
    raise UserError(f"cannot reach latency_ratio={latency_ratio}: the smallest network "
                    f"(every group at its smallest candidate, {len(blocks)} removable "
                    f"blocks removed) has {table.at(smallest, every) / table.full:.3f} of "
                    "the table's latency")
  counts, dropped = _halp(table, scores, allowed, target, blocks)
  return ({gid: _top(scores[gid], n) for gid, n in counts.items()},
          [blocks[b].prefix for b in sorted(dropped)])


def _normed(s: np.ndarray) -> np.ndarray:
  return s / max(float(np.mean(s)), 1e-30)


def _fit(scores, allowed, cost: Callable, target: float, global_ranking: bool,
         slack: float) -> dict:
  """Near-uniform fractions (local) or a global threshold, then grow steps that fit,
  then exchange steps between two groups while more than ``slack`` under."""
  if global_ranking:
    normed = {gid: _normed(s) for gid, s in scores.items()}

    def counts_at(t):  # t: a threshold on the normalised scores
      return {gid: int(allowed[gid][_nearest(allowed[gid], float((s >= t).sum()))])
              for gid, s in normed.items()}
    lo, hi = 0.0, max(float(s.max()) for s in normed.values()) * (1 + 1e-9) + 1e-12
    fits = lambda t: cost(counts_at(t)) <= target
    least, most = hi, lo      # least kept at hi, most at lo
  else:
    def counts_at(t):  # t: the kept fraction
      return {gid: int(a[_nearest(a, t * a[-1])]) for gid, a in allowed.items()}
    lo, hi = 0.0, 1.0
    fits = lambda t: cost(counts_at(t)) <= target
    least, most = lo, hi
  if fits(most):
    return counts_at(most)
  good, bad = least, most
  for _ in range(50):  # the setting keeping the most that meets the target
    mid = (good + bad) / 2
    if fits(mid):
      good = mid
    else:
      bad = mid
  counts = counts_at(good)
  if global_ranking:
    sorted_normed = {gid: np.sort(_normed(s))[::-1] for gid, s in scores.items()}
    # the next step's channels: the best of those not kept; higher mean first
    priority = lambda gid, n, m: -float(np.mean(sorted_normed[gid][n:m]))
  else:
    priority = lambda gid, n, m: n / allowed[gid][-1]
  while True:  # grow one allowed step at a time while the target holds
    steps = []
    for gid, n in counts.items():
      idx = int(np.searchsorted(allowed[gid], n))
      if idx + 1 < allowed[gid].size:
        m = int(allowed[gid][idx + 1])
        steps.append((priority(gid, n, m), gid, m))
    for _, gid, m in sorted(steps):
      trial = {**counts, gid: m}
      if cost(trial) <= target:
        counts = trial
        break
    else:
      return _adjust(counts, allowed, cost, target, slack)


def _adjust(counts, allowed, cost: Callable, target: float, slack: float,
            window: int = 4, rounds: int = 20, max_moves: int = 5000,
            max_combos: int = 2048, value: Callable | None = None) -> dict:
  """While the network is more than ``slack`` under the target: the best move of one
  or two groups to other allowed widths (any, when that is at most about ``max_moves``
  moves; else each within ``window`` steps of its own) that
  stays within the target and comes closest to it. Single steps up no longer fit, so
  a move trades width between groups. A network with at most ``max_combos`` width
  combinations is searched whole (:func:`_closest`, which prefers the most ``value``,
  the kept importance, when it is given)."""
  now = cost(counts)
  gids = list(counts)
  if target - now > slack and math.prod(allowed[g].size for g in gids) <= max_combos:
    return _closest(counts, allowed, cost, target, slack, value)
  for _ in range(rounds):
    if target - now <= slack:
      break
    index = {gid: int(np.searchsorted(allowed[gid], n)) for gid, n in counts.items()}
    sizes = [allowed[gid].size for gid in gids]
    w = max(sizes) if (sum(sizes) ** 2 <= 2 * max_moves) else window
    near = {gid: [k for k in range(max(0, i - w), min(allowed[gid].size, i + w + 1))
                  if k != i] for gid, i in index.items()}
    best = None
    moves = [((g, k),) for g in gids for k in near[g]]
    moves += [((g, k), (h, l)) for a, g in enumerate(gids) for h in gids[a + 1:]
              for k in near[g] for l in near[h]]
    for move in moves:
      trial = {**counts, **{gid: int(allowed[gid][k]) for gid, k in move}}
      c = cost(trial)
      if now < c <= target and (best is None or c > best[0]):
        best = (c, trial)
    if best is None:
      break
    now, counts = best
  return counts


def _closest(counts, allowed, cost: Callable, target: float, slack: float,
             value: Callable | None = None) -> dict:
  """Every combination of allowed widths: of those within ``slack`` under the target,
  the one that keeps the most ``value`` if given, else the one nearest ``counts`` (sum
  of the groups' kept-fraction differences); if none is, the one closest to the
  target from below."""
  gids = list(counts)
  start = np.asarray([counts[g] / allowed[g][-1] for g in gids])
  best = None
  for combo in itertools.product(*[allowed[g] for g in gids]):
    trial = {g: int(n) for g, n in zip(gids, combo)}
    c = cost(trial)
    if c > target:
      continue
    if target - c > slack:
      key = (1, target - c)
    elif value is not None:
      key = (0, -value(trial))
    else:
      frac = np.asarray([trial[g] / allowed[g][-1] for g in gids])
      key = (0, float(np.abs(frac - start).sum()))
    if best is None or key < best[0]:
      best = (key, trial)
  return counts if best is None else best[1]


def _halp(table, scores, allowed, target: float, blocks=()) -> tuple[dict, frozenset]:
  """Greedy by importance per latency (docs/design/surgery.md), on the table's picks:
  ``({group id: width}, removed block indices)``. A block of ``blocks``
  (:class:`RemovableBlock`) is one more step: removing it loses the importance its
  groups keep and saves its ops' latency; its groups then stay where they are."""
  order = {gid: s for s, gid in enumerate(table.group_ids)}
  picks = [len(c) - 1 for c in table.candidates]
  gain = {}  # normalised importance kept at each candidate of a scored group
  for gid, s in scores.items():
    cum = np.concatenate([[0.0], np.cumsum(np.sort(_normed(s))[::-1])])
    gain[gid] = cum[allowed[gid]]
  touching = {order[gid]: [e for e in table.entries
                           if order[gid] in (e.in_group, e.out_group)
                           or any(t == order[gid] for f in e.scaled for t, _ in f.terms)]
              for gid in scores}
  dropped, skip, frozen = set(), set(), set()

  def delta(gid, new):  # latency change when group gid moves to candidate `new`
    s = order[gid]
    trial = list(picks)
    trial[s] = new
    return sum(table.entry_ms(e, trial) - table.entry_ms(e, picks) for e in touching[s]
               if e.op not in skip)

  def block_ms(b):  # the latency of block b's ops at the current picks
    return sum(table.entry_ms(e, picks) for e in table.entries if e.op in blocks[b].ops)

  def block_gain(b):  # the importance block b's groups keep at the current picks
    return sum(float(gain[g][picks[order[g]]]) for g in blocks[b].groups)

  def set_dropped(new):
    dropped.clear(), skip.clear(), frozen.clear()
    dropped.update(new)
    for b in dropped:
      skip.update(blocks[b].ops)
      frozen.update(blocks[b].groups)

  now = table.at(picks, skip)
  target = target * (1 - 1e-9)  # summed deltas drift: stay clear of the edge
  while now > target:
    best = None
    for gid in scores:
      i = picks[order[gid]]
      if i == 0 or gid in frozen:
        continue
      saved = -delta(gid, i - 1)
      if saved <= 0:
        continue
      key = (gain[gid][i] - gain[gid][i - 1]) / saved
      if best is None or key < best[0]:
        best = (key, gid)
    for b in range(len(blocks)):
      saved = block_ms(b) if b not in dropped else 0.0
      if saved > 0:
        key = block_gain(b) / saved
        if best is None or key < best[0]:
          best = (key, ("block", b))
    if best is None:  # no step saves time: the smallest network is the answer
      break
    if isinstance(best[1], tuple):
      set_dropped(dropped | {best[1][1]})
    else:
      picks[order[best[1]]] -= 1
    now = table.at(picks, skip)
  while True:
    best = None
    for gid in scores:
      i = picks[order[gid]]
      if gid in frozen or i + 1 >= len(allowed[gid]):
        continue
      added = delta(gid, i + 1)
      if now + added > target:
        continue
      key = (gain[gid][i + 1] - gain[gid][i]) / max(added, 1e-12)
      if best is None or key > best[0]:
        best = (key, gid)
    for b in dropped:
      added = block_ms(b)
      if now + added <= target:
        key = block_gain(b) / max(added, 1e-12)
        if best is None or key > best[0]:
          best = (key, ("block", b))
    if best is None:
      break
    if isinstance(best[1], tuple):
      set_dropped(dropped - {best[1][1]})
    else:
      picks[order[best[1]]] += 1
    now = table.at(picks, skip)
  if now > target:  # every step down taken and still over: the smallest is reachable
    picks = [0 if gid in scores else len(c) - 1
             for gid, c in zip(table.group_ids, table.candidates)]
    set_dropped(range(len(blocks)))
    now = table.at(picks, skip)
  free = [order[gid] for gid in scores if gid not in frozen]
  picks = _improve(table, picks, now, target, free,
                   {order[gid]: gain[gid] for gid in scores}, touching, skip=frozenset(skip))
  return ({gid: int(allowed[gid][-1 if gid in frozen else picks[order[gid]]])
           for gid in scores}, frozenset(dropped))


def _improve(table, picks, now, target, free, gain, touching, rounds: int = 100,
             skip=frozenset()):
  """Local search after the greedy: the best move of one group to any candidate, or of
  two groups at once (one trading width for the other), that keeps more importance
  within the budget; repeated until none does. Two groups that share no table entry
  change the latency by the sum of their own changes; shared ones are evaluated. The
  ops in ``skip`` (removed blocks') cost nothing."""
  touching = {s: [e for e in touching[s] if e.op not in skip] for s in free}
  entry_sets = {s: {id(e) for e in touching[s]} for s in free}

  def added(changes):
    trial = list(picks)
    for s, j in changes:
      trial[s] = j
    entries = {id(e): e for s, _ in changes for e in touching[s]}.values()
    return sum(table.entry_ms(e, trial) - table.entry_ms(e, picks) for e in entries)

  for _ in range(rounds):
    own = {s: np.asarray([added(((s, j),)) for j in range(len(gain[s]))]) for s in free}
    up = {s: np.asarray(gain[s]) - gain[s][picks[s]] for s in free}
    best, best_up = None, 1e-9
    for s in free:
      ok = (now + own[s] <= target) & (up[s] > best_up)
      if ok.any():
        j = int(np.argmax(np.where(ok, up[s], -np.inf)))
        best, best_up = ((s, j),), float(up[s][j])
    for a, s in enumerate(free):
      for t in free[a + 1:]:
        total = up[s][:, None] + up[t][None, :]
        if not (total > best_up).any():
          continue
        if entry_sets[s] & entry_sets[t]:
          cost = np.asarray([[added(((s, j), (t, k))) for k in range(len(gain[t]))]
                             for j in range(len(gain[s]))])
        else:
          cost = own[s][:, None] + own[t][None, :]
        ok = (now + cost <= target) & (total > best_up)
        if ok.any():
          j, k = np.unravel_index(int(np.argmax(np.where(ok, total, -np.inf))), total.shape)
          best, best_up = ((s, int(j)), (t, int(k))), float(total[j, k])
    if best is None:
      break
    for s, j in best:
      picks[s] = j
    now = table.at(picks, skip)
  return picks


# --- calibration: a latency target that the measured speed-up meets -----------------

CALIBRATION_ROUNDS = 4  # selections timed at most (each a rebuild + a whole-network timing)
AIM = 0.97  # a tightened budget aims this far under the requested latency (timing noise)
OVERSHOOT = 1.15  # a met target more than this over the request is loosened while rounds last


def calibrate_budget(ratio: float, floor: float, select: Callable, measure: Callable,
                     rounds: int = CALIBRATION_ROUNDS) -> tuple[int, list[dict]]:
  """The table budget whose selection *measures* at or under ``ratio`` of the base.

  The per-op table leaves out what is not a conv or dense (norms, activations,
  adds, fusion), so a table budget and the measured latency differ. ``select(b)``
  is the selection under ``b`` of the table's full latency (hashable, cheap: no
  timing); ``measure(selection)`` rebuilds and times it against the base and returns
  the measured ratio pruned / base. Round 1 tries ``ratio``; then, while the measured
  ratio is above ``ratio`` (too slow), or under ``ratio / OVERSHOOT`` with a too-slow
  budget known above it, the next budget is a secant step towards ``AIM * ratio`` on
  the last two tries (the first step proportional: ``b * AIM * ratio / measured``;
  a budget loosens the same way when the first try is far faster than asked), kept
  inside the bracket of tried budgets (its middle 80%) and at or above ``floor``
  (the smallest network's budget). A budget whose selection was timed already moves
  on by 3% steps until it selects another network (or leaves the bracket: stop). At
  most ``rounds`` timings.

  Returns ``(index of the chosen try, tries)``, a try being ``{"budget", "selection",
  "measured"}``: the met try with the largest budget (the least pruned that meets the
  target), else the fastest measured one.
  """
  tries, aim, b = [], AIM * ratio, min(1.0, max(ratio, floor))
  while True:
    sel = select(b)
    tries.append({"budget": b, "selection": sel, "measured": float(measure(sel))})
    slow = [t["budget"] for t in tries if t["measured"] > ratio]
    met = [t for t in tries if t["measured"] <= ratio]
    hi = min(slow, default=None)                          # smallest too-slow budget
    lo = max((t["budget"] for t in met), default=None)    # largest fast-enough budget
    if len(tries) >= rounds:
      break
    if met and (max(met, key=lambda t: t["budget"])["measured"] * OVERSHOOT >= ratio
                or lo >= 1.0):
      break  # met, and not far under the request
    if lo is None and hi <= floor * (1 + 1e-9):
      break  # the smallest network the table allows is still too slow
    nb = _next_budget(tries, aim)
    lower, upper = (floor, hi) if lo is None else (lo, hi if hi is not None else 1.0)
    if lo is not None and hi is not None:
      lower, upper = lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo)
    nb = min(max(nb, lower), upper)
    down = lo is None  # tighten while nothing met; else loosen towards hi
    seen = {t["selection"] for t in tries}
    while nb is not None and select(nb) in seen:
      nb = nb * (0.97 if down else 1 / 0.97)
      if nb < floor * (1 - 1e-9):
        nb = floor if select(floor) not in seen else None
      elif nb > 1 or (hi is not None and nb >= hi) or (lo is not None and nb <= lo):
        nb = None
    if nb is None:
      break  # no untried selection left between the tried budgets
    b = nb
  met = [i for i, t in enumerate(tries) if t["measured"] <= ratio]
  if met:
    return max(met, key=lambda i: tries[i]["budget"]), tries
  return min(range(len(tries)), key=lambda i: tries[i]["measured"]), tries


def _next_budget(tries, aim: float) -> float:
  """A secant step to ``measured(b) = aim`` on the last try and the latest earlier one
  with another budget and a measured ratio rising with the budget; else a
  proportional step from the last."""
  last = tries[-1]
  for prev in reversed(tries[:-1]):
    db = last["budget"] - prev["budget"]
    dm = last["measured"] - prev["measured"]
    if abs(db) > 1e-12 and dm / db > 0:
      return last["budget"] + (aim - last["measured"]) * db / dm
  return last["budget"] * aim / last["measured"]
