"""prune_to's default round_to (issue 24 item 4): None is the backend's
(``runtime.default_round_to``); under a FLOPs target a group not wider than it stays
whole while the target is reachable so, else it is pruned at a finer multiple
(``targets.default_steps``, ``targets.fitted_round_to``); an int is kept as given. No
timing here (latency tables come from an injected timer)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import graph, surgery
from jaxprune.engine import runtime
from jaxprune.errors import UserError
from jaxprune import latency
from jaxprune.surgery import targets

jax.config.update("jax_disable_most_optimizations", True)


class _Net(nn.Module):
  """Three prunable groups of the given widths (one narrower than 8), then a head."""
  widths: tuple = (6, 24, 16)

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, w in enumerate(self.widths):
      x = nn.relu(nn.Conv(w, (3, 3), name=f"c{i}")(x))
    return nn.Dense(3, name="fc")(x.mean((1, 2)))


def _net(rng, widths):
  model = _Net(tuple(widths))
  variables = model.init(jax.random.key(int(rng.integers(1 << 30))), jnp.zeros((1, 8, 8, 3)))
  return model, variables


def test_fitted_round_to_is_the_largest_halving_below_the_width():
  """Against the definition, on random widths and multiples (not only powers of 2)."""
  rng = np.random.default_rng()
  for _ in range(300):
    width, round_to = int(rng.integers(1, 70)), int(rng.integers(1, 40))
    halvings = {round_to // 2 ** k for k in range(8)} | {1}
    below = [r for r in halvings if 1 <= r < width]
    assert targets.fitted_round_to(width, round_to) == (max(below) if below else 1)
    # It leaves the group a narrower allowed width whenever the group has one at all.
    allowed = targets.allowed_widths(width, targets.fitted_round_to(width, round_to))
    assert (allowed.size >= 2) == (width >= 2)


@pytest.mark.parametrize("default", [8, 4])
def test_prune_to_defaults_to_the_backend_round_to_fitted_to_narrow_groups(
    monkeypatch, default):
  """round_to=None: the backend's multiple (patched to 4 too: it is read, not assumed);
  wide groups keep multiples of it, a group not wider than it stays whole while the
  target is reachable so (``info["narrow_whole"]``), else it is kept at a multiple of its
  fitted one (``info["fitted_round_to"]``); an explicit round_to keeps the narrow group
  whole, so a target only reachable by narrowing it is refused (one line)."""
  monkeypatch.setitem(runtime.ROUND_TO, jax.default_backend(), default)
  rng = np.random.default_rng()
  # (not 3, the kernel size: a 3-wide group also takes the consumer's 3x3 kernel axes, a
  # graph defect outside this test's subject)
  widths = (int(rng.integers(4, default + 1)), 8 * int(rng.integers(2, 5)),
            8 * int(rng.integers(2, 5)))
  model, variables = _net(rng, widths)
  g = graph.trace(model, variables, (8, 8, 3))
  # Reachable with the narrow group whole too (the explicit round_to below): its smallest
  # network is up to 0.375 of the FLOPs (a ratio under it was refused 1 run in 25).
  lowest = g.predict({grp.id: np.arange(grp.width if grp.width == widths[0] else default)
                      for grp in g.prunable()})["flops"] / g.predict({})["flops"]
  ratio = float(rng.uniform(max(0.25, lowest + 0.02), max(0.45, lowest + 0.1)))
  small, info = surgery.prune_to(model, variables, (8, 8, 3), flops_ratio=ratio)
  assert info["round_to"] == default == runtime.default_round_to()
  g = info["graph"]
  (narrow,) = [grp.id for grp in g.prunable() if grp.width == widths[0]]
  fitted = targets.fitted_round_to(widths[0], default)
  assert info["fitted_round_to"] == {} and info["narrow_whole"] == [narrow]
  assert info["keep"][narrow].size == widths[0]
  for gid, kept in info["keep"].items():
    assert kept.size == g.groups[gid].width or kept.size % default == 0
  assert info["after"]["flops"] <= ratio * info["before"]["flops"]
  assert info["after"] == graph.trace(small.model, small.variables, (8, 8, 3)).predict({})
  _, given = surgery.prune_to(model, variables, (8, 8, 3), flops_ratio=ratio,
                              round_to=default)
  assert given["round_to"] == default and given["fitted_round_to"] == {}
  assert given["keep"][narrow].size == widths[0]
  # A target between the smallest network with the narrow group whole and the smallest
  # with it at its fitted multiple: only the default reaches it, by narrowing that group.
  smallest = {grp.id: np.arange(targets.fitted_round_to(grp.width, default))
              for grp in g.prunable()}
  full = g.predict({})["flops"]
  low = g.predict(smallest)["flops"] / full
  high = g.predict({**smallest, narrow: np.arange(widths[0])})["flops"] / full
  between = float(rng.uniform(low + 0.1 * (high - low), high - 0.1 * (high - low)))
  _, tight = surgery.prune_to(model, variables, (8, 8, 3), flops_ratio=between)
  assert tight["keep"][narrow].size < widths[0] and tight["narrow_whole"] == []
  assert fitted < default and tight["fitted_round_to"] == {narrow: fitted}
  assert tight["keep"][narrow].size % fitted == 0
  assert tight["after"]["flops"] <= between * full
  with pytest.raises(UserError, match=f"cannot reach flops_ratio.*round_to={default}\\)"):
    surgery.prune_to(model, variables, (8, 8, 3), flops_ratio=between, round_to=default)
  # Under the smallest the default allows: one line that names the default and the way
  # out (round_to=1 reaches it).
  under = 0.9 * low
  with pytest.raises(UserError, match=f"round_to={default}, the backend's default.*"
                     "round_to=1 allows any width"):
    surgery.prune_to(model, variables, (8, 8, 3), flops_ratio=under)
  _, fine = surgery.prune_to(model, variables, (8, 8, 3), flops_ratio=under, round_to=1)
  assert fine["after"]["flops"] <= under * full


def test_default_steps_keep_narrow_groups_whole_while_reachable():
  """Against the rule written out on random nets and ratios: whole when some group is
  wider and the smallest network with the narrow groups whole meets the ratio (checked
  by counting it), else the fitted multiples; latency targets always the fitted ones."""
  rng = np.random.default_rng()
  for _ in range(6):
    default = int(rng.choice([4, 8, 16]))
    widths = [int(rng.integers(2, 2 * default + 1)) for _ in range(3)]
    widths = [w if w != 3 else 4 for w in widths]  # (3: the kernel-size defect above)
    model, variables = _net(rng, widths)
    g = graph.trace(model, variables, (8, 8, 3))
    gids = [grp.id for grp in g.prunable()]
    fitted = {gid: targets.fitted_round_to(g.groups[gid].width, default) for gid in gids}
    whole = {gid: (g.groups[gid].width if g.groups[gid].width <= default else default)
             for gid in gids}
    full = g.predict({})["flops"]
    low = g.predict({gid: np.arange(min(s, g.groups[gid].width))
                     for gid, s in whole.items()})["flops"] / full
    for ratio in (float(rng.uniform(0.05, 1.0)), min(1.0, low + 1e-3), 0.99 * low):
      got = targets.default_steps(g, gids, default, "flops", ratio)
      wider = any(g.groups[gid].width > default for gid in gids)
      assert got == (whole if wider and low <= ratio else fitted), (widths, default, ratio)
      assert targets.default_steps(g, gids, default, "latency", ratio) == fitted


def test_latency_candidates_of_the_default_round_to_are_fitted():
  """The latency table's candidates follow the same per-group multiples, and prune_to's
  default accepts such a table (an injected one: no timing)."""
  rng = np.random.default_rng()
  model, variables = _net(rng, (int(rng.integers(4, 9)), 32, 24))
  g = graph.trace(model, variables, (8, 8, 3))
  gids = [grp.id for grp in g.prunable()]
  r = runtime.default_round_to()
  cands = targets.latency_candidates(g, gids, r, 8, fit_round_to=True)
  for grp, c in zip(cands.groups, cands.candidates):
    width = grp.width
    assert c == targets.latency_grid(width, targets.fitted_round_to(width, r), 8)
    assert len(c) >= 2
  a = rng.uniform(0.5, 2)
  timer = lambda programs: [a * 1e-4 * math.prod(p.x_shape) * p.w_shape[-1] + 0.01
                            for p in programs]
  table = latency.measure(cands, 1, timer=timer, log=lambda _: None)
  ratio = float(rng.uniform(0.5, 0.8))
  _, info = surgery.prune_to(model, variables, (8, 8, 3), latency_ratio=ratio,
                             latency_table=table, calibrate=False)
  assert info["round_to"] == r
  for gid, kept in info["keep"].items():
    assert kept.size in table.candidates[table.group_ids.index(gid)]
  assert 1 / info["predicted_speedup"] <= ratio * (1 + 1e-9)
