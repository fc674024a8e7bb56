"""``surgery.prune`` checks its result against the masked original (the original with the
removed channels' slices zero): user code that decides something from a width that no
parameter slice shows — a head count held in an int attribute with the head size
inferred, a channel shuffle, a scale taken from ``x.shape[-1]`` — used to give a different
network with every group reported exact. Now one line; with the attribute overridden (or
the group left whole) the network is the masked original's."""
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import masking
from jaxprune import graph, surgery
from jaxprune.errors import UserError

NOT_MASKED = "not the original with the removed channels zeroed"


def _seed():
  return int(np.random.default_rng().integers(1 << 30))


def _out(model, variables, x):
  return np.asarray(model(x) if variables is None else model.apply(variables, x), np.float64)


class HeadsAttr(nn.Module):
  """Self-attention whose head count is an int attribute; the head size is inferred."""
  num_heads: int = 4

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    q, k, v = (nn.Dense(32, name=n)(x).reshape(b, t, self.num_heads, -1) for n in "qkv")
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, -1)
    return nn.Dense(x.shape[-1], name="o")(o)


class HeadsNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(24, name="emb")(x)
    x = x + HeadsAttr(name="attn")(x)
    return nn.Dense(5, name="head")(x.mean(1))


class HeadsNNX(nnx.Module):
  def __init__(self, rngs, num_heads=4):
    self.num_heads = num_heads
    self.emb = nnx.Linear(10, 24, rngs=rngs)
    self.q, self.k, self.v = (nnx.Linear(24, 32, rngs=rngs) for _ in range(3))
    self.o = nnx.Linear(32, 24, rngs=rngs)
    self.head = nnx.Linear(24, 5, rngs=rngs)

  def __call__(self, x):
    x = self.emb(x)
    b, t, _ = x.shape
    q, k, v = (f(x).reshape(b, t, self.num_heads, -1) for f in (self.q, self.k, self.v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, -1)
    return self.head((x + self.o(o)).mean(1))


def _heads(g):
  return next(grp for grp in g.groups if grp.kind == "heads")


def test_head_count_in_an_int_attribute_is_refused_then_exact_with_the_override():
  model = HeadsNet()
  variables = model.init(jax.random.key(_seed()), jnp.zeros((1, 5, 10)))
  g = graph.trace(model, variables, (5, 10))
  keep = {_heads(g).id: np.sort(np.random.default_rng().choice(4, 2, replace=False))}
  with pytest.raises(UserError, match=f"{NOT_MASKED}.*heads, 4 -> 2.*equal to 4 is likely "
                     "the head count"):
    surgery.prune(model, variables, (5, 10), keep, graph=g)
  small = surgery.prune(model, variables, (5, 10), keep, graph=g,
                        overrides={"attn": {"num_heads": 2}})
  ref_model, ref_vars = masking.masked(model, variables, g, keep)
  x = jax.random.normal(jax.random.key(_seed()), (3, 5, 10))
  np.testing.assert_allclose(_out(small.model, small.variables, x),
                             _out(ref_model, ref_vars, x), rtol=1e-5, atol=1e-5)


def test_head_count_in_an_nnx_attribute_is_refused():
  model = HeadsNNX(nnx.Rngs(_seed()))
  g = graph.trace(model, None, (5, 10))
  with pytest.raises(UserError, match=f"{NOT_MASKED}.*heads, 4 -> 2"):
    surgery.prune(model, None, (5, 10), {_heads(g).id: [0, 2]}, graph=g)
  assert model.num_heads == 4 and model.q.kernel.shape == (24, 32)  # the original untouched


class Shuffle(nn.Module):
  """ShuffleNet's channel shuffle (2 groups) between two convs."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (1, 1), name="c1")(x))
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, 2, c // 2).transpose(0, 1, 2, 4, 3).reshape(b, h, w, c)
    x = nn.relu(nn.Conv(16, (3, 3), name="c2")(x))
    return nn.Dense(5, name="head")(x.mean((1, 2)))


class EmbedScale(nn.Module):
  """Gemma/T5-style ``embed * sqrt(d_model)``: a scale taken from the width."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(40, 32, name="embed")(ids)
    x = x * jnp.sqrt(x.shape[-1]).astype(x.dtype)
    x = x + nn.Dense(32, name="down")(nn.gelu(nn.Dense(48, name="up")(x)))
    return nn.Dense(5, name="head")(nn.tanh(x).mean(1))


class Readout(nn.Module):
  """A muP-style readout divided by the hidden width."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32, name="hidden")(x))
    return nn.Dense(5, name="head")(h) / h.shape[-1]


@pytest.mark.parametrize("model,shape", [
    (Shuffle(), (6, 6, 3)),
    (EmbedScale(), jax.ShapeDtypeStruct((6,), jnp.int32)),
    (Readout(), (10,)),
])
def test_width_dependent_user_code_is_refused_by_prune_to(model, shape):
  x = jnp.zeros((1, *shape.shape), shape.dtype) if hasattr(shape, "dtype") else jnp.zeros(
      (1, *shape))
  variables = model.init(jax.random.key(_seed()), x)
  with pytest.raises(UserError, match=NOT_MASKED):
    surgery.prune_to(model, variables, shape, flops_ratio=0.5, round_to=2)  # even widths:
    # at odd ones the shuffle's reshape fails, which the rebuild already says in one line


def test_the_group_a_scale_follows_left_whole_prunes_the_rest_exactly():
  model = EmbedScale()
  shape = jax.ShapeDtypeStruct((6,), jnp.int32)
  variables = model.init(jax.random.key(_seed()), jnp.zeros((1, 6), jnp.int32))
  small, info = surgery.prune_to(model, variables, shape, flops_ratio=0.8, round_to=1,
                                 ignore=["params/embed/embedding"])
  g = info["graph"]
  narrowed = {gid: k for gid, k in info["keep"].items() if len(k) < g.groups[gid].width}
  assert narrowed and not info["approximate"]
  ref_model, ref_vars = masking.masked(model, variables, g, info["keep"])
  ids = jax.random.randint(jax.random.key(_seed()), (4, 6), 0, 40)
  np.testing.assert_allclose(_out(small.model, small.variables, ids),
                             _out(ref_model, ref_vars, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_masked_original_zeroes_exactly_what_the_groups_remove(kind):
  """:func:`jaxprune.surgery.masked_original` (from the per-leaf slices) equals the
  tests' own masking (from the group members) leaf by leaf, on random keeps."""
  rng = np.random.default_rng()
  if kind == "linen":
    model = HeadsNet()
    variables = model.init(jax.random.key(_seed()), jnp.zeros((1, 5, 10)))
  else:
    model, variables = HeadsNNX(nnx.Rngs(_seed())), None
  g = graph.trace(model, variables, (5, 10))
  keep = {grp.id: np.sort(rng.choice(grp.width, rng.integers(1, grp.width), replace=False))
          for grp in g.prunable()}
  got_model, got_vars = surgery.masked_original(model, variables, graph.kept_slices(g, keep))
  ref_model, ref_vars = masking.masked(model, variables, g, keep)
  leaves = lambda m, v: jax.tree.leaves(nnx.state(m) if v is None else v)
  got, ref = leaves(got_model, got_vars), leaves(ref_model, ref_vars)
  assert len(got) == len(ref)
  for a, b in zip(got, ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(np.any(np.asarray(a) != np.asarray(b))  # something was zeroed
             for a, b in zip(got, leaves(model, variables)))
