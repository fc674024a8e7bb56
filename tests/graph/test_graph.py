"""The channel dependency graph: groups, kept slices and exact predictions."""
from flax import nnx
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from jaxprune import flops, graph, models
from jaxprune.errors import UserError
from jaxprune.graph.tracing import leaf_name

jax.config.update("jax_disable_most_optimizations", True)


def _conv(x, w, b=None, groups=1):
  y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               feature_group_count=groups)
  return y if b is None else y + b


def _function_model(rng):
  """A CNN written with lax/jnp only: split, depthwise, concat, flatten -> dense."""
  k = iter(jax.random.split(rng, 16))
  n = lambda *s: jax.random.normal(next(k), s) * 0.3
  params = {"stem": {"kernel": n(3, 3, 3, 8), "bias": n(8)},
            "dw": {"kernel": n(3, 3, 1, 4)},
            "side": {"kernel": n(1, 1, 8, 5), "bias": n(5)},
            "mix": {"kernel": n(3, 3, 13, 6), "bias": n(6)},
            "head": {"kernel": n(6 * 4 * 4, 3), "bias": n(3)}}

  def f(p, x):
    h = jax.nn.relu(_conv(x, p["stem"]["kernel"], p["stem"]["bias"]))
    a, b = jnp.split(h, 2, axis=-1)
    b = _conv(b, p["dw"]["kernel"], groups=b.shape[-1])  # depthwise at any width
    y = jnp.concatenate([a, b, _conv(h, p["side"]["kernel"], p["side"]["bias"])], -1)
    y = jax.nn.relu(_conv(y, p["mix"]["kernel"], p["mix"]["bias"]))
    y = lax.reduce_window(y, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    return y.reshape(y.shape[0], -1) @ p["head"]["kernel"] + p["head"]["bias"]
  return f, params


def _take(tree, slices):
  """Independent slow slicer: np.take of every listed axis of every listed leaf."""
  def one(path, leaf):
    out = np.asarray(leaf)
    for axis, kept in slices.get(leaf_name(path), {}).items():
      out = np.take(out, kept, axis=axis)
    return jnp.asarray(out)
  return jax.tree_util.tree_map_with_path(one, tree)


def _zero_removed(tree, g, keep):
  """The original params with every removed channel's producer slices and biases zeroed."""
  zero = {}
  for gid, kept in keep.items():
    group = g.groups[gid]
    gone = np.setdiff1d(np.arange(group.width), kept)
    for m in group.members:
      if m.role != "consumer":
        zero.setdefault(m.path, []).append((m.axis, m.index[gone].ravel()))

  def one(path, leaf):
    out = np.array(leaf)
    for axis, idx in zero.get(leaf_name(path), []):
      index = [slice(None)] * out.ndim
      index[axis] = idx
      out[tuple(index)] = 0
    return jnp.asarray(out)
  return jax.tree_util.tree_map_with_path(one, tree)


def _random_keep(g, rng):
  keep = {}
  for group in g.prunable():
    n = max(1, int(round(group.width * rng.uniform(0.4, 0.7))))
    keep[group.id] = np.sort(rng.choice(group.width, n, replace=False))
  return keep


def test_function_model_groups_follow_split_depthwise_concat_and_flatten():
  f, params = _function_model(jax.random.key(0))
  g = graph.trace(f, params, (8, 8, 3))
  by_producer = {tuple(grp.producers): grp for grp in g.groups}
  # A split cuts at offsets fixed in the code: the stem's channels stay whole, and say why.
  stem = by_producer[("stem/kernel",)]
  assert not stem.prunable and "split" in stem.reason
  dw = by_producer[("dw/kernel",)]  # depthwise over those channels: fixed too
  assert not dw.prunable and "depthwise" in dw.reason
  # The side conv reaches the concat after the 8 split channels: offset 8.
  side = by_producer[("side/kernel",)]
  mix_in = next(m for m in side.members if m.path == "mix/kernel")
  np.testing.assert_array_equal(mix_in.index.ravel(), np.arange(8, 13))
  # mix's 6 channels reach the head through pooling and a flatten: 16 rows each.
  mix = by_producer[("mix/kernel",)]
  head = next(m for m in mix.members if m.path == "head/kernel")
  assert head.index.shape == (6, 16)
  np.testing.assert_array_equal(head.index[2], 2 + 6 * np.arange(16))
  assert not by_producer[("head/kernel",)].prunable  # the logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_function_matches_prediction_and_masked_original(seed):
  rng = np.random.default_rng(seed)
  f, params = _function_model(jax.random.key(seed))
  g = graph.trace(f, params, (8, 8, 3))
  keep = _random_keep(g, rng)
  small = _take(params, graph.kept_slices(g, keep))
  x = jax.random.normal(jax.random.key(seed + 10), (2, 8, 8, 3))
  out = f(small, x)
  assert out.shape == (2, 3)
  assert flops.count(f, small, (8, 8, 3)) == g.predict(keep)
  # Removed channels zeroed in the original give the same logits (relu(0) = 0 and
  # a zero channel adds nothing downstream).
  np.testing.assert_allclose(out, f(_zero_removed(params, g, keep), x), rtol=1e-5, atol=1e-5)


def test_linen_resnet_residual_stream_is_one_group_and_flops_are_official():
  model = models.cifar_resnet(20)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  g = graph.trace(model, variables, (32, 32, 3))
  assert g.flops == 40_813_194  # tas.md §5, the official counter
  stream = g.groups[0]
  assert set(stream.producers) == {"params/stem_conv/kernel"} | {
      f"params/stage0_block{b}/conv_b/kernel" for b in range(3)}
  inner = [grp for grp in g.groups if grp.producers == ["params/stage0_block1/conv_a/kernel"]]
  assert len(inner) == 1 and inner[0].width == 16 and inner[0].prunable
  assert {m.path for m in inner[0].members} == {
      "params/stage0_block1/conv_a/kernel", "params/stage0_block1/conv_b/kernel",
      "params/stage0_block1/bn_a/scale", "params/stage0_block1/bn_a/bias",
      "batch_stats/stage0_block1/bn_a/mean", "batch_stats/stage0_block1/bn_a/var"}


class _Attention(nnx.Module):
  def __init__(self, rngs, d=8, heads=2):
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.att = nnx.MultiHeadAttention(heads, d, qkv_features=d, decode=False, rngs=rngs)
    self.fc1 = nnx.Linear(d, 12, rngs=rngs)
    self.fc2 = nnx.Linear(12, d, rngs=rngs)
    self.head = nnx.Linear(d, 3, rngs=rngs)

  def __call__(self, x):
    x = x + self.att(self.ln(x))
    x = x + self.fc2(nnx.gelu(self.fc1(x)))
    return self.head(x.mean(1))


def test_nnx_attention_heads_and_mlp_hidden_are_groups():
  g = graph.trace(_Attention(nnx.Rngs(0)), None, (5, 8))
  heads = [grp for grp in g.groups if "att/query/kernel" in grp.producers
           and any(m.path == "att/query/kernel" and m.axis == 1 for m in grp.members)]
  assert len(heads) == 1 and heads[0].width == 2
  assert {(m.path, m.axis) for m in heads[0].members} >= {
      ("att/query/kernel", 1), ("att/key/kernel", 1), ("att/value/kernel", 1),
      ("att/out/kernel", 0)}
  hidden = [grp for grp in g.groups if grp.producers == ["fc1/kernel"]]
  assert hidden[0].width == 12 and hidden[0].prunable
  # q.k and attn.v are matrix products and count.
  kinds = [r["kind"] for r in flops.count_layers(_Attention(nnx.Rngs(0)), None, (5, 8))]
  assert kinds.count("dot") == 2


def test_an_op_the_graph_cannot_follow_makes_its_group_fixed():
  rng = jax.random.key(0)
  params = {"a": {"kernel": jax.random.normal(rng, (4, 6))},
            "b": {"kernel": jax.random.normal(rng, (6, 2))}}
  f = lambda p, x: jnp.sort(x @ p["a"]["kernel"], axis=-1) @ p["b"]["kernel"]
  g = graph.trace(f, params, (4,))
  hidden = next(grp for grp in g.groups if grp.producers == ["a/kernel"])
  assert not hidden.prunable and "sort" in hidden.reason
  with pytest.raises(UserError, match="cannot be pruned"):
    graph.kept_slices(g, {hidden.id: [0, 1]})


def test_ignore_and_bad_keeps_are_errors():
  f, params = _function_model(jax.random.key(0))
  g = graph.trace(f, params, (8, 8, 3), ignore=[r"^side/"])
  side = next(grp for grp in g.groups if grp.producers == ["side/kernel"])
  assert not side.prunable and "ignored" in side.reason
  mix = next(grp for grp in g.groups if grp.producers == ["mix/kernel"])
  with pytest.raises(UserError, match="no channel"):
    graph.kept_slices(g, {mix.id: []})
  with pytest.raises(UserError, match="channels 0..5"):
    graph.kept_slices(g, {mix.id: [7]})


def test_counting_a_model_without_products_is_an_error():
  with pytest.raises(UserError, match="nothing to count"):
    flops.count(lambda p, x: x * p["s"], {"s": jnp.ones(3)}, (3,))
