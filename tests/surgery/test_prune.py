"""Criteria, targets and the one-call pruner on the same model written in Linen and NNX."""
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import flops, graph, surgery
from jaxprune.errors import UserError

jax.config.update("jax_disable_most_optimizations", True)


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(12, (3, 3), name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.Conv(16, (3, 3), strides=2, name="conv2")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn2")(x))
    x = nn.relu(nn.Dense(20, name="fc1")(x.reshape(x.shape[0], -1)))
    return nn.Dense(5, name="head")(x)


class NNXCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 12, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(12, rngs=rngs)
    self.conv2 = nnx.Conv(12, 16, (3, 3), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.fc1 = nnx.Linear(16 * 4 * 4, 20, rngs=rngs)
    self.head = nnx.Linear(20, 5, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
    return self.head(x)


SHAPE = (8, 8, 3)


def _twins(seed):
  """The same network in Linen and NNX, with the same random weights and statistics."""
  linen = LinenCNN()
  variables = linen.init(jax.random.key(seed), jnp.zeros((1, *SHAPE)))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, jnp.float32),
                           variables)
  for layer in ("bn1", "bn2"):  # positive statistics and scales around 1
    stats = variables["batch_stats"][layer]
    stats["var"] = jnp.abs(stats["var"]) + 0.1
    variables["params"][layer]["scale"] = variables["params"][layer]["scale"] + 1.0
  module = NNXCNN(nnx.Rngs(seed))
  for layer in ("conv1", "conv2", "fc1", "head"):
    getattr(module, layer).kernel[...] = variables["params"][layer]["kernel"]
    getattr(module, layer).bias[...] = variables["params"][layer]["bias"]
  for layer in ("bn1", "bn2"):
    bn = getattr(module, layer)
    bn.scale[...] = variables["params"][layer]["scale"]
    bn.bias[...] = variables["params"][layer]["bias"]
    bn.mean[...] = variables["batch_stats"][layer]["mean"]
    bn.var[...] = variables["batch_stats"][layer]["var"]
  module.eval()
  return linen, variables, module


def _strip(path):
  return path.split("/", 1)[1] if path.startswith(("params/", "batch_stats/")) else path


def test_linen_and_nnx_twins_have_the_same_groups_counts_and_outputs():
  linen, variables, module = _twins(0)
  x = jax.random.normal(jax.random.key(1), (2, *SHAPE))
  np.testing.assert_allclose(linen.apply(variables, x), module(x), rtol=1e-5, atol=1e-5)
  gl, gn = graph.trace(linen, variables, SHAPE), graph.trace(module, None, SHAPE)
  assert [sorted((_strip(m.path), m.axis, m.role) for m in g.members) for g in gl.groups] == \
      [sorted((m.path, m.axis, m.role) for m in g.members) for g in gn.groups]
  assert flops.count(linen, variables, SHAPE) == flops.count(module, None, SHAPE)
  # Hand count: conv1 8*8*12*27 + bias, conv2 4*4*16*108 + bias, fc1 256*20 + 20, head 100 + 5.
  assert gl.flops == 8 * 8 * 12 * 28 + 4 * 4 * 16 * 109 + 257 * 20 + 21 * 5


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "random"])
def test_criteria_match_closed_forms_on_both_apis(criterion):
  linen, variables, module = _twins(1)
  key = jax.random.key(3)
  gl, gn = graph.trace(linen, variables, SHAPE), graph.trace(module, None, SHAPE)
  pick = lambda g: [grp for grp in g.prunable() if criterion != "bn_scale"
                    or any(m.path.endswith("scale") for m in grp.members)]
  sl = surgery.group_scores(gl, graph.named_leaves(linen, variables), criterion, key=key,
                            groups=pick(gl))
  sn = surgery.group_scores(gn, graph.named_leaves(module, None), criterion, key=key,
                            groups=pick(gn))
  assert len(sl) == (2 if criterion == "bn_scale" else 3)
  for gid in sl:
    np.testing.assert_allclose(sl[gid], sn[gid], rtol=1e-6)
  conv1 = next(g for g in gl.groups if g.producers == ["params/conv1/kernel"])
  p = variables["params"]
  members = [p["conv1"]["kernel"], p["conv1"]["bias"], p["bn1"]["scale"], p["bn1"]["bias"]]
  consumer = np.asarray(p["conv2"]["kernel"])
  if criterion == "l1":
    want = sum(np.abs(np.asarray(a)).reshape(-1, 12).sum(0) for a in members)
    want += np.abs(consumer).sum((0, 1, 3))
  elif criterion == "l2":
    want = np.sqrt(sum((np.asarray(a) ** 2).reshape(-1, 12).sum(0) for a in members) +
                   (consumer ** 2).sum((0, 1, 3)))
  elif criterion == "bn_scale":
    want = np.abs(np.asarray(p["bn1"]["scale"]))
  else:
    want = sl[conv1.id]
    assert np.unique(want).size == 12 and 0 <= want.min() and want.max() < 1
  np.testing.assert_allclose(sl[conv1.id], want, rtol=1e-5)


def test_taylor_scores_are_weight_times_gradient():
  linen, variables, _ = _twins(2)
  x = jax.random.normal(jax.random.key(0), (4, *SHAPE))
  labels = jnp.arange(4) % 5

  def loss(params):
    logits = linen.apply({**variables, "params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  grads = jax.grad(loss)(variables["params"])
  g = graph.trace(linen, variables, SHAPE)
  scores = surgery.group_scores(g, graph.named_leaves(linen, variables), "taylor", grads=grads)
  hidden = next(grp for grp in g.groups if grp.producers == ["params/fc1/kernel"])
  p = variables["params"]
  want = (np.abs((np.asarray(p["fc1"]["kernel"]) * np.asarray(grads["fc1"]["kernel"])).sum(0))
          + np.abs(np.asarray(p["fc1"]["bias"]) * np.asarray(grads["fc1"]["bias"]))
          + np.abs((np.asarray(p["head"]["kernel"]) * np.asarray(grads["head"]["kernel"])).sum(1)))
  np.testing.assert_allclose(scores[hidden.id], want, rtol=1e-4)
  with pytest.raises(UserError, match="grads"):
    surgery.group_scores(g, graph.named_leaves(linen, variables), "taylor")


@pytest.mark.parametrize("global_ranking", [False, True])
@pytest.mark.parametrize("round_to", [1, 4])
def test_prune_to_meets_the_flops_target_on_both_apis(global_ranking, round_to):
  linen, variables, module = _twins(4)
  ratio = float(np.random.default_rng(round_to).uniform(0.35, 0.6))
  small_l, info_l = surgery.prune_to(linen, variables, SHAPE, flops_ratio=ratio,
                                     global_ranking=global_ranking, round_to=round_to)
  small_n, info_n = surgery.prune_to(module, None, SHAPE, flops_ratio=ratio,
                                     global_ranking=global_ranking, round_to=round_to)
  assert {k: v.tolist() for k, v in info_l["keep"].items()} == \
      {k: v.tolist() for k, v in info_n["keep"].items()}
  assert info_l["after"]["flops"] <= ratio * info_l["before"]["flops"]
  assert flops.count(small_l.model, small_l.variables, SHAPE) == info_l["after"]
  assert flops.count(small_n.model, None, SHAPE) == info_n["after"]
  g = info_l["graph"]
  for gid, kept in info_l["keep"].items():
    assert kept.size == g.groups[gid].width or kept.size % round_to == 0
  x = jax.random.normal(jax.random.key(5), (2, *SHAPE))
  np.testing.assert_allclose(small_l.model.apply(small_l.variables, x), small_n.model(x),
                             rtol=1e-4, atol=1e-4)
  if not global_ranking:  # local: every group keeps the same share, its largest-L1 channels
    scores = surgery.group_scores(g, graph.named_leaves(linen, variables), "l1")
    for gid, kept in info_l["keep"].items():
      best = np.sort(np.argsort(-scores[gid])[:kept.size])
      np.testing.assert_array_equal(kept, best)


def test_impossible_and_missing_targets_are_one_line_errors():
  linen, variables, _ = _twins(0)
  with pytest.raises(UserError, match="cannot reach flops_ratio=0.001"):
    surgery.prune_to(linen, variables, SHAPE, flops_ratio=0.001)
  with pytest.raises(UserError, match="exactly one target"):
    surgery.prune_to(linen, variables, SHAPE)
  with pytest.raises(UserError, match="unknown importance criterion"):
    surgery.prune_to(linen, variables, SHAPE, flops_ratio=0.5, criterion="l3")
  g = graph.trace(linen, variables, SHAPE)
  hidden = next(grp for grp in g.groups if grp.producers == ["params/fc1/kernel"])
  with pytest.raises(UserError, match="no normalisation scale"):
    surgery.group_scores(g, graph.named_leaves(linen, variables), "bn_scale", groups=[hidden])


def _zero_units(tree, layer, axis, units, with_bias):
  out = jax.tree.map(np.array, tree)
  k = out[layer]["kernel"]
  index = [slice(None)] * k.ndim
  index[axis] = units
  k[tuple(index)] = 0
  if with_bias:
    out[layer]["bias"][units] = 0
  return jax.tree.map(jnp.asarray, out)


def test_prune_zeros_removes_gated_units_and_keeps_outputs():
  from jaxprune import models
  rng = np.random.default_rng(7)
  model = models.get_model("lenet5", num_classes=10)
  x = jnp.asarray(rng.normal(size=(3, 28, 28, 1)), jnp.float32)
  params = model.init(jax.random.key(7), x)["params"]
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.1, jnp.float32),
                        params)
  gone_in = np.sort(rng.choice(20, 7, replace=False))      # conv1 units: fan-in and bias gated
  gone_out = np.sort(rng.choice(500, 123, replace=False))  # fc1 units: nobody reads them
  params = _zero_units(params, "conv1", -1, gone_in, with_bias=True)
  params = _zero_units(params, "fc2", 0, gone_out, with_bias=False)
  variables = {"params": params}
  small, info = surgery.prune_zeros(model, variables, (28, 28, 1))
  shapes = {p: s for p, (_, s) in small.shapes.items()}
  assert shapes["params/conv1/kernel"][-1] == 20 - 7
  assert shapes["params/fc1/kernel"][-1] == 500 - 123
  np.testing.assert_allclose(small.model.apply(small.variables, x, train=False),
                             model.apply(variables, x, train=False), rtol=1e-5, atol=1e-5)
  assert not info["needs_fold"]


def test_prune_zeros_keeps_a_gated_unit_in_front_of_a_bn_and_says_it_needs_a_fold():
  linen, variables, module = _twins(3)
  p = dict(variables["params"])
  p = _zero_units(p, "conv1", -1, np.array([2, 5]), with_bias=True)
  variables = {**variables, "params": p}
  small, info = surgery.prune_zeros(linen, variables, SHAPE)
  assert list(info["needs_fold"].values()) == [["bn1"]]
  assert small.variables["params"]["conv1"]["kernel"].shape[-1] == 12  # kept: BN(0) != 0


def test_ista_scales_skip_residual_and_zero_init_gammas():
  from jaxprune import models

  class Block(nn.Module):  # a user's residual block with a zero-initialised last BN
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(8, (3, 3), name="stem")(x)
      y = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(
          nn.Conv(6, (3, 3), name="conv1")(x)))
      y = nn.BatchNorm(use_running_average=not train, scale_init=nn.initializers.zeros,
                       name="bn2")(nn.Conv(8, (3, 3), name="conv2")(y))
      y = nn.relu(x + y)
      z = nn.BatchNorm(use_running_average=not train, name="bn3")(nn.Conv(5, (1, 1), name="conv3")(y))
      return nn.Dense(3, name="head")(nn.relu(z).mean((1, 2)))

  block = Block()
  variables = block.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert surgery.ista_scales(block, variables, (8, 8, 3)) == ["bn1/scale", "bn3/scale"]
  model = models.cifar_resnet(8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  # jaxprune's ResNet: the BNs inside the blocks, not the residual stream's (bn_b, stem_bn).
  assert surgery.ista_scales(model, variables, (16, 16, 3)) == [
      f"stage{s}_block0/bn_a/scale" for s in range(3)]


class GatedMLP(nn.Module):
  act: str = "relu"

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(10, name="fc1")(x)
    h = nn.relu(h) if self.act == "relu" else nn.sigmoid(h)
    return nn.Dense(3, name="fc2")(h)


def _gated(act, seed):
  """A GatedMLP whose fc1 units `gone` have their fan-in and bias zeroed (AutoPrune's
  neuron mode), with random weights."""
  rng = np.random.default_rng(seed)
  model = GatedMLP(act)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 6)))
  variables = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                           variables)
  gone = np.sort(rng.choice(10, int(rng.integers(1, 6)), replace=False))
  variables = {"params": _zero_units(variables["params"], "fc1", -1, gone, with_bias=True)}
  x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  return model, variables, gone, x


@pytest.mark.parametrize("seed", [0, 1])
def test_prune_zeros_is_shrink_without_the_fold(seed):
  """relu(0) = 0: the gated units read as 0, so prune_zeros and shrink remove the same
  ones; sigmoid(0) = 1/2: only shrink (which folds 1/2 * W into fc2's bias) removes them,
  prune_zeros keeps them and names the layer that needs the fold. Both equal the gated
  network."""
  for act in ("relu", "sigmoid"):
    model, variables, gone, x = _gated(act, seed)
    want = model.apply(variables, x)
    small, info = surgery.prune_zeros(model, variables, (6,), probe=x)
    shrunk = surgery.shrink(model, variables, (6,), probe=x)
    assert shrunk.kept["fc1"].tolist() == np.setdiff1d(np.arange(10), gone).tolist()
    width = small.variables["params"]["fc1"]["kernel"].shape[-1]
    if act == "relu":
      assert width == 10 - gone.size and not info["needs_fold"]
      assert info["keep"][next(iter(info["keep"]))].tolist() == shrunk.kept["fc1"].tolist()
    else:
      assert width == 10 and list(info["needs_fold"].values()) == [["fc1"]]
    np.testing.assert_allclose(small.model.apply(small.variables, x), want, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(shrunk.model.apply(shrunk.variables, x), want, rtol=1e-5,
                               atol=1e-5)
