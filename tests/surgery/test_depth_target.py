"""prune_to(depth=True) (issue 24): residual blocks removed under a latency target. The
block-and-channel selector against a brute-force reference on fresh random tables; the
network with blocks removed against a closed form (a block whose branch is zeroed adds
nothing: skipping it is the same function), Linen and NNX; the one-line refusals."""
import itertools
import math

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import latency, surgery
from jaxprune.errors import UserError
from jaxprune.surgery import targets
from latency_tables import entry_ms_slow
from jaxprune.surgery.remove import removable_blocks

jax.config.update("jax_disable_most_optimizations", True)

SHAPE = (6, 6, 3)


class _Block(nn.Module):
  """``x + conv_b(relu(conv_a(x)))``: its own module, hidden width ``hidden``."""
  width: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(self.hidden, (3, 3), name="conv_a")(x))
    return x + nn.Conv(self.width, (3, 3), name="conv_b")(h)


class _LinenNet(nn.Module):
  """A stem, three residual blocks (the first one stays: nothing before it is a block),
  a head."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    for i, hidden in enumerate((8, 6, 8)):
      x = _Block(8, hidden, name=f"block{i}")(x)
    return nn.Dense(3, name="head")(x.mean((1, 2)))


class _NNXBlock(nnx.Module):
  def __init__(self, width, hidden, *, rngs):
    self.conv_a = nnx.Conv(width, hidden, (3, 3), rngs=rngs)
    self.conv_b = nnx.Conv(hidden, width, (3, 3), rngs=rngs)

  def __call__(self, x):
    return x + self.conv_b(nnx.relu(self.conv_a(x)))


class _NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.blocks = nnx.List([_NNXBlock(8, h, rngs=rngs) for h in (8, 6, 8)])
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean((1, 2)))


def _linen(seed=0):
  model = _LinenNet()
  return model, model.init(jax.random.key(seed), jnp.zeros((1, *SHAPE)))


def _random_timer(rng):
  """A fresh random table: time ~ a * MACs^b per program plus a random offset each (the
  offset: a layer's fixed cost, what makes removing a block pay at batch 1)."""
  a, b = rng.uniform(0.5, 2), rng.uniform(0.6, 1.1)
  offset = rng.uniform(0, 0.3)

  def timer(programs):
    return [a * 1e-4 * (math.prod(p.x_shape) * p.w_shape[-1] * math.prod(p.w_shape[:-1])
                        / p.x_shape[-1]) ** b + offset * rng.uniform(0.5, 1.5)
            for p in programs]
  return timer


def test_removable_blocks_are_the_later_blocks_with_their_ops_and_hidden_groups():
  model, variables = _linen()
  from jaxprune import graph  # pylint: disable=g-import-not-at-top
  g = graph.trace(model, variables, SHAPE)
  scores = {grp.id: np.ones(grp.width) for grp in g.prunable()}
  found, excluded = removable_blocks(model, variables, SHAPE, None, g, scores)
  assert [b.prefix for b in found] == ["block1", "block2"] and not excluded
  for b in found:
    assert sorted(g.ops[i].kernel for i in b.ops) == [
        f"params/{b.prefix}/conv_a/kernel", f"params/{b.prefix}/conv_b/kernel"]
    hidden, = b.groups  # conv_a's outputs: the block's own group
    assert all(m.path.startswith(f"params/{b.prefix}/") for m in g.groups[hidden].members)


def test_block_and_channel_selector_against_brute_force_on_random_tables():
  """Greedy by importance per ms over channel steps and whole blocks, then local
  search, against every combination of widths and removed blocks: always within the
  budget; the reference is the most kept importance under it."""
  model, variables = _linen()
  from jaxprune import graph  # pylint: disable=g-import-not-at-top
  g = graph.trace(model, variables, SHAPE)
  gids = [grp.id for grp in g.prunable()]
  cands = targets.latency_candidates(g, gids, 1, 3)
  rng = np.random.default_rng()
  ratios = []
  while len(ratios) < 12:
    table = latency.measure(cands, 1, timer=_random_timer(rng), log=lambda _: None)
    scores = {gid: rng.exponential(size=g.groups[gid].width) for gid in gids}
    found, _ = removable_blocks(model, variables, SHAPE, None, g, scores)
    every = frozenset().union(*[b.ops for b in found])
    lowest = table.at([0] * len(table.candidates), every) / table.full
    ratio = float(rng.uniform(lowest, 1.0))
    keep, removed = targets.select_blocks_and_channels(
        g, scores, latency_ratio=ratio, latency_table=table, blocks=found)
    norm = {gid: np.sort(s / s.mean())[::-1] for gid, s in scores.items()}

    def value(counts, gone):
      frozen = set().union(*[b.groups for b in found if b.prefix in gone])
      return sum(norm[gid][:n].sum() for gid, n in counts.items() if gid not in frozen)

    def ms(picks, gone):
      skip = set().union(*[b.ops for b in found if b.prefix in gone])
      return sum(entry_ms_slow(e, picks) for e in table.entries if e.op not in skip)

    counts = {gid: kept.size for gid, kept in keep.items()}
    for gid, kept in keep.items():
      assert set(kept.tolist()) == set(np.argsort(-scores[gid])[:kept.size].tolist())
    assert ms(table.index(counts), set(removed)) <= ratio * table.full * (1 + 1e-9)
    fits = []
    for k in range(len(found) + 1):
      for gone in itertools.combinations([b.prefix for b in found], k):
        for combo in itertools.product(*[range(len(c)) for c in table.candidates]):
          t = ms(combo, set(gone))
          if t <= ratio * table.full:
            fits.append((t, value({gid: table.candidates[s][i] for s, (gid, i)
                                   in enumerate(zip(table.group_ids, combo))}, set(gone))))
    best = max(v for _, v in fits)
    got = value(counts, set(removed))
    assert got <= best + 1e-9
    ratios.append(got / best)
  # On 3,400 random instances (this test's generator): 81% optimal, mean 0.985 (sd 0.047)
  # of the reference's importance, the worst 0.62, 0.3% under 0.7: the mean of 12 falls
  # under 0.9 about 6 standard deviations away, and no instance came near 0.5.
  assert min(ratios) >= 0.5, ratios
  assert np.mean(ratios) >= 0.9, ratios


def _zeroed(variables, prefixes):
  """The variables with each block's last conv (kernel and bias) zeroed: its branch
  adds 0, so the network computes what it does with the block skipped."""
  params = jax.tree.map(lambda a: a, dict(variables["params"]))
  for p in prefixes:
    params[p] = {**params[p], "conv_b": jax.tree.map(jnp.zeros_like, params[p]["conv_b"])}
  return {**variables, "params": params}


def _table_for(model, variables, rng):
  from jaxprune import graph  # pylint: disable=g-import-not-at-top
  g = graph.trace(model, variables, SHAPE)
  cands = targets.latency_candidates(g, [grp.id for grp in g.prunable()], 1, 3)
  return latency.measure(cands, 1, timer=_random_timer(rng), log=lambda _: None)


def _ratio_needing_blocks(model, variables, table, rng):
  """A latency ratio that no channel selection reaches and blocks removed can, at most 1.

  "No channel selection": the fastest of all of the table's selections, by brute force (4
  groups of 3 candidates here). A random table is not monotone in width (its per-program
  offsets): judged by the narrowest network alone, 0.3% (NNX net) and 0.8% (Linen net) of
  runs asked for a ratio over 1, and some of the rest for one that a wider selection met
  without blocks (4 of 44 draws on the tables whose narrowest network was slower than the
  full one), both CI failures. Bounded so, 0 of 300 seeded tables per net failed the NNX and
  Linen tests' prune_to (blocks removed every time)."""
  from jaxprune import graph  # pylint: disable=g-import-not-at-top
  g = graph.trace(model, variables, SHAPE)
  scores = {grp.id: np.ones(grp.width) for grp in g.prunable()}
  found, _ = removable_blocks(model, variables, SHAPE, None, g, scores)
  every = frozenset().union(*[b.ops for b in found])
  lo = table.at([0] * len(table.candidates), every) / table.full  # the library's floor
  hi = min(table.at(list(p)) for p in itertools.product(
      *[range(len(c)) for c in table.candidates])) / table.full
  low, high = lo + 0.1 * (hi - lo), min(hi - 0.1 * (hi - lo), 1.0)
  assert low < high, (lo, hi)
  return float(rng.uniform(low, high))


def test_linen_blocks_removed_equal_the_pruned_network_with_their_branches_zeroed():
  model, variables = _linen(int(np.random.default_rng().integers(1 << 20)))
  rng = np.random.default_rng()
  table = _table_for(model, variables, rng)
  ratio = _ratio_needing_blocks(model, variables, table, rng)
  small, info = surgery.prune_to(model, variables, SHAPE, latency_ratio=ratio,
                                 latency_table=table, round_to=1, depth=True,
                                 calibrate=False)
  removed = info["removed_blocks"]
  assert removed and small.removed_blocks == tuple(removed)
  assert info["removable_blocks"] == ["block1", "block2"]
  # the reference: the same channels removed, the removed blocks' branches zeroed
  ref = surgery.prune(model, _zeroed(variables, removed), SHAPE, info["keep"])
  x = jax.random.normal(jax.random.key(int(rng.integers(1 << 20))), (4, *SHAPE))
  got = small.model.apply(small.variables, x)
  np.testing.assert_allclose(got, ref.model.apply(ref.variables, x), rtol=1e-5, atol=1e-5)
  assert all(p not in small.variables["params"] for p in removed)
  from jaxprune import flops  # pylint: disable=g-import-not-at-top
  assert info["after"]["flops"] == flops.count(small.model, small.variables, SHAPE)["flops"]
  assert info["after"]["flops"] < flops.count(ref.model, ref.variables, SHAPE)["flops"]


def test_nnx_blocks_removed_equal_the_pruned_network_with_their_branches_zeroed():
  seed = int(np.random.default_rng().integers(1 << 20))
  model = _NNXNet(nnx.Rngs(seed))
  rng = np.random.default_rng()
  from jaxprune import graph  # pylint: disable=g-import-not-at-top
  g = graph.trace(model, None, SHAPE)
  cands = targets.latency_candidates(g, [grp.id for grp in g.prunable()], 1, 3)
  table = latency.measure(cands, 1, timer=_random_timer(rng), log=lambda _: None)
  ratio = _ratio_needing_blocks(model, None, table, rng)
  small, info = surgery.prune_to(model, None, SHAPE, latency_ratio=ratio, latency_table=table,
                                 round_to=1, depth=True, calibrate=False)
  removed = info["removed_blocks"]
  assert removed and set(removed) <= {"blocks/1", "blocks/2"}
  assert isinstance(small.model, _NNXNet)
  zeroed = _NNXNet(nnx.Rngs(seed))
  for p in removed:
    conv = zeroed.blocks[int(p.split("/")[1])].conv_b
    conv.kernel[...] = jnp.zeros_like(conv.kernel[...])
    conv.bias[...] = jnp.zeros_like(conv.bias[...])
  ref = surgery.prune(zeroed, None, SHAPE, info["keep"])
  x = jax.random.normal(jax.random.key(int(rng.integers(1 << 20))), (4, *SHAPE))
  np.testing.assert_allclose(small.model(x), ref.model(x), rtol=1e-5, atol=1e-5)
  assert model.blocks[1].conv_a.kernel[...].shape[-1] == 6  # the user's model is untouched


def test_calibration_times_selections_with_blocks():
  """A stand-in timer (the pruned network's FLOPs fraction, deterministic): the
  calibration's chosen network is the one it timed, its blocks removed are reported.
  The ratio is one the random table reaches only with blocks removed (a fixed 0.5 was out
  of reach of some tables: the smallest network at 0.698 failed the tier once)."""
  model, variables = _linen()
  rng = np.random.default_rng()
  table = _table_for(model, variables, rng)
  ratio = _ratio_needing_blocks(model, variables, table, rng)
  small, info = surgery.prune_to(
      model, variables, SHAPE, latency_ratio=ratio, latency_table=table, round_to=1,
      depth=True, latency_timer=lambda s: (1.0, _measured(s)))
  cal = info["calibration"]
  assert 1 <= cal["rounds"] == len(cal["tries"])
  assert info["removed_blocks"] == list(small.removed_blocks)
  assert info["measured_speedup"] == pytest.approx(1.0 / _measured(small))
  assert cal["met"] == (_measured(small) <= ratio)


def _measured(small):
  """A deterministic stand-in for a timing: the pruned network's FLOPs fraction."""
  from jaxprune import flops  # pylint: disable=g-import-not-at-top
  model, variables = _linen()
  return (flops.count(small.model, small.variables, SHAPE)["flops"]
          / flops.count(model, variables, SHAPE)["flops"])


def test_depth_refusals_are_one_line():
  model, variables = _linen()
  with pytest.raises(UserError, match="give latency_ratio"):
    surgery.prune_to(model, variables, SHAPE, flops_ratio=0.5, depth=True)
  with pytest.raises(UserError, match="depth="):
    surgery.prune_to(model, variables, SHAPE, latency_ratio=0.5, depth="yes")
  with pytest.raises(UserError, match="call="):
    surgery.prune_to(model, variables, SHAPE, latency_ratio=0.5, depth=True,
                     call=lambda m, v, x: m.apply(v, x))
  table = _table_for(model, variables, np.random.default_rng())
  with pytest.raises(UserError, match="blocks removed"):
    surgery.prune_to(model, variables, SHAPE, latency_ratio=1e-3, latency_table=table,
                     round_to=1, depth=True, calibrate=False)
