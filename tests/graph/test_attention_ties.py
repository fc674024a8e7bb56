"""The value's head_dim joins the query's by the attention pattern, not by names (issue 22).

Attention modules have one head_dim for q, k and v (``jax.nn.dot_product_attention``
requires it). The graph finds the pattern in the jaxpr -- scores q.k, their softmax, the
product with v -- and puts the value's head_dim into the query/key head_dim group, with
projections named anything. Pruning that group then rebuilds (it stopped in one line
when the projections were not named query/value) and gives the masked original's
logits (the 1/sqrt(head_dim) scale is folded into the query). A value head_dim of
another size is a separate axis of the module and stays its own group.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import masking
from jaxprune import graph, surgery

TOL = dict(rtol=2e-5, atol=2e-5)
T, D, HEADS, HD = 5, 4, 2, 4


class LinenAttention(nn.Module):
  """Projections named wq/wk/wv/wo, ``jax.nn.dot_product_attention``."""

  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.DenseGeneral((HEADS, HD), name=n)(x) for n in ("wq", "wk", "wv"))
    o = jax.nn.dot_product_attention(q, k, v)
    return nn.Dense(3, name="head")(nn.DenseGeneral(D, axis=(-2, -1), name="wo")(o).mean(1))


class NNXAttention(nnx.Module):
  """Projections named to_q/to_k/to_v/proj, ``jax.nn.dot_product_attention``."""

  def __init__(self, rngs):
    self.to_q, self.to_k, self.to_v = (nnx.LinearGeneral(D, (HEADS, HD), rngs=rngs)
                                       for _ in range(3))
    self.proj = nnx.LinearGeneral((HEADS, HD), 3, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    o = jax.nn.dot_product_attention(self.to_q(x), self.to_k(x), self.to_v(x))
    return self.proj(o).mean(1)


class WideValue(nn.Module):
  """A hand-written attention whose value head_dim (6) is not the query's (4)."""

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((HEADS, HD), name="a")(x)
    k = nn.DenseGeneral((HEADS, HD), name="b")(x)
    v = nn.DenseGeneral((HEADS, 6), name="c")(x)
    s = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HD), -1)
    o = jnp.einsum("bhqk,bkhd->bqhd", s, v)
    return nn.DenseGeneral(3, axis=(-2, -1), name="d")(o).mean(1)


def _build(api, seed):
  x = jnp.zeros((1, T, D))
  if api == "linen":
    return LinenAttention(), LinenAttention().init(jax.random.key(seed), x)
  return NNXAttention(nnx.Rngs(seed)), None


def _apply(model, variables, x):
  return model(x) if variables is None else model.apply(variables, x)


def _group_of(g, path, axis):
  (grp,) = [grp for grp in g.groups
            if any(m.path == path and m.axis == axis for m in grp.members)]
  return grp


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_value_head_dim_is_tied_to_the_querys_by_structure_and_prunes_exactly(api):
  rng = np.random.default_rng()
  model, variables = _build(api, int(rng.integers(1 << 20)))
  g = graph.trace(model, variables, (T, D))
  pre = "params/" if api == "linen" else ""
  q, v = (f"{pre}{n}/kernel" for n in (("wq", "wv") if api == "linen" else ("to_q", "to_v")))
  hd = _group_of(g, q, 2)
  assert _group_of(g, v, 2) is hd and hd.kind == "head_dim" and hd.width == HD, str(g)
  assert hd.exactness == "compensated", str(hd)
  keep = {hd.id: np.sort(rng.choice(HD, int(rng.integers(1, HD)), replace=False))}
  masked_model, masked_vars = masking.masked(model, variables, g, keep)
  small = surgery.prune(masked_model, masked_vars, (T, D), keep, graph=g)
  assert small.folded and small.approximate == {}
  x = jnp.asarray(rng.normal(size=(2, T, D)), jnp.float32)
  want = _apply(masked_model, masked_vars, x)
  np.testing.assert_allclose(_apply(small.model, small.variables, x), want, **TOL)
  assert not np.allclose(_apply(model, variables, x), want, **TOL)  # the mask mattered


def test_a_value_head_dim_of_another_size_stays_its_own_group():
  rng = np.random.default_rng()
  model = WideValue()
  variables = model.init(jax.random.key(int(rng.integers(1 << 20))), jnp.zeros((1, T, D)))
  g = graph.trace(model, variables, (T, D))
  hd, vd = _group_of(g, "params/a/kernel", 2), _group_of(g, "params/c/kernel", 2)
  assert hd is not vd and vd.width == 6 and vd.prunable and vd.exactness == "exact", str(g)
  keep = {vd.id: np.sort(rng.choice(6, int(rng.integers(1, 6)), replace=False))}
  _, masked_vars = masking.masked(model, variables, g, keep)
  small = surgery.prune(model, masked_vars, (T, D), keep, graph=g)
  x = jnp.asarray(rng.normal(size=(2, T, D)), jnp.float32)
  np.testing.assert_allclose(small.model.apply(small.variables, x),
                             model.apply(masked_vars, x), **TOL)
