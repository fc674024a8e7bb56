"""What removing a group does to the function (issue 22): exact, approximate, kinds,
feature axes only, embeddings, scan and while loops.

"Masked" is the original with every slice of the removed channels set to zero (all the
group's members); an exact group's pruned network gives the masked one's logits to
float32 rounding, an approximate one's does not, and says so.
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
from jaxprune.errors import UserError

D, T = 16, 5


def run(model, variables, x):
  if variables is None:
    return np.asarray(model(x), np.float64)
  return np.asarray(model.apply(variables, x), np.float64)


def gap(model, variables, x, group, n_gone=1, seed=0):
  """max |pruned - masked| / max |masked| for removing `n_gone` random channels."""
  g = graph.trace(model, variables, x.shape[1:])
  group = g.groups[group.id]
  gone = np.random.default_rng(seed).choice(group.width, n_gone, replace=False)
  kept = np.setdiff1d(np.arange(group.width), gone)
  small = surgery.prune(model, variables, x.shape[1:], {group.id: kept}, graph=g)
  ref = run(*masking.masked(model, variables, g, {group.id: kept}), x)
  got = run(small.model, small.variables, x)
  assert got.shape == ref.shape
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))), small


def by_kind(g, kind):
  return [grp for grp in g.groups if grp.kind == kind]


# --------------------------------------------------------------------------- models

class PreLNBlock(nn.Module):
  heads: int = 2

  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(
        nn.LayerNorm(name="ln1")(x))
    y = nn.Dense(2 * D, name="fc1")(nn.LayerNorm(name="ln2")(x))
    return x + nn.Dense(x.shape[-1], name="fc2")(nn.gelu(y))


class TinyViT(nn.Module):
  """Patch conv, learned position embedding (1, tokens, width), a pre-LN block."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(D, (4, 4), strides=(4, 4), name="patch")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = x + self.param("pos", nn.initializers.normal(1.0), x.shape[1:])[None]
    x = PreLNBlock(name="block")(x)
    return nn.Dense(3, name="head")(nn.LayerNorm(name="ln")(x).mean(1))


class StdConv(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
    w = (w - w.mean((0, 1, 2))) / jnp.sqrt(w.var((0, 1, 2)) + 1e-10)
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class WSNet(nn.Module):
  """A plain conv feeding a weight-standardised conv, and an l2-normalised feature."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
    x = nn.relu(StdConv(8, name="std")(x))
    x = nn.relu(nn.Conv(8, (3, 3), name="conv3")(x)).mean((1, 2))
    f = nn.Dense(12, name="fc")(x)
    f = f / jnp.sqrt(jnp.sum(f * f, -1, keepdims=True) + 1e-6)
    return nn.Dense(3, name="head")(f)


def rope(x):
  half = x.shape[-1] // 2
  angle = jnp.arange(x.shape[1])[:, None, None] * 10000.0 ** (-jnp.arange(half) / half)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle),
                          x2 * jnp.cos(angle) + x1 * jnp.sin(angle)], -1)


class GQADecoder(nnx.Module):
  """Embedding, RMSNorm, rotary, grouped-query attention (4 query heads on 2 KV heads),
  SwiGLU MLP."""

  def __init__(self, vocab=11, width=D, heads=4, kv=2, hd=4, hidden=24, *, rngs):
    self.heads, self.kv, self.hd = heads, kv, hd
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.norm1 = nnx.RMSNorm(width, rngs=rngs)
    self.q = nnx.Linear(width, heads * hd, use_bias=False, rngs=rngs)
    self.k = nnx.Linear(width, kv * hd, use_bias=False, rngs=rngs)
    self.v = nnx.Linear(width, kv * hd, use_bias=False, rngs=rngs)
    self.o = nnx.Linear(heads * hd, width, use_bias=False, rngs=rngs)
    self.norm2 = nnx.RMSNorm(width, rngs=rngs)
    self.gate = nnx.Linear(width, hidden, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(width, hidden, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(hidden, width, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(width, vocab, use_bias=False, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    n, t, _ = x.shape
    hd = self.hd  # head counts from the kernels, so that a pruned copy runs
    kv, g = self.k.kernel.shape[1] // hd, self.q.kernel.shape[1] // self.k.kernel.shape[1]
    y = self.norm1(x)
    q = rope(self.q(y).reshape(n, t, kv * g, hd)).reshape(n, t, kv, g, hd)
    k = rope(self.k(y).reshape(n, t, kv, hd))
    v = self.v(y).reshape(n, t, kv, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(hd)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    a = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, -1), v)
    x = x + self.o(a.reshape(n, t, kv * g * hd))
    y = self.norm2(x)
    x = x + self.down(nnx.silu(self.gate(y)) * self.up(y))
    return self.out(x)


# --------------------------------------------------------------------------- tests

def test_position_embedding_token_axis_is_never_a_channel_group():
  model = TinyViT()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  v = model.init(jax.random.key(0), x)
  g = graph.trace(model, v, (8, 8, 3))
  pos = [(grp.id, m.axis) for grp in g.groups for m in grp.members if m.path == "params/pos"]
  assert pos and all(axis == 1 for _, axis in pos)  # only its feature axis
  small, info = surgery.prune_to(model, v, (8, 8, 3), flops_ratio=0.6)
  assert small.variables["params"]["pos"].shape[0] == 4  # every token position kept


def test_layernorm_residual_is_approximate_mlp_and_heads_exact():
  model = TinyViT()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  v = model.init(jax.random.key(0), x)
  g = graph.trace(model, v, (8, 8, 3))
  (res,) = by_kind(g, "residual")
  assert res.prunable and res.exactness == "approximate"
  assert any("mean over the channels" in e and "block/ln1" in e for e in res.effects)
  assert "approximate: mean over the channels" in str(res)
  (mlp,) = [grp for grp in by_kind(g, "mlp") if grp.prunable]
  (heads,) = by_kind(g, "heads")
  assert mlp.exactness == heads.exactness == "exact" and heads.width == 2
  for grp in (mlp, heads):
    diff, small = gap(model, v, x, grp)
    assert diff < 1e-5 and small.approximate == {}
  diff, small = gap(model, v, x, res, n_gone=4)
  assert diff > 1e-3 and small.approximate == {res.id: res.effects}


def test_attention_head_dim_scale_is_compensated_by_a_fold_into_the_query():
  model = TinyViT()
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  v = model.init(jax.random.key(3), x)
  g = graph.trace(model, v, (8, 8, 3))
  (hd,) = by_kind(g, "head_dim")
  assert hd.width == D // 2 and hd.exactness == "compensated"
  assert any(f"{D // 2}^-0.5 computed from the contracted width" in e for e in hd.effects)
  diff, small = gap(model, v, x, hd, n_gone=4)
  assert diff < 1e-5 and small.folded  # tests/surgery/test_compensated.py has the rest


def test_weight_standardisation_is_approximate_l2_normalisation_exact():
  model = WSNet()
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  v = model.init(jax.random.key(0), x)
  g = graph.trace(model, v, (6, 6, 3))
  of = {grp.producers[0]: grp for grp in g.groups if grp.producers}
  into_std = of["params/conv1/kernel"]  # the standardised conv's input channels
  assert into_std.exactness == "approximate"
  assert any("mean over the channels (sum / 72)" in e and "std" in e for e in into_std.effects)
  l2 = of["params/fc/kernel"]
  assert l2.prunable and l2.exactness == "exact"
  assert of["params/conv3/kernel"].exactness == "exact"
  assert gap(model, v, x, l2, n_gone=3)[0] < 1e-5
  assert gap(model, v, x, of["params/conv3/kernel"], n_gone=3)[0] < 1e-5
  assert gap(model, v, x, into_std, n_gone=3)[0] > 1e-3


@pytest.mark.slow
def test_gqa_decoder_heads_are_whole_kv_groups_and_exact():
  model = GQADecoder(rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (2, T), 0, 11)
  spec, call = (T,), lambda m, x: m(x.astype(jnp.int32))  # token ids as floats
  g = graph.trace(model, None, spec, call)
  (heads,) = by_kind(g, "heads")
  assert heads.width == 2 and heads.prunable and heads.exactness == "exact"
  spans = {m.path: m.index.shape[1] for m in heads.members}
  assert spans == {"q/kernel": 8, "k/kernel": 4, "v/kernel": 4, "o/kernel": 8}
  (res,) = by_kind(g, "residual")
  assert res.exactness == "approximate" and "embed/embedding" in [m.path for m in res.members]
  assert all(m.axis == 1 for m in res.members if m.path == "embed/embedding")
  (mlp,) = [grp for grp in by_kind(g, "mlp") if grp.prunable]
  assert mlp.width == 24 and mlp.exactness == "exact"
  for grp, n in ((heads, 1), (mlp, 12)):
    gone = np.random.default_rng(0).choice(grp.width, n, replace=False)
    kept = np.setdiff1d(np.arange(grp.width), gone)
    small = surgery.prune(model, None, spec, {grp.id: kept}, call, graph=g)
    ref = np.asarray(masking.masked(model, None, g, {grp.id: kept})[0](ids))
    got = np.asarray(small.model(ids))
    assert np.max(np.abs(got - ref)) < 1e-5 * np.max(np.abs(ref))
  small = surgery.prune(model, None, spec, {heads.id: [1]}, call, graph=g)
  assert small.model.q.kernel.shape == (D, 8) and small.model.k.kernel.shape == (D, 4)


class Embeddings(nn.Module):
  """BERT's three tables (word, position, type) summed, a LayerNorm, a dense."""

  @nn.compact
  def __call__(self, ids):
    ids = ids.astype(jnp.int32)  # token ids (given as floats: one float input)
    x = nn.Embed(11, D, name="word")(ids)
    x = x + nn.Embed(T, D, name="position")(jnp.arange(ids.shape[1]))[None]
    x = x + nn.Embed(2, D, name="type")(jnp.zeros_like(ids))
    x = nn.Dense(D, name="fc")(nn.relu(nn.Dense(x.shape[-1], name="mix")(x)) + x)
    return nn.Dense(3, name="head")(x.sum(1))


def test_embedding_lookups_join_the_residual_group():
  model = Embeddings()
  v = model.init(jax.random.key(0), jnp.zeros((1, T)))
  g = graph.trace(model, v, (T,))
  tables = {f"params/{n}/embedding" for n in ("word", "position", "type")}
  (res,) = [grp for grp in g.groups if tables <= {m.path for m in grp.members}]
  assert res.kind == "residual" and res.prunable and res.exactness == "exact"
  assert all(m.axis == 1 for m in res.members if m.path in tables)
  ids = jax.random.randint(jax.random.key(1), (2, T), 0, 11).astype(jnp.float32)
  gone = [0, 5, 9]
  kept = np.setdiff1d(np.arange(D), gone)
  small = surgery.prune(model, v, (T,), {res.id: kept}, graph=g)
  ref = np.asarray(model.apply(masking.masked(model, v, g, {res.id: kept})[1], ids))
  got = np.asarray(small.model.apply(small.variables, ids))
  assert np.max(np.abs(got - ref)) < 1e-5 * np.max(np.abs(ref))


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(x.shape[-1], name="fc2")(nn.relu(nn.Dense(24, name="fc1")(x))), None


class ScanNet(nn.Module):
  unroll: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)
    if self.unroll:
      for i in range(3):
        x, _ = ScanBlock(name=f"block{i}")(x, None)
    else:
      x, _ = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(name="blocks")(x, None)
    return nn.Dense(3, name="head")(x)


def test_scan_over_layers_prunes_per_layer_slices_of_the_stacked_parameters():
  model = ScanNet()
  x = jax.random.normal(jax.random.key(1), (2, 7))
  v = model.init(jax.random.key(0), x)
  g = graph.trace(model, v, (7,))
  unrolled = ScanNet(unroll=True)
  gu = graph.trace(unrolled, unrolled.init(jax.random.key(0), x), (7,))
  assert g.flops == gu.flops and g.params == gu.params
  (hidden,) = [grp for grp in g.groups if "params/blocks/fc1/kernel" in grp.producers]
  assert hidden.width == 24 and hidden.prunable and hidden.exactness == "exact"
  (m,) = [m for m in hidden.members if m.path == "params/blocks/fc1/kernel"]
  assert m.axis == 2  # (layers, in, out): the layer axis is no channel
  diff, small = gap(model, v, x, hidden, n_gone=8)
  assert diff < 1e-5
  assert small.variables["params"]["blocks"]["fc1"]["kernel"].shape == (3, D, 16)
  keep = {hidden.id: np.arange(16)}
  assert g.predict(keep) == graph.trace(small.model, small.variables, (7,)).predict({})


def test_while_loop_is_followed_and_never_crashes():
  def f(params, x):
    def body(i, h):
      return h + jnp.tanh(h @ params["w"])
    h = x @ params["a"]
    h = jax.lax.fori_loop(0, jnp.asarray(x.shape[0]) + 1, body, h)  # a traced bound: while
    return h @ params["b"]
  p = {"a": jnp.ones((3, 6)), "w": jnp.ones((6, 6)), "b": jnp.ones((6, 2))}
  assert "while" in str(jax.make_jaxpr(f)(p, jnp.ones((1, 3))))
  g = graph.trace(f, p, (3,))
  (hidden,) = [grp for grp in g.groups if "a" in grp.producers]
  assert {(m.path, m.axis) for m in hidden.members} >= {("a", 1), ("w", 0), ("w", 1), ("b", 0)}
  assert hidden.prunable


def test_prune_to_exact_only_keeps_approximate_groups_whole():
  model = TinyViT()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  v = model.init(jax.random.key(0), x)
  small, info = surgery.prune_to(model, v, (8, 8, 3), flops_ratio=0.8, round_to=1)
  g = info["graph"]
  narrowed = {gid for gid, kept in info["keep"].items() if len(kept) < g.groups[gid].width}
  approx = {grp.id for grp in g.groups if grp.exactness == "approximate"}
  assert narrowed & approx and set(info["approximate"]) == narrowed & approx
  small, info = surgery.prune_to(model, v, (8, 8, 3), flops_ratio=0.8, exact_only=True,
                                 round_to=1)
  narrowed = {gid for gid, kept in info["keep"].items() if len(kept) < g.groups[gid].width}
  assert narrowed and not narrowed & approx and info["approximate"] == {}
  assert info["after"]["flops"] <= 0.8 * info["before"]["flops"]


def test_exact_only_with_no_exact_group_is_one_line():
  def f(params, x):
    h = x @ params["a"]
    h = h - h.mean(-1, keepdims=True)
    return h @ params["b"]
  p = {"a": jnp.ones((3, 6)), "b": jnp.ones((6, 2))}
  with pytest.raises(UserError, match="exact_only=True: none of the 1 prunable groups"):
    surgery.prune_to(f, p, (3,), flops_ratio=0.5, exact_only=True)


def test_l1_importance_scores_whole_kv_groups():
  """A heads group's l1 score of KV group c is the |w| sum of its k and v head, its query
  heads and their output-projection rows, by hand from the kernels."""
  model = GQADecoder(rngs=nnx.Rngs(3))
  g = graph.trace(model, None, (T,), lambda m, x: m(x.astype(jnp.int32)))
  (heads,) = by_kind(g, "heads")
  scores = surgery.importance.group_scores(g, graph.named_leaves(model, None), "l1",
                                           groups=[heads])[heads.id]
  a = lambda w: np.abs(np.asarray(w, np.float64))
  q, k, v, o = (a(m.kernel) for m in (model.q, model.k, model.v, model.o))
  hd, per = model.hd, model.heads // model.kv * model.hd  # query columns per KV group
  want = [q[:, c * per:(c + 1) * per].sum() + k[:, c * hd:(c + 1) * hd].sum()
          + v[:, c * hd:(c + 1) * hd].sum() + o[c * per:(c + 1) * per].sum()
          for c in range(model.kv)]
  np.testing.assert_allclose(scores, want, rtol=1e-6)


def test_a_sum_over_channels_is_exact_only_where_zeroed_channels_stay_zero():
  """l2-normalisation sums squares (a zeroed channel adds 0): exact. A softmax written
  as exp(y) / sum(exp(y)) sums exp(0) = 1 for a zeroed channel: approximate."""
  def l2(p, x):
    y = x @ p["a"]
    return (y / jnp.sqrt(jnp.sum(y * y, -1, keepdims=True) + 1e-6)) @ p["b"]

  def softmax(p, x):
    y = jnp.exp(x @ p["a"])
    return (y / jnp.sum(y, -1, keepdims=True)) @ p["b"]
  rng = np.random.default_rng(0)
  p = {"a": jnp.asarray(rng.normal(size=(3, 6)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  gone, kept = np.array([1, 4]), np.array([0, 2, 3, 5])
  masked_p = {"a": p["a"].at[:, gone].set(0), "b": p["b"].at[gone].set(0)}
  for f, exact in ((l2, True), (softmax, False)):
    g = graph.trace(f, p, (3,))
    (hidden,) = g.prunable()
    assert hidden.exactness == ("exact" if exact else "approximate"), str(hidden)
    small = surgery.prune(f, p, (3,), {hidden.id: kept}, graph=g)
    diff = float(np.max(np.abs(f(small.variables, x) - f(masked_p, x))))
    assert (diff < 1e-5) if exact else (diff > 1e-3 and "exp(...)" in hidden.effects[0])
