"""Compensated head dimension (issue 22): attention's ``1/sqrt(head_dim)`` scale, computed
from the contracted width, is folded into the query projection when the head dimension is
narrowed, so the pruned network gives the masked original's logits to float32 rounding.

"Masked" is the original with every parameter slice of the removed channels set to zero
(it still scales by ``1/sqrt(n0)``); the pruned network computes with ``n1`` channels and
``1/sqrt(n1)``, and the fold multiplies the query kernel and bias by ``sqrt(n1 / n0)``.
"""
import math

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import masking
from jaxprune import graph, surgery
from jaxprune.graph.tracing import leaf_name

D, T, HEADS = 16, 5, 2


def run(model, variables, x):
  if variables is None:
    return np.asarray(model(x), np.float64)
  return np.asarray(model.apply(variables, x), np.float64)


class LinenAttention(nn.Module):
  """Self-attention (Flax's, 1/sqrt(head_dim) from the query's shape) and a head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(x)
    return nn.Dense(3, name="head")(x.mean(1))


class NNXAttention(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(4, D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
    self.head = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    x = x + self.attn(x)
    return self.head(x.mean(1))


class TanhQuery(nn.Module):
  """A hand-written attention whose query (and with `both`, key) passes a tanh before
  q.k: the scale is folded into the key, or (both) there is no linear producer."""
  both: bool = False

  @nn.compact
  def __call__(self, x):
    q = jnp.tanh(nn.DenseGeneral((HEADS, D // HEADS), name="query")(x))
    k = nn.DenseGeneral((HEADS, D // HEADS), name="key")(x)
    k = jnp.tanh(k) if self.both else k
    v = nn.DenseGeneral((HEADS, D // HEADS), name="value")(x)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)
    o = nn.DenseGeneral(D, axis=(-2, -1), name="out")(o)
    return nn.Dense(3, name="head")((x + o).mean(1))


class ConfiguredScale(nnx.Module):
  """A user attention dividing by sqrt of its configured head_dim (an int attribute the
  pruned module keeps): the scale does not change, so nothing is folded."""

  def __init__(self, rngs):
    self.head_dim = D // HEADS
    self.q = nnx.LinearGeneral(4, (HEADS, self.head_dim), rngs=rngs)
    self.k = nnx.LinearGeneral(4, (HEADS, self.head_dim), rngs=rngs)
    self.v = nnx.LinearGeneral(4, (HEADS, self.head_dim), rngs=rngs)
    self.o = nnx.LinearGeneral((HEADS, self.head_dim), 3, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    q, k, v = self.q(x), self.k(x), self.v(x)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
    return self.o(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)).mean(1)


class JaxAttention(nnx.Module):
  """``jax.nn.dot_product_attention`` (its default scale 1/sqrt of the query's last axis)
  on NNX projections; it needs the value's head_dim equal to the query's, which the graph
  ties by the attention pattern (tests/graph/test_attention_ties.py)."""

  def __init__(self, rngs):
    self.query = nnx.LinearGeneral(4, (HEADS, D // HEADS), rngs=rngs)
    self.key = nnx.LinearGeneral(4, (HEADS, D // HEADS), rngs=rngs)
    self.value = nnx.LinearGeneral(4, (HEADS, D // HEADS), rngs=rngs)
    self.out = nnx.LinearGeneral((HEADS, D // HEADS), 3, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    o = jax.nn.dot_product_attention(self.query(x), self.key(x), self.value(x))
    return self.out(o).mean(1)


def _head_dim(g):
  """The head dimension group of the query/key contraction."""
  (hd,) = [grp for grp in g.groups if grp.kind == "head_dim"
           and any(m.path.endswith(("query/kernel", "q/kernel")) for m in grp.members)]
  return hd


def _pruned_vs_masked(model, variables, x, seed):
  """(group, max |pruned - masked| / max |masked|, pruned) for removing a random nonempty
  proper subset of the head dimension's channels."""
  g = graph.trace(model, variables, x.shape[1:])
  hd = _head_dim(g)
  rng = np.random.default_rng(seed)
  gone = rng.choice(hd.width, int(rng.integers(1, hd.width)), replace=False)
  kept = np.setdiff1d(np.arange(hd.width), gone)
  small = surgery.prune(model, variables, x.shape[1:], {hd.id: kept}, graph=g)
  ref = run(*masking.masked(model, variables, g, {hd.id: kept}), x)
  got = run(small.model, small.variables, x)
  assert got.shape == ref.shape
  return hd, float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))), small, kept


@pytest.mark.parametrize("seed", [0, 1])
def test_linen_attention_head_dim_is_compensated_and_equals_the_masked_original(seed):
  model = LinenAttention()
  x = jax.random.normal(jax.random.key(10 + seed), (2, T, 4))
  v = model.init(jax.random.key(seed), x)
  hd, diff, small, kept = _pruned_vs_masked(model, v, x, seed)
  assert hd.prunable and hd.exactness == "compensated", str(hd)
  (line,) = hd.effects
  assert "8^-0.5 computed from the contracted width" in line and "attn" in line
  assert "folded into params/attn/query/kernel and params/attn/query/bias" in line
  assert f"compensated: {line}" in str(hd)
  # float32 rounding of a network with logits of order 1 (the unfolded gap is ~1e-2)
  assert diff < 1e-5, diff
  factor = math.sqrt(kept.size / hd.width)  # s(n0) / s(n1) with s(n) = n^-0.5
  assert small.folded == pytest.approx({"params/attn/query/kernel": factor,
                                        "params/attn/query/bias": factor})
  assert small.approximate == {}


@pytest.mark.parametrize("seed", [0, 1])
def test_nnx_attention_head_dim_is_compensated_and_equals_the_masked_original(seed):
  model = NNXAttention(nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(20 + seed), (2, T, 4))
  hd, diff, small, kept = _pruned_vs_masked(model, None, x, seed)
  assert hd.exactness == "compensated", str(hd)
  assert "folded into attn/query/kernel and attn/query/bias" in hd.effects[0]
  assert diff < 1e-5, diff
  assert small.model.attn.head_dim == kept.size
  assert small.folded["attn/query/kernel"] == pytest.approx(math.sqrt(kept.size / hd.width))
  # The original module is untouched by the fold.
  assert np.asarray(model.attn.query.kernel[...]).shape[-1] == hd.width


def test_jax_nn_dot_product_attention_head_dim_is_compensated():
  model = JaxAttention(nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(11), (2, T, 4))
  hd, diff, small, kept = _pruned_vs_masked(model, None, x, 2)
  assert hd.exactness == "compensated"
  assert "folded into query/kernel and query/bias" in hd.effects[0]
  assert diff < 1e-5, diff
  assert small.folded["query/bias"] == pytest.approx(math.sqrt(kept.size / hd.width))


def test_unfolded_removal_would_differ_so_the_fold_is_what_makes_it_exact():
  """Undoing the fold gives the plain pruned network: it differs from the masked one."""
  model = LinenAttention()
  x = jax.random.normal(jax.random.key(3), (2, T, 4))
  v = model.init(jax.random.key(4), x)
  hd, diff, small, kept = _pruned_vs_masked(model, v, x, 5)
  unfolded = jax.tree_util.tree_map_with_path(
      lambda p, l: l / small.folded.get(leaf_name(p), 1.0), small.variables)
  g = graph.trace(model, v, x.shape[1:])
  ref = run(*masking.masked(model, v, g, {hd.id: kept}), x)
  off = np.max(np.abs(run(small.model, unfolded, x) - ref)) / np.max(np.abs(ref))
  assert diff < 1e-5 < 1e-3 < off, (diff, off)


def test_prune_to_exact_only_narrows_the_compensated_head_dim():
  model = LinenAttention()
  x = jax.random.normal(jax.random.key(5), (2, T, 4))
  v = model.init(jax.random.key(6), x)
  small, info = surgery.prune_to(model, v, x.shape[1:], flops_ratio=0.7, exact_only=True,
                                 round_to=1)
  hd = _head_dim(info["graph"])
  assert hd in info["graph"].prunable(exact_only=True)
  assert info["keep"][hd.id].size < hd.width
  assert small.variables["params"]["attn"]["query"]["kernel"].shape[-1] == info["keep"][hd.id].size
  assert info["approximate"] == {} and small.folded


def test_a_query_through_tanh_folds_into_the_key():
  model = TanhQuery()
  x = jax.random.normal(jax.random.key(7), (2, T, D))
  v = model.init(jax.random.key(8), x)
  hd, diff, small, kept = _pruned_vs_masked(model, v, x, 3)
  assert hd.exactness == "compensated", str(hd)
  assert "folded into params/key/kernel and params/key/bias" in hd.effects[0]
  assert set(small.folded) == {"params/key/kernel", "params/key/bias"} and diff < 1e-5


def test_query_and_key_through_tanh_stay_approximate_with_the_reason():
  model = TanhQuery(both=True)
  x = jax.random.normal(jax.random.key(7), (2, T, D))
  v = model.init(jax.random.key(8), x)
  g = graph.trace(model, v, x.shape[1:])
  hd = _head_dim(g)
  assert hd.exactness == "approximate" and hd not in g.prunable(exact_only=True)
  (line,) = hd.effects
  assert "not folded: 'tanh' between the projection and the product" in line, line
  _, diff, small, _ = _pruned_vs_masked(model, v, x, 0)
  assert small.folded == {} and diff > 1e-3


def test_a_configured_scale_is_not_folded_and_the_removal_is_exact():
  """The scale is a literal of the configured head_dim, which the pruned module keeps: the
  pruned network's scale is the original's, so the fold is 1 and nothing is changed."""
  model = ConfiguredScale(nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(9), (2, T, 4))
  hd, diff, small, _ = _pruned_vs_masked(model, None, x, 1)
  assert hd.exactness == "compensated" and small.folded == {}
  assert diff < 1e-5, diff


@pytest.mark.parametrize("name", ["vit_map", "vit_scan", "bert", "gpt", "lm1b"])
def test_zoo_transformers_report_their_head_dims_compensated(name):
  """The zoo's Flax attention blocks (tests/zoo_models.py), traced with their own inputs
  (token ids, masks): every block's head dimension is compensated, folded into its own
  query; the MAP head's query reads a learned probe, not an activation, so it is not."""
  import zoo_models  # pylint: disable=g-import-not-at-top
  spec = zoo_models.BY_NAME[name]
  model, variables = spec.build(0)
  g = graph.trace(model, variables, spec.inputs, spec.call(model))
  head_dims = [grp for grp in g.groups if grp.kind == "head_dim"]
  assert len(head_dims) >= 2 - (name == "vit_scan"), str(g)
  for grp in head_dims:
    if "/map/" in grp.members[0].path:
      assert grp.exactness == "approximate" and "not folded" in grp.effects[0], str(grp)
      continue
    assert grp.exactness == "compensated", str(grp)
    (line,) = grp.effects
    query = next(m.path for m in grp.members if m.path.endswith("query/kernel"))
    assert f"folded into {query} and {query[:-len('kernel')]}bias" in line, line


class ScaledBy(nn.Module):
  """Hand-written attention whose scores are scaled by `scale(d)` of the query's width d,
  computed in jnp (`traced`: from a literal d in the jaxpr) or in Python (one literal)."""
  kind: str = "python"

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((HEADS, D // HEADS), name="query")(x)
    k = nn.DenseGeneral((HEADS, D // HEADS), name="key")(x)
    v = nn.DenseGeneral((HEADS, D // HEADS), name="value")(x)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    d = q.shape[-1]
    if self.kind == "traced":  # 1 / (2 sqrt(d)) from jnp: `sqrt 8.0` in the jaxpr
      s = s / (2.0 * jnp.sqrt(jnp.float32(d)))
    elif self.kind == "python":  # 1 / (2 sqrt(d)) as one Python float
      s = s * (0.5 / math.sqrt(d))
    else:  # a temperature that does not depend on the width
      s = s * 0.3
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)
    return nn.Dense(3, name="head")((x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(o)).mean(1))


@pytest.mark.parametrize("kind,factor", [("traced", lambda r: math.sqrt(r)),
                                         ("python", lambda r: math.sqrt(r)),
                                         ("constant", lambda r: None)])
def test_any_literal_scale_of_the_scores_is_folded_by_its_measured_change(kind, factor):
  """Not a clean power of the width (1 / (2 sqrt(d))), computed in jnp or in Python, or a
  constant: s(n1) is read from the pruned network, so the fold is its change (none for
  the constant) and the pruned network equals the masked original in every case."""
  model = ScaledBy(kind)
  x = jax.random.normal(jax.random.key(12), (2, T, D))
  v = model.init(jax.random.key(13), x)
  hd, diff, small, kept = _pruned_vs_masked(model, v, x, 4)
  assert hd.exactness == "compensated", str(hd)
  want = factor(kept.size / hd.width)
  if want is None:
    assert small.folded == {}
  else:
    assert small.folded["params/query/kernel"] == pytest.approx(want)
  assert diff < 1e-5, diff


class LateScale(nn.Module):
  """The width's scale applied to the softmax's output instead of the scores."""

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((HEADS, D // HEADS), name="query")(x)
    k = nn.DenseGeneral((HEADS, D // HEADS), name="key")(x)
    v = nn.DenseGeneral((HEADS, D // HEADS), name="value")(x)
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k)) / math.sqrt(q.shape[-1])
    o = nn.DenseGeneral(D, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", p, v))
    return nn.Dense(3, name="head")((x + o).mean(1))


def test_a_scale_after_the_softmax_stays_approximate_with_the_reason():
  model = LateScale()
  x = jax.random.normal(jax.random.key(14), (2, T, D))
  v = model.init(jax.random.key(15), x)
  g = graph.trace(model, v, x.shape[1:])
  hd = _head_dim(g)
  assert hd.exactness == "approximate", str(hd)
  (line,) = hd.effects
  assert "after a non-linear op (softmax) (not folded" in line, line
  _, diff, small, _ = _pruned_vs_masked(model, v, x, 6)
  assert small.folded == {} and diff > 1e-3
