"""FLOPs and params targets with round_to (issue 24 item 2): kept widths are allowed
widths (multiples of round_to, or the whole group) chosen per group, and the network
lands at or below the target and within 2% of the full network under it (or, on a
model too small for that, as close as any combination of allowed widths gets)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo_models
from conftest import sweep
from jaxprune import flops, graph, models, surgery
from jaxprune.errors import UserError
from jaxprune.surgery import targets

jax.config.update("jax_disable_most_optimizations", True)


def _graph(name, round_to, built=None):
  if name == "resnet20":
    model = models.cifar_resnet(20, 10)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                  train=False))
    return graph.trace(model, variables, (32, 32, 3), round_to=round_to)
  zm = zoo_models.BY_NAME[name]
  model, variables = built or zm.build(0)
  shape, call = zm.single(model)
  return graph.trace(model, variables, shape, call, round_to=round_to)


def _rebuilt_counts(name, built, g, keep):
  """FLOPs and params of the zoo model `built` pruned to `keep` (rebuilt, then counted)."""
  zm = zoo_models.BY_NAME[name]
  model, variables = built
  shape, call = zm.single(model)
  small = surgery.prune(model, variables, shape, keep, call=call, graph=g,
                        overrides=zoo_models.overrides_for(name, g, keep))
  shape, call = zm.single(small.model)
  counted = flops.count(small.model, small.variables, shape, call=call)
  assert zoo_models.param_entries(small.model, small.variables) == counted["params"]
  return counted


def _apart(g, keep) -> int:
  """How many different (width, kept width) pairs the groups have."""
  return len({(grp.width, len(keep.get(grp.id, range(grp.width)))) for grp in g.prunable()})


def _best_reachable(g, round_to, metric, ratio, limit=4096):
  """Brute force: the largest ``metric`` fraction at most ``ratio`` that any combination
  of allowed widths gives (a model with more than ``limit`` combinations fails: it has
  widths enough to land within 2%)."""
  groups = g.prunable()
  allowed = [targets.allowed_widths(grp.width, round_to) for grp in groups]
  assert np.prod([a.size for a in allowed]) <= limit, "more than 2% under on a large model"
  full = g.predict({})[metric]
  return max(r for r in (
      g.predict({grp.id: np.arange(n) for grp, n in zip(groups, combo)})[metric] / full
      for combo in itertools.product(*allowed)) if r <= ratio + 1e-12)


def _check_widths(g, keep, round_to):
  for gid, kept in keep.items():
    width = g.groups[gid].width
    assert kept.size == width or (kept.size % round_to == 0 and kept.size > 0)


def test_allowed_widths_and_latency_grid_are_multiples_of_round_to():
  assert targets.allowed_widths(20, 8).tolist() == [8, 16, 20]
  assert targets.allowed_widths(6, 8).tolist() == [6]
  assert targets.allowed_widths(5, 1).tolist() == [1, 2, 3, 4, 5]
  assert targets.latency_grid(64, 1, 8) == (8, 16, 24, 32, 40, 48, 56, 64)
  assert targets.latency_grid(16, 8, 8) == (8, 16)
  assert targets.latency_grid(20, 1, 16) == tuple(sorted({round(20 * i / 16 + 1e-9)
                                                          for i in range(1, 17)}))


# The transformer zoo at round_to 2 or 4 and ResNet-20 at round_to 8 (the case):
# 800 random draws of (model, round_to, metric, ranking, ratio in [0.4, 0.8], scores):
# none more than 2% under (the adjust step stops once within 2%; largest 0.0191); later a
# CI run drew vit_scan (256 width combinations) at params 0.781, where the closest
# combination gives 0.761: on such a model the check is against the brute-force best.
# One of each zoo model's four selections is rebuilt and counted: the selection narrows
# groups apart (vit_map's residual group 0 without the MAP head's group 9 once failed
# the rebuild; tests/graph/test_zoo_transformers.py pins that case).
@pytest.mark.parametrize("name,round_to", sweep(
    [("vit_scan", 4), ("vit_map", 4), ("bert", 2), ("gpt", 4), ("lm1b", 4), ("llama", 2),
     ("resnet20", 8)], {"vit_scan", "gpt", "lm1b", "llama", "resnet20"}))
def test_targets_with_round_to_land_within_two_percent_on_the_zoo(name, round_to):
  built = zoo_models.BY_NAME[name].build(0) if name != "resnet20" else None
  g = _graph(name, round_to, built)
  rng = np.random.default_rng()
  full = g.predict({})
  smallest = g.predict({grp.id: np.arange(targets.allowed_widths(grp.width, round_to)[0])
                        for grp in g.prunable()})  # lm1b's params: 0.437 of the full
  keeps = []
  for metric, global_ranking in itertools.product(("flops", "params"), (False, True)):
    ratio = float(rng.uniform(max(0.4, smallest[metric] / full[metric] + 0.01), 0.8))
    scores = {grp.id: rng.random(grp.width) for grp in g.prunable()}
    keep = surgery.select_channels(g, scores, global_ranking=global_ranking,
                                   **{f"{metric}_ratio": ratio})
    got = g.predict(keep)[metric] / full[metric]
    assert got <= ratio + 1e-12, (metric, global_ranking, ratio, got)
    if ratio - got > 0.02:  # only where no combination of allowed widths is closer
      best = _best_reachable(g, round_to, metric, ratio)
      assert got >= best - 1e-12, (metric, global_ranking, ratio, got, best)
    _check_widths(g, keep, round_to)
    for gid, kept in keep.items():  # the best-scored channels of each group
      n = kept.size
      assert set(kept.tolist()) == set(np.argsort(-scores[gid], kind="stable")[:n].tolist())
    keeps.append(keep)
  if built is not None:  # resnet20: shapes only, not rebuilt
    # The selection whose groups of one width keep the most different widths (where a
    # layer that sizes itself from another group shows) is rebuilt and counted.
    keep = max(keeps, key=lambda k: _apart(g, k))
    assert _rebuilt_counts(name, built, g, keep) == g.predict(keep)


@pytest.mark.parametrize("name", ["branch_resnet", "pmap_resnet", "stdconv"])
def test_small_models_get_as_close_as_any_allowed_widths(name):
  """Brute force over every combination of allowed widths: the pruner is within 2% of
  the target or at least as close as the best combination under it."""
  rng = np.random.default_rng()
  round_to = int(rng.choice([2, 4, 8]))
  g = _graph(name, round_to)
  groups = g.prunable()
  allowed = [targets.allowed_widths(grp.width, round_to) for grp in groups]
  full = g.predict({})
  for metric in ("flops", "params"):
    reachable = sorted(
        g.predict({grp.id: np.arange(n) for grp, n in zip(groups, combo)})[metric] / full[metric]
        for combo in itertools.product(*allowed))
    for global_ranking in (False, True):
      ratio = float(rng.uniform(max(0.3, reachable[0]), 0.9))
      scores = {grp.id: rng.random(grp.width) for grp in groups}
      keep = surgery.select_channels(g, scores, global_ranking=global_ranking,
                                     **{f"{metric}_ratio": ratio})
      got = g.predict(keep)[metric] / full[metric]
      best = max(r for r in reachable if r <= ratio + 1e-12)
      assert got <= ratio + 1e-12
      assert got >= min(ratio - 0.02, best) - 1e-12, (round_to, metric, ratio, got, best)
      _check_widths(g, keep, round_to)


def test_round_to_beyond_reach_and_bad_round_to_are_one_line_errors():
  g = _graph("pmap_resnet", 8)
  scores = {grp.id: np.ones(grp.width) for grp in g.prunable()}
  with pytest.raises(UserError, match="cannot reach flops_ratio=0.05"):
    surgery.select_channels(g, scores, flops_ratio=0.05)
  with pytest.raises(UserError, match="exactly one target"):
    surgery.select_channels(g, scores, flops_ratio=0.5, latency_ratio=0.5)
  with pytest.raises(UserError, match="latency_table"):
    surgery.select_channels(g, scores, latency_ratio=0.5)
  with pytest.raises(UserError, match="round_to"):
    surgery.select_channels(g, scores, flops_ratio=0.5, round_to=2.5)
