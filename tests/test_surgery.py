"""Channel surgery: zero-gamma channels removed, constants folded, masked == shrunk."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import flops, models, surgery
from jaxprune.errors import UserError

SHAPE = (16, 16, 3)


def _models():
  return {"resnet8": models.cifar_resnet(8),
          "bottleneck11": models.cifar_resnet(11, block="bottleneck"),
          "convnet": models.convnet(features=(12, 16, 10), hidden=(24,))}


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _prepare(model, rng, *, zero_fraction=0.4, positive_beta=True, all_zero=None):
  """Random BN numbers, a random fraction of prunable gammas set to exactly 0."""
  v = jax.tree.map(np.array, model.init(jax.random.key(int(rng.integers(1 << 30))),
                                        jnp.zeros((1, *SHAPE)), train=False))

  def walk(p, s):
    for k, node in p.items():
      if isinstance(node, dict) and "scale" in node:
        c = node["scale"].shape[0]
        node["scale"] = rng.normal(size=c).astype(np.float32)
        beta = np.abs(rng.normal(size=c)) * 0.5
        node["bias"] = (beta if positive_beta else -beta).astype(np.float32)
        s[k]["mean"] = rng.normal(size=c).astype(np.float32) * 0.1
        s[k]["var"] = rng.uniform(0.5, 2, size=c).astype(np.float32)
      elif isinstance(node, dict):
        walk(node, s.get(k, {}))
  walk(v["params"], v["batch_stats"])
  for path in surgery.prunable_scales(model):
    bn = _get(v["params"], path.rsplit("/", 1)[0])
    zero = rng.random(bn["scale"].shape) < zero_fraction
    if all_zero is not None and path.startswith(all_zero):
      zero[:] = True
    bn["scale"] = np.where(zero, 0, bn["scale"]).astype(np.float32)
  return v


def _probe(rng, n=4):
  return rng.normal(size=(n, *SHAPE)).astype(np.float32)


@pytest.mark.parametrize("name", ["resnet8", "bottleneck11", "convnet"])
def test_shrunk_equals_masked_exactly_when_removed_channels_output_zero(name):
  # beta <= 0: a zero-gamma channel outputs relu(beta) = 0, nothing to fold, so the
  # smaller network must match everywhere, borders included.
  rng = np.random.default_rng()
  model = _models()[name]
  v = _prepare(model, rng, positive_beta=False)
  small = surgery.shrink(model, v, SHAPE)
  assert 0 < small.removed_fraction < 1
  for conv, idx in small.kept.items():
    gamma = _get(v["params"], conv.replace("conv", "bn"))["scale"]
    np.testing.assert_array_equal(idx, np.flatnonzero(gamma))
  x = _probe(rng)
  ref = np.asarray(model.apply(v, x, train=False))
  out = np.asarray(small.model.apply(small.variables, x, train=False))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["resnet8", "bottleneck11", "convnet"])
def test_folded_constants_make_interior_pixels_equal(name):
  rng = np.random.default_rng()
  model = _models()[name]
  v = _prepare(model, rng, positive_beta=True)
  small = surgery.shrink(model, v, SHAPE)
  report = surgery.check_equivalence(model, v, small, _probe(rng))
  print(name, report)  # the border difference, measured (pytest -s shows it)
  assert report["interior_max_abs_diff"] <= 2e-5 * report["activation_max_abs"]
  assert report["border_max_abs_diff"] > 1e-3  # padding meets relu(beta) > 0
  # Without the fold the interior is wrong too: the fold is what makes it exact.
  unfolded = surgery.shrink(model, v, SHAPE, fold_constants=False)
  worse = surgery.check_equivalence(model, v, unfolded, _probe(rng))
  assert worse["interior_max_abs_diff"] > 1e-3


def test_shrunk_network_has_explicit_smaller_widths_and_counts():
  rng = np.random.default_rng()
  model = models.cifar_resnet(8)
  v = _prepare(model, rng)
  small = surgery.shrink(model, v, SHAPE)
  for unit in small.units:
    if unit.prunable:
      assert small.model.widths[unit.width_index] == max(small.widths_after[unit.conv], 1)
  # Only conv_a widths change: the residual stream keeps its channels.
  changed = [i for i, (a, b) in enumerate(zip(model.widths, small.model.widths)) if a != b]
  assert set(changed) <= {u.width_index for u in small.units if u.prunable}
  before = flops.count(model, v, SHAPE)
  after = flops.count(small.model, small.variables, SHAPE)
  assert after["params"] < before["params"] and after["flops"] < before["flops"]


def test_a_resnet_block_whose_gammas_all_reach_zero_keeps_a_placeholder():
  rng = np.random.default_rng()
  model = models.cifar_resnet(8)
  v = _prepare(model, rng, all_zero="stage1_block0/bn_a")
  small = surgery.shrink(model, v, SHAPE)
  assert small.widths_after["stage1_block0/conv_a"] == 0
  assert small.model.widths[small.units[2].width_index] == 1  # the placeholder
  report = surgery.check_equivalence(model, v, small, _probe(rng))
  assert report["interior_max_abs_diff"] <= 2e-5 * report["activation_max_abs"]


def test_an_all_zero_layer_in_a_plain_stack_removes_dead_channels_recursively():
  # bn2 all zero: conv3's filters read nothing (constant, folded into fc1) and no
  # surviving filter reads conv1, so every conv unit goes.
  rng = np.random.default_rng()
  model = _models()["convnet"]
  v = _prepare(model, rng, positive_beta=False, all_zero="bn2")
  small = surgery.shrink(model, v, SHAPE)
  assert small.widths_after == {"conv1": 0, "conv2": 0, "conv3": 0}
  assert small.rounds >= 2
  x = _probe(rng)
  ref = np.asarray(model.apply(v, x, train=False))
  out = np.asarray(small.model.apply(small.variables, x, train=False))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * max(np.abs(ref).max(), 1))
  np.testing.assert_allclose(ref, ref[:1].repeat(len(ref), 0), atol=1e-5)  # constant net


def test_surgery_rejects_models_it_does_not_understand():
  with pytest.raises(UserError, match="understands ResNet and ConvNet"):
    surgery.structure(models.lenet5())
