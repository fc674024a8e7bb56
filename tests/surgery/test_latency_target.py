"""Latency targets (issue 24 item 1): the latency-budget selector against a brute-force
reference on fresh random tables, prune_to(latency_ratio=...) on an injected table (no
timing in these tests), and the one table mechanism shared with TAS."""
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import graph, models, search, surgery
from jaxprune.errors import UserError
from jaxprune import latency
from jaxprune.surgery import targets
from latency_tables import entry_ms_slow

jax.config.update("jax_disable_most_optimizations", True)


class _Net(nn.Module):
  """Four prunable groups: a residual pair (c1, c2), c2a's hidden width, a strided conv
  and a 1x1 conv before the head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(nn.Conv(8, (3, 3), name="c1")(x))
    y = y + nn.Conv(8, (3, 3), name="c2")(nn.relu(nn.Conv(6, (3, 3), name="c2a")(y)))
    y = nn.relu(nn.Conv(12, (3, 3), strides=2, name="c3")(nn.relu(y)))
    y = nn.relu(nn.Conv(10, (1, 1), name="c4")(y))
    return nn.Dense(3, name="fc")(y.mean((1, 2)))


def _random_timer(rng):
  """A fresh random table: time ~ a * MACs^b per program plus a random offset each."""
  a, b = rng.uniform(0.5, 2), rng.uniform(0.6, 1.1)

  def timer(programs):
    return [a * 1e-4 * (math.prod(p.x_shape) * p.w_shape[-1] * math.prod(p.w_shape[:-1])
                        / p.x_shape[-1]) ** b + rng.uniform(0, 0.05) for p in programs]
  return timer


def _net_graph():
  model = _Net()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  return model, variables, graph.trace(model, variables, (8, 8, 3))


def test_latency_budget_selector_against_brute_force_on_random_tables():
  """Greedy by importance per ms plus local search against every width combination:
  within the budget always; the reference is the most kept importance among the
  combinations within 2% under the budget (the selector's promise, SLACK), or among
  all under it when none is that close. On 2100 random instances 93% optimal, the
  worst at 0.82 of the reference's kept importance, none under 0.8 (so 6 of 12 optimal
  and >= 0.7 each cannot fail by chance in practice)."""
  _, _, g = _net_graph()
  gids = [grp.id for grp in g.prunable()]
  cands = targets.latency_candidates(g, gids, 1, 4)
  rng = np.random.default_rng()
  optimal, ratios = 0, []
  while len(ratios) < 12:
    table = latency.measure(cands, 1, timer=_random_timer(rng), log=lambda _: None)
    lowest = table.at([0] * len(table.candidates)) / table.full
    if lowest >= 0.95:
      continue
    ratio = float(rng.uniform(lowest, 1.0))
    scores = {gid: rng.exponential(size=g.groups[gid].width) for gid in gids}
    keep = targets.select_channels(g, scores, latency_ratio=ratio, latency_table=table,
                                  global_ranking=True)
    norm = {gid: np.sort(s / s.mean())[::-1] for gid, s in scores.items()}
    kept_importance = lambda counts: sum(norm[gid][:n].sum() for gid, n in counts.items())
    counts = {gid: kept.size for gid, kept in keep.items()}
    for gid, kept in keep.items():  # the best-scored channels of each group
      assert set(kept.tolist()) == set(np.argsort(-scores[gid])[:kept.size].tolist())
    picks = table.index(counts)
    assert sum(entry_ms_slow(e, picks) for e in table.entries) <= ratio * table.full * (1 + 1e-9)
    fits = []  # (ms, kept importance) of every combination within the budget
    for combo in itertools.product(*[range(len(c)) for c in table.candidates]):
      ms = sum(entry_ms_slow(e, combo) for e in table.entries)
      if ms <= ratio * table.full:
        fits.append((ms, kept_importance({gid: table.candidates[s][i] for s, (gid, i)
                                          in enumerate(zip(table.group_ids, combo))})))
    near = [v for ms, v in fits if ms >= (ratio - targets.SLACK) * table.full]
    best = max(near or [v for _, v in fits])
    got = kept_importance(counts)
    assert got <= best + 1e-9
    ratios.append(got / best)
    optimal += got >= best - 1e-9
  assert min(ratios) >= 0.7, ratios
  assert optimal >= 6, ratios


@pytest.mark.parametrize("global_ranking", [False, True])
def test_prune_to_latency_target_on_an_injected_table(global_ranking):
  """ResNet-20, a synthetic table: the kept widths are table candidates, their table
  latency is at or under the target and within 2% of the full network's under it,
  ``predicted_speedup`` is the table's full latency over it, and the pruned network's
  widths are the kept ones."""
  model = models.cifar_resnet(20, 10)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)
  g = graph.trace(model, variables, (32, 32, 3))
  rng = np.random.default_rng()
  cands = targets.latency_candidates(g, [grp.id for grp in g.prunable()], 4, 8)
  table = latency.measure(cands, 2, timer=_random_timer(rng), log=lambda _: None)
  ratio = float(rng.uniform(0.45, 0.8))
  small, info = surgery.prune_to(model, variables, (32, 32, 3), latency_ratio=ratio,
                                 latency_table=table, round_to=4,
                                 global_ranking=global_ranking, calibrate=False)
  assert info["latency_table"] is table
  counts = {gid: kept.size for gid, kept in info["keep"].items()}
  for gid, n in counts.items():
    assert n in table.candidates[table.group_ids.index(gid)] and (n % 4 == 0)
  at = sum(entry_ms_slow(e, table.index(counts)) for e in table.entries)
  assert at <= ratio * table.full * (1 + 1e-9)
  assert at >= (ratio - 0.02) * table.full, (ratio, at / table.full)
  assert info["predicted_speedup"] == pytest.approx(table.full / at)
  assert info["after"] == graph.trace(small.model, small.variables, (32, 32, 3)).predict({})


def test_a_table_for_another_model_or_target_is_refused_in_one_line():
  model, variables, g = _net_graph()
  other = targets.latency_candidates(g, [grp.id for grp in g.prunable()][:2], 1, 4)
  table = latency.measure(other, 1, timer=_random_timer(np.random.default_rng(0)),
                          log=lambda _: None)
  with pytest.raises(UserError, match="does not cover"):
    surgery.prune_to(model, variables, (8, 8, 3), latency_ratio=0.5, latency_table=table)
  with pytest.raises(UserError, match="another model"):  # other input size: other programs
    surgery.prune_to(model, variables, (16, 16, 3), latency_ratio=0.5, latency_table=table)
  with pytest.raises(UserError, match="latency_table is for latency_ratio"):
    surgery.prune_to(model, variables, (8, 8, 3), flops_ratio=0.5, latency_table=table)
  with pytest.raises(UserError, match="batch_size"):
    surgery.prune_to(model, variables, (8, 8, 3), latency_ratio=0.5, batch_size=0)
  with pytest.raises(UserError, match="cannot reach latency_ratio=0.01"):
    full = targets.latency_candidates(g, [grp.id for grp in g.prunable()], 1, 4)
    surgery.prune_to(model, variables, (8, 8, 3), latency_ratio=0.01, latency_table=latency.measure(
        full, 1, timer=_random_timer(np.random.default_rng(0)), log=lambda _: None))


def test_search_space_tables_are_the_graph_candidates_plan():
  """One mechanism: a SearchSpace's table is the plan of its graph with its searched
  groups' candidates (same programs, entries and fingerprint)."""
  model = _Net()
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  space = search.SearchSpace(model, v, (8, 8, 3))
  a = latency.plan(space, 2)
  b = latency.plan(latency.Candidates.of(space.graph, {grp.id: c for grp, c in
                                                       zip(space.groups, space.candidates)}), 2)
  assert [p.key() for p in a.programs] == [p.key() for p in b.programs]
  assert [(e.op, e.in_group, e.out_group, e.programs.tolist()) for e in a.entries] == \
      [(e.op, e.in_group, e.out_group, e.programs.tolist()) for e in b.entries]
  keys = ("programs_sha256", "ops_sha256", "batch_size", "backend")
  assert {k: a.fingerprint[k] for k in keys} == {k: b.fingerprint[k] for k in keys}
