"""surgery.register_rule: a user's rule for a layer whose size the built-in rules cannot
know (its width lives in a config object, not an int attribute). Without the rule the
rebuild stops with its one-line error; with it the pruned network equals the masked
original (the removed channels' slices zero: exact, the activation is a ReLU)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import masking
from jaxprune import graph, surgery
from jaxprune.errors import UserError
from jaxprune.surgery import rules


@dataclasses.dataclass(frozen=True)
class Config:
  width: int
  act: str = "relu"


class Widen(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.cfg.width))
    return nn.relu(x @ w)


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(Widen(Config(16), name="up")(x))


class NNXWiden(nnx.Module):
  def __init__(self, din, cfg, rngs):
    self.cfg = cfg
    self.w = nnx.Param(jax.random.normal(rngs.params(), (din, cfg.width)) / din ** 0.5)

  def __call__(self, x):  # the configured width, as a head split reads it
    return jax.nn.relu((x @ self.w[...]).reshape(x.shape[:-1] + (self.cfg.width,)))


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.up = NNXWiden(5, Config(16), rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.up(x))


def _width_rule(layer, shape, inputs):
  del inputs
  return {"cfg": dataclasses.replace(layer.cfg, width=shape("w")[-1])}


def _hidden(g):
  (group,) = [grp for grp in g.prunable() if grp.width == 16]
  return group


@pytest.mark.parametrize("kind,seed", [("linen", 0), ("linen", 1), ("nnx", 2), ("nnx", 3)])
def test_a_registered_rule_rebuilds_a_user_layer_equal_to_the_masked_original(kind, seed):
  rng = np.random.default_rng(seed)
  if kind == "linen":
    model, cls = LinenNet(), Widen
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 5)))
    run = lambda m, v, x: m.apply(v, x)
  else:
    model, variables, cls = NNXNet(nnx.Rngs(seed)), None, NNXWiden
    run = lambda m, v, x: m(x)
  g = graph.trace(model, variables, (5,))
  group = _hidden(g)
  keep = {group.id: np.sort(rng.choice(16, int(rng.integers(4, 13)), replace=False))}
  with pytest.raises(UserError, match=r"^rebuild: layer 'up' \((Widen|NNXWiden)\)") as e:
    surgery.prune(model, variables, (5,), keep, graph=g)
  assert "\n" not in str(e.value)
  x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  m_model, m_vars = masking.masked(model, variables, g, keep)
  want = run(m_model, m_vars, x)
  try:  # (a Linen network is rebuilt each time it runs: the rule stays registered)
    surgery.register_rule(cls, _width_rule)
    small = surgery.prune(model, variables, (5,), keep, graph=g)
    got = run(small.model, small.variables, x)
  finally:
    del rules.RULES[cls]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert len(keep[group.id]) < 16 and not np.allclose(want, run(model, variables, x))
  up = small.model.up if kind == "nnx" else None
  if up is not None:
    assert up.cfg == Config(len(keep[group.id]))


def test_register_rule_as_a_decorator_and_the_nearest_registered_base_wins():
  class Base(nn.Module):
    pass

  class Child(Base):
    pass
  try:
    @surgery.register_rule(Base)
    def base_rule(layer, shape, inputs):
      return {}
    assert surgery.rule_for(Child(parent=None)) is base_rule
    assert surgery.rule_for(nn.Dense(3, parent=None)) is rules.RULES[nn.Dense]
    assert surgery.rule_for(nn.SelfAttention(num_heads=2, parent=None)) is rules.RULES[
        nn.MultiHeadDotProductAttention]
  finally:
    del rules.RULES[Base]


@pytest.mark.parametrize("args,match", [(("Dense", _width_rule), "must be a class"),
                                        ((Widen, 3), "must be a function")])
def test_register_rule_refuses_a_non_class_or_a_non_function_in_one_line(args, match):
  with pytest.raises(UserError, match=match):
    surgery.register_rule(*args)
  assert Widen not in rules.RULES
