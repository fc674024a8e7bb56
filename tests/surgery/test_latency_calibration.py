"""Latency calibration (issue 24): prune_to(latency_ratio=r) closes the loop on the
*measured* speed-up. The whole-network timer is injected here (a deterministic
function of the pruned network's widths that the per-op table under-counts: an
elementwise term per channel and a constant, as BN, activations and adds are), so
nothing is timed in these tests."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import graph, surgery
from jaxprune.errors import UserError
from jaxprune import latency
from jaxprune.surgery import targets

jax.config.update("jax_disable_most_optimizations", True)

HW = 8 * 8  # no strides: every conv's output is 8x8


class _Net(nn.Module):
  """Four prunable groups (a residual pair, a hidden width, two plain convs), BN."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    y = nn.relu(bn("b1")(nn.Conv(16, (3, 3), name="c1")(x)))
    y = y + nn.Conv(16, (3, 3), name="c2")(nn.relu(nn.Conv(12, (3, 3), name="c2a")(y)))
    y = nn.relu(nn.Conv(24, (3, 3), name="c3")(nn.relu(y)))
    y = nn.relu(bn("b4")(nn.Conv(20, (1, 1), name="c4")(y)))
    return nn.Dense(5, name="fc")(y.mean((1, 2)))


def _table_timer(a):
  """Per-op table times: ``a`` ms per million MACs of each timed program."""
  def timer(programs):
    return [a * 1e-6 * math.prod(p.x_shape[:-1]) * math.prod(p.w_shape) for p in programs]
  return timer


def _whole_ms(variables, a, e, c):
  """The fake whole network: the convs' and the dense's MACs at ``a`` ms per million
  (what the table sees), plus ``e`` ms per million output activations (BN, ReLU,
  adds: not in the table) and a constant ``c`` ms (dispatch)."""
  ms = c
  for layer in variables["params"].values():
    k = layer.get("kernel")
    if k is None:
      continue
    rows = HW if k.ndim == 4 else 1
    ms += a * 1e-6 * rows * k.size + e * 1e-6 * rows * k.shape[-1]
  return ms


def _setup(rng):
  model = _Net()
  variables = model.init(jax.random.key(int(rng.integers(1 << 30))), jnp.zeros((1, 8, 8, 3)))
  g = graph.trace(model, variables, (8, 8, 3))
  cands = targets.latency_candidates(g, [grp.id for grp in g.prunable()], 2, 8)
  a = float(rng.uniform(0.5, 2.0))
  table = latency.measure(cands, 1, timer=_table_timer(a), log=lambda _: None)
  return model, variables, table, a


def test_calibration_meets_the_measured_speedup_the_table_alone_misses(capsys):
  """Fresh random costs: the table's selection alone measures under the requested
  speed-up (the un-tabled elementwise and constant terms); calibrated, the measured
  speed-up (the injected timer's base / pruned, recomputed here from the pruned
  widths) meets it within the rounds, the table predicts more than is measured, and
  the network kept is the met try with the largest budget."""
  rng = np.random.default_rng()
  model, variables, table, a = _setup(rng)
  e, c = a * float(rng.uniform(3, 6)), table.full * float(rng.uniform(0.03, 0.08))
  ratio = float(rng.uniform(0.55, 0.7))
  timer = lambda small: (_whole_ms(variables, a, e, c), _whole_ms(small.variables, a, e, c))
  plain, _ = surgery.prune_to(model, variables, (8, 8, 3), latency_ratio=ratio,
                              latency_table=table, round_to=2, calibrate=False)
  assert _whole_ms(variables, a, e, c) / _whole_ms(plain.variables, a, e, c) < 1 / ratio
  small, info = surgery.prune_to(model, variables, (8, 8, 3), latency_ratio=ratio,
                                 latency_table=table, round_to=2, latency_timer=timer,
                                 calibration_rounds=6)
  measured = _whole_ms(variables, a, e, c) / _whole_ms(small.variables, a, e, c)
  cal = info["calibration"]
  assert cal["met"] and measured >= 1 / ratio, (ratio, cal)
  assert info["measured_speedup"] == pytest.approx(measured)
  assert info["measured_ms"]["pruned"] == pytest.approx(_whole_ms(small.variables, a, e, c))
  assert 2 <= cal["rounds"] == len(cal["tries"]) <= 6
  assert info["predicted_speedup"] > measured
  met = [t for t in cal["tries"] if t["measured_speedup"] >= 1 / ratio]
  assert cal["budget"] == max(t["budget"] for t in met)
  assert cal["tries"][0]["budget"] == pytest.approx(ratio)
  assert "calibration round 1" in capsys.readouterr().out


def test_calibrate_budget_on_a_monotone_latency_curve():
  """The loop alone, on a fresh random curve measured(b) = p + q * b over discrete
  selections (budgets rounded to 1/40): within 4 timings it returns a budget that
  meets ``ratio`` and is not more than 15% (OVERSHOOT) faster than asked when a
  slower one was tried; the first try is ``ratio`` and no selection is timed twice."""
  rng = np.random.default_rng()
  for _ in range(200):
    p = float(rng.uniform(0.02, 0.15))
    q = 1 - p
    ratio = float(rng.uniform(0.4, 0.8))
    timed = []
    select = lambda b: round(b * 40)
    def measure(sel):
      timed.append(sel)
      return p + q * sel / 40
    i, tries = targets.calibrate_budget(ratio, 1 / 40, select, measure, 4)
    assert tries[0]["budget"] == ratio and len(set(timed)) == len(timed) <= 4
    assert tries[i]["measured"] <= ratio, (p, ratio, tries)
    assert tries[i]["measured"] * targets.OVERSHOOT >= ratio or len(tries) == 4


def test_an_unreachable_measured_target_keeps_the_fastest_and_says_so(capsys):
  """A constant the table cannot prune away (half the base): 4x is out of reach; the
  fastest try is kept, ``met`` is False and one line says what was reached."""
  rng = np.random.default_rng()
  model, variables, table, a = _setup(rng)
  c = 3 * table.full
  timer = lambda small: (_whole_ms(variables, a, 0.0, c), _whole_ms(small.variables, a, 0.0, c))
  small, info = surgery.prune_to(model, variables, (8, 8, 3), latency_ratio=0.25,
                                 latency_table=table, round_to=2, latency_timer=timer)
  cal = info["calibration"]
  assert not cal["met"] and cal["rounds"] <= targets.CALIBRATION_ROUNDS
  assert info["measured_speedup"] == max(t["measured_speedup"] for t in cal["tries"])
  assert info["measured_speedup"] < 4
  assert info["measured_speedup"] == pytest.approx(
      _whole_ms(variables, a, 0.0, c) / _whole_ms(small.variables, a, 0.0, c))
  out = capsys.readouterr().out
  assert "calibration: reached" in out and "requested 4.00x" in out


def test_calibration_arguments_are_checked_in_one_line():
  model = _Net()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(UserError, match="calibrate="):
    surgery.prune_to(model, variables, (8, 8, 3), latency_ratio=0.5, calibrate="yes")
  with pytest.raises(UserError, match="calibration_rounds="):
    surgery.prune_to(model, variables, (8, 8, 3), latency_ratio=0.5, calibration_rounds=0)
  with pytest.raises(UserError, match="latency_timer is for latency_ratio"):
    surgery.prune_to(model, variables, (8, 8, 3), flops_ratio=0.5,
                     latency_timer=lambda s: (1.0, 1.0))
  table = _setup(np.random.default_rng(0))[2]
  with pytest.raises(UserError, match="two positive times"):
    surgery.prune_to(model, variables, (8, 8, 3), latency_ratio=0.5, latency_table=table,
                     round_to=2, latency_timer=lambda s: (1.0, float("nan")))


def test_bad_calibration_rounds_of_the_recipe_are_one_line_errors(tmp_path):
  """``prune.calibrate`` / ``calibration_rounds`` exist (True, >= 1) in the prune
  config (ConfigDict's types refuse a non-bool calibrate); 0 rounds stops the run
  before any work."""
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from jaxprune import methods  # pylint: disable=g-import-not-at-top
  config = load_config("configs/prune_resnet.py", "smoke,target=latency")
  assert config.prune.calibrate is True and config.prune.calibration_rounds >= 1
  config.prune.calibration_rounds = 0
  with pytest.raises(UserError, match="prune.calibration_rounds=0"):
    methods.run(config, str(tmp_path))
  assert not (tmp_path / "config.json").exists()
