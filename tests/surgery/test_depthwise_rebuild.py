"""Depthwise convs in the rebuild (issue 24): MobileNetV2's stem group and its blocks.

The CIFAR-layout MobileNetV2 of benchmarks/pruned_speed.py (copied here, small) decides
its structure from int attributes compared with widths: block0 has no expand conv
because ``expand == x.shape[-1]``, a block adds its residual when ``x.shape[-1] ==
out``. Narrowing the stem group (stem conv, block0's depthwise conv, block0's project
input) used to crash the rebuild (a fresh expand conv fed the depthwise conv 32
channels); narrowing a residual group used to drop the residual silently. The pruned
network must equal the masked original (every member's removed slices zeroed) to
float32 rounding.
"""
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import masking
from jaxprune import graph, surgery
from jaxprune.errors import UserError
from jaxprune.graph.tracing import leaf_name

SHAPE = (6, 6, 3)


class InvertedResidual(nn.Module):  # as in benchmarks/pruned_speed.py
  expand: int
  out: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    y = x
    if self.expand != x.shape[-1]:
      y = nn.relu6(bn("expand_bn")(nn.Conv(self.expand, (1, 1), use_bias=False,
                                           name="expand")(y)))
    c = y.shape[-1]
    y = nn.Conv(c, (3, 3), (self.stride, self.stride), feature_group_count=c,
                use_bias=False, name="dw")(y)
    y = nn.relu6(bn("dw_bn")(y))
    y = bn("project_bn")(nn.Conv(self.out, (1, 1), use_bias=False, name="project")(y))
    return x + y if self.stride == 1 and x.shape[-1] == self.out else y


class MobileNetV2(nn.Module):
  """pruned_speed's MobileNetV2, its first three stages (stem 32, 16, 24 x 2)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    x = nn.relu6(bn("bn_stem")(nn.Conv(32, (3, 3), use_bias=False, name="stem")(x)))
    cin, i = 32, 0
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 1)):
      for j in range(n):
        x = InvertedResidual(cin * t, c, s if j == 0 else 1, name=f"block{i}")(x, train)
        cin, i = c, i + 1
    return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


class NNXBlock(nnx.Module):
  """stem -> BN -> depthwise 3x3 -> BN -> pointwise -> dense, in NNX."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn_stem = nnx.BatchNorm(16, rngs=rngs)
    self.dw = nnx.Conv(16, 16, (3, 3), feature_group_count=16, use_bias=False, rngs=rngs)
    self.dw_bn = nnx.BatchNorm(16, rngs=rngs)
    self.project = nnx.Conv(16, 8, (1, 1), rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu6(self.bn_stem(self.stem(x)))
    x = nnx.relu6(self.dw_bn(self.dw(x)))
    return self.head(jnp.mean(self.project(x), axis=(1, 2)))


def randomized(tree, rng):
  """Random weights and BN statistics (variances positive): no channel is special."""
  def one(path, a):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
      return a
    v = rng.normal(size=a.shape)
    return jnp.asarray(np.abs(v) + 0.5 if leaf_name(path).endswith("var") else v, a.dtype)
  return jax.tree_util.tree_map_with_path(one, tree)


def group_of(g, path):
  """The group whose producers include the kernel `path` (its output channels)."""
  hits = [grp for grp in g.groups
          if any(m.path == path and m.role == "producer" for m in grp.members)]
  assert len(hits) == 1, path
  return hits[0]


def random_keep(groups, rng, avoid=None):
  """Random kept channels of each group, fewer than its width and not a count in
  ``avoid[group id]``."""
  out = {}
  for g in groups:
    counts = [n for n in range(1, g.width) if n not in (avoid or {}).get(g.id, ())]
    out[g.id] = np.sort(rng.choice(g.width, int(rng.choice(counts)), replace=False))
  return out


def rel_gap(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.slow
@pytest.mark.parametrize("members", [
    ("params/stem/kernel",),  # the stem + block0's depthwise conv (no expand conv)
    ("params/stem/kernel", "params/block1/dw/kernel", "params/block2/project/kernel"),
])
def test_linen_mobilenetv2_stem_depthwise_residual_groups_equal_masked(members):
  """The stem group, a depthwise block's group and a residual group, narrowed at fresh
  random kept channels: the pruned network runs, keeps block0 without an expand conv
  and the residual adds, and equals the masked original to float32 rounding."""
  rng = np.random.default_rng()
  model = MobileNetV2()
  variables = randomized(model.init(jax.random.key(0), jnp.zeros((1, *SHAPE))), rng)
  g = graph.trace(model, variables, SHAPE)
  groups = [group_of(g, p) for p in members]
  assert groups[0].prunable and groups[0].exactness == "exact"
  assert any(m.path == "params/block0/dw/kernel" for m in groups[0].members)
  # 16 kept channels in the stem group (block0's input) make the user's code add a
  # residual the original lacks (block0: x.shape[-1] == out == 16, and block0 has no
  # expand conv whose attribute could keep it apart): no network of that code equals the
  # masked one, and the rebuild stops with one line (checked below) instead of returning
  # another graph. (1 draw in 31 of each case failed before the draw left it out.)
  keep = random_keep(groups, rng, avoid={groups[0].id: {16}})
  if len(members) == 1:
    with pytest.raises(UserError, match="rebuild"):
      surgery.prune(model, variables, SHAPE,
                    {groups[0].id: np.sort(rng.choice(32, 16, replace=False))}, graph=g)
  small = surgery.prune(model, variables, SHAPE, keep, graph=g)
  assert "params/block0/expand/kernel" not in small.shapes
  assert small.variables["params"]["block0"]["dw"]["kernel"].shape == (
      3, 3, 1, len(keep[groups[0].id]))
  x = jnp.asarray(rng.normal(size=(3, *SHAPE)), jnp.float32)
  got = small.model.apply(small.variables, x)
  want = model.apply(masking.masked(model, variables, g, keep)[1], x)
  assert rel_gap(got, want) < 1e-5
  # init at the pruned widths builds the same tree (no extra expand conv).
  fresh = small.model.init(jax.random.key(1), x)
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, small.variables)


@pytest.mark.slow
def test_linen_width_meeting_an_attribute_by_chance_keeps_the_expand_conv():
  """block1's depthwise group narrowed to 16 channels, as wide as its input: its
  ``expand != x.shape[-1]`` must still hold (the attribute stays 96), while block0's
  ``expand`` follows the narrowed stem; the result equals the masked original."""
  rng = np.random.default_rng()
  model = MobileNetV2()
  variables = randomized(model.init(jax.random.key(0), jnp.zeros((1, *SHAPE))), rng)
  g = graph.trace(model, variables, SHAPE)
  groups = [group_of(g, "params/stem/kernel"), group_of(g, "params/block1/dw/kernel")]
  # The stem's count leaves out 16: there block0 gains a residual (see the test above).
  stem = int(rng.choice([n for n in range(1, 32) if n != 16]))
  keep = {grp.id: np.sort(rng.choice(grp.width, n, replace=False))
          for grp, n in zip(groups, (stem, 16))}
  small = surgery.prune(model, variables, SHAPE, keep, graph=g)
  assert small.variables["params"]["block1"]["expand"]["kernel"].shape[-1] == 16
  x = jnp.asarray(rng.normal(size=(3, *SHAPE)), jnp.float32)
  want = model.apply(masking.masked(model, variables, g, keep)[1], x)
  assert rel_gap(small.model.apply(small.variables, x), want) < 1e-5


def test_nnx_depthwise_group_equals_masked():
  """NNX: the stem / depthwise group narrowed at random kept channels: the depthwise
  conv gets the new feature_group_count and equals the masked original."""
  rng = np.random.default_rng()
  model = NNXBlock(nnx.Rngs(0))
  nnx.update(model, randomized(nnx.state(model), rng))
  model.eval()
  g = graph.trace(model, None, SHAPE)
  group = group_of(g, "dw/kernel")
  assert any(m.path == "stem/kernel" for m in group.members)
  keep = random_keep([group], rng)
  small = surgery.prune(model, None, SHAPE, keep, graph=g)
  n = len(keep[group.id])
  assert (small.model.dw.in_features, small.model.dw.out_features,
          small.model.dw.feature_group_count) == (n, n, n)
  x = jnp.asarray(rng.normal(size=(3, *SHAPE)), jnp.float32)
  ref, _ = masking.masked(model, None, g, keep)
  small.model.eval()
  assert rel_gap(small.model(x), ref(x)) < 1e-5


class Unfollowable(nn.Module):
  """Applies its ReLU only at the width 8 (a constant): at any pruned width the graph
  changes (the ReLU goes), and no int attribute can undo it."""

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(8, (1, 1), name="a")(x)
    if y.shape[-1] == 8:
      y = nn.relu(y)
    return nn.Dense(3, name="out")(y.mean(axis=(1, 2)))


def test_structure_change_is_one_line_error():
  """A layer whose graph changes at the pruned widths is refused with one line, not
  rebuilt into a different network."""
  model = Unfollowable()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
  g = graph.trace(model, variables, (4, 4, 3))
  group = group_of(g, "params/a/kernel")
  with pytest.raises(UserError, match="another graph") as e:
    surgery.prune(model, variables, (4, 4, 3), {group.id: [0, 2, 5]}, graph=g)
  assert "\n" not in str(e.value)
