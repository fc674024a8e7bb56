"""Tests for jaxprune.models: shapes, counts, shortcuts, released shapes."""

import functools
import json
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_shared

from jaxprune import flops
from jaxprune import models
from jaxprune.errors import UserError

SHAPES_JSON = (Path(__file__).resolve().parents[2].parent / "shared" /
               "reference" / "tas_released_shapes.json")


@pytest.fixture(scope="module")
def small_resnet():
  """A ResNet-20 cut to blocks [1, 1, 2], initialised once for this module."""
  model = models.cifar_resnet(20, blocks=[1, 1, 2])
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3)) * 3 + 1
  variables = jax.jit(model.init)(jax.random.key(0), x)
  return model, variables, x


def _released_shapes():
  require_shared(SHAPES_JSON)
  shapes = json.loads(SHAPES_JSON.read_text())
  return {k: v for k, v in shapes.items() if not k.startswith("_")}


def _abstract_init(model, input_shape):
  return jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1,) + tuple(input_shape)))


def _apply(model, variables, x, **kwargs):
  # Jitted: eager Flax runs compile every op of the network one by one.
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


def _n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# Independent slow reference: walk a TAS shape conv by conv (tas.md §1, §5).
def _reference_counts(xchannels, xblocks, block, num_classes, layout="cifar",
                      image=32):
  """Returns (params, flops) of the network described by a released shape."""
  convs_per_block = 2 if block == "basic" else 3
  kernels = [3, 3] if block == "basic" else [1, 3, 1]
  stride_conv = 0 if block == "basic" else 1
  n_stages = 3 if layout == "cifar" else 4
  n_blocks = (len(xchannels) - 2) // convs_per_block  # full-depth blocks
  if layout == "cifar":
    full = [n_blocks // 3] * 3
  else:
    full = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[len(xchannels)]
  params = flops_ = 0

  def conv(cin, cout, k, hw, bn):
    nonlocal params, flops_
    params += k * k * cin * cout + (2 * cout if bn else 0)
    flops_ += k * k * cin * cout * hw * hw

  if layout == "cifar":
    hw = image
    conv(3, xchannels[1], 3, hw, True)
  else:
    hw = image // 2
    conv(3, xchannels[1], 7, hw, True)
    hw //= 2  # max pool
  cin = xchannels[1]
  index = 2
  for s in range(n_stages):
    for b in range(full[s]):
      widths = xchannels[index:index + convs_per_block]
      index += convs_per_block
      if b >= xblocks[s]:
        continue
      stride = 2 if (s > 0 and b == 0) else 1
      block_in, block_hw = cin, hw
      for i, (w, k) in enumerate(zip(widths, kernels)):
        if i == stride_conv:
          hw //= stride
        conv(cin, w, k, hw, True)
        cin = w
      if stride == 2 or block_in != cin:
        if layout == "imagenet":
          conv(block_in, cin, 1, hw, True)
        elif stride == 2:
          conv(block_in, cin, 1, hw, False)  # after the 2x2 average pool
        else:
          conv(block_in, cin, 1, block_hw, block == "basic")
  params += cin * num_classes + num_classes
  flops_ += cin * num_classes + num_classes
  return params, flops_


def _standard_shape(depth, layout="cifar"):
  return [3] + models.default_widths(depth, layout), models.default_blocks(
      depth, layout)


def test_cifar_resnet_forward_gives_logits(small_resnet):
  model, variables, x = small_resnet
  logits = _apply(model, variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_cifar_resnet20_output_shape_and_param_count():
  model = models.cifar_resnet(20)
  variables = _abstract_init(model, (32, 32, 3))
  logits = jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, 3)))
  assert logits.shape == (2, 10)
  expected, _ = _reference_counts(*_standard_shape(20), "basic", 10)
  assert _n_params(variables["params"]) == expected
  assert round(expected / 1e6, 2) == 0.27


@pytest.mark.parametrize("depth", [32, 56, 110, 164])
def test_cifar_resnet_param_count_matches_reference(depth):
  model = models.cifar_resnet(depth, 100)
  variables = _abstract_init(model, (32, 32, 3))
  block = "bottleneck" if depth == 164 else "basic"
  expected, _ = _reference_counts(*_standard_shape(depth), block, 100)
  assert _n_params(variables["params"]) == expected


def test_bottleneck_resnet_output_shape():
  # Shapes only: the basic-block forward is computed in the tests above.
  model = models.cifar_resnet(164, 10, blocks=[1, 1, 1])
  x = jnp.zeros((2, 16, 16, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 10)


@pytest.mark.parametrize("depth,params", [(18, 11_689_512), (50, 25_557_032)])
def test_imagenet_resnet_matches_torchvision_param_count(depth, params):
  model = models.imagenet_resnet(depth)
  variables = _abstract_init(model, (224, 224, 3))
  assert _n_params(variables["params"]) == params
  block = "basic" if depth == 18 else "bottleneck"
  expected, _ = _reference_counts(*_standard_shape(depth, "imagenet"), block,
                                  1000, layout="imagenet", image=224)
  assert params == expected
  out = jax.eval_shape(model.apply, variables, jnp.zeros((2, 224, 224, 3)))
  assert out.shape == (2, 1000)


def test_imagenet_resnet18_runs_on_small_input():
  model = models.imagenet_resnet(18, 7, blocks=[1, 1, 1, 1])
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert _apply(model, variables, x).shape == (2, 7)


def test_lenets_output_shapes_and_param_counts():
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  lenet5 = models.lenet5()
  variables = jax.jit(lenet5.init)(jax.random.key(0), x)
  assert _apply(lenet5, variables, x, train=True).shape == (2, 10)
  expected = (25 * 20 + 20) + (25 * 20 * 50 + 50) + (4 * 4 * 50 * 500 + 500) + (
      500 * 10 + 10)
  assert _n_params(variables["params"]) == expected == 431_080

  mlp = models.lenet300_100()
  variables = jax.jit(mlp.init)(jax.random.key(0), x)
  assert _apply(mlp, variables, x).shape == (2, 10)
  expected = (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)
  assert _n_params(variables["params"]) == expected == 266_610


def test_lenet_explicit_features_build_pruned_variant():
  x = jnp.zeros((2, 28, 28, 1))
  model = models.lenet5(features=(6, 11, 40))
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert params["conv2"]["kernel"].shape == (5, 5, 6, 11)
  assert params["fc1"]["kernel"].shape == (4 * 4 * 11, 40)
  params = jax.eval_shape(models.lenet300_100(features=(30, 7)).init,
                          jax.random.key(0), x)["params"]
  assert params["fc2"]["kernel"].shape == (30, 7)
  with pytest.raises(UserError):
    models.lenet5(features=(20, 50))


def test_batch_norm_statistics_update_only_in_train_mode(small_resnet):
  model, variables, x = small_resnet
  stats = variables["batch_stats"]

  _, updated = _apply(model, variables, x, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), stats,
                         updated["batch_stats"])
  assert all(jax.tree.leaves(changed))

  _, unchanged = _apply(model, variables, x, train=False,
                        mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, stats, unchanged["batch_stats"])


def test_train_mode_normalises_with_batch_statistics(small_resnet):
  model, variables, x = small_resnet
  eval_logits = _apply(model, variables, x, train=False)
  train_logits, _ = _apply(model, variables, x, train=True,
                           mutable=["batch_stats"])
  assert not np.allclose(eval_logits, train_logits)


def test_compute_dtype_keeps_float32_params():
  model = models.cifar_resnet(20, blocks=[1, 1, 1], dtype=jnp.bfloat16)
  x = jnp.ones((2, 8, 8, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(model.apply, variables, x).dtype == jnp.float32


def test_initialisation_follows_tas(small_resnet):
  params = small_resnet[1]["params"]
  head = params["classifier"]
  np.testing.assert_array_equal(head["bias"], 0)
  assert abs(float(jnp.std(head["kernel"])) - 0.01) < 0.002
  bn = params["stage2_block0"]["bn_b"]
  np.testing.assert_array_equal(bn["scale"], 1)
  np.testing.assert_array_equal(bn["bias"], 0)
  # Kaiming fan_out: std = sqrt(2 / (k*k*out)) for a 3x3 conv to 64 channels.
  kernel = params["stage2_block1"]["conv_a"]["kernel"]
  assert abs(float(jnp.std(kernel)) / np.sqrt(2 / (9 * 64)) - 1) < 0.05
  assert "bias" not in params["stage2_block1"]["conv_a"]


def _shortcut_parts(params, block):
  return {k for k in params[block] if k.startswith("shortcut")}


def test_shortcut_rule_basic_blocks():
  widths = models.default_widths(20)
  widths[2] = 12  # stage 0, block 0, conv_b: 16 -> 12, stride 1
  model = models.cifar_resnet(20, widths=widths)
  params = _abstract_init(model, (32, 32, 3))["params"]
  # Stride-1 channel change: 1x1 conv + BN.
  assert _shortcut_parts(params, "stage0_block0") == {"shortcut_conv",
                                                      "shortcut_bn"}
  # Block 1 reads 12 channels and writes 16: again a conv + BN shortcut.
  assert params["stage0_block1"]["shortcut_conv"]["kernel"].shape == (1, 1, 12,
                                                                      16)
  assert _shortcut_parts(params, "stage0_block2") == set()  # identity
  # Stride 2: average pool + 1x1 conv, no BN.
  assert _shortcut_parts(params, "stage1_block0") == {"shortcut_conv"}
  assert _shortcut_parts(params, "stage2_block0") == {"shortcut_conv"}


def test_shortcut_rule_bottleneck_blocks():
  model = models.cifar_resnet(164, blocks=[2, 1, 1])
  params = _abstract_init(model, (32, 32, 3))["params"]
  # 16 -> 64 at stride 1: 1x1 conv without BN in bottleneck blocks.
  assert _shortcut_parts(params, "stage0_block0") == {"shortcut_conv"}
  assert _shortcut_parts(params, "stage0_block1") == set()
  assert _shortcut_parts(params, "stage1_block0") == {"shortcut_conv"}
  assert params["stage1_block0"]["conv_b"]["kernel"].shape == (3, 3, 32, 32)
  assert params["stage1_block0"]["conv_c"]["kernel"].shape == (1, 1, 32, 128)


def test_shortcut_rule_imagenet():
  params = _abstract_init(models.imagenet_resnet(50), (64, 64, 3))["params"]
  assert _shortcut_parts(params, "stage0_block0") == {"shortcut_conv",
                                                      "shortcut_bn"}
  assert _shortcut_parts(params, "stage0_block1") == set()
  assert _shortcut_parts(params, "stage1_block0") == {"shortcut_conv",
                                                      "shortcut_bn"}
  params = _abstract_init(models.imagenet_resnet(18), (64, 64, 3))["params"]
  assert _shortcut_parts(params, "stage0_block0") == set()
  assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 64)


def test_stride_two_shortcut_average_pools_before_conv(small_resnet):
  model, variables, x = small_resnet
  _, state = _apply(model, variables, x, capture_intermediates=True)
  inter = flax.core.unfreeze(state["intermediates"])
  block_in = inter["stage0_block0"]["__call__"][0]
  shortcut = inter["stage1_block0"]["shortcut_conv"]["__call__"][0]
  kernel = variables["params"]["stage1_block0"]["shortcut_conv"]["kernel"]
  pooled = block_in.reshape(2, 4, 2, 4, 2, 16).mean(axis=(2, 4))
  np.testing.assert_allclose(shortcut, pooled @ kernel[0, 0], rtol=1e-5,
                             atol=1e-5)


def test_dropped_blocks_are_absent_and_next_stage_reads_last_kept():
  widths = models.default_widths(32)
  widths[1 + 2 * 1 + 1] = 9  # stage 0, block 1, conv_b
  model = models.cifar_resnet(32, widths=widths, blocks=[2, 5, 1])
  params = _abstract_init(model, (32, 32, 3))["params"]
  stage_blocks = sorted(k for k in params if k.startswith("stage"))
  assert [k for k in stage_blocks if k.startswith("stage0")] == [
      "stage0_block0", "stage0_block1"]
  assert [k for k in stage_blocks if k.startswith("stage2")] == [
      "stage2_block0"]
  assert params["stage1_block0"]["conv_a"]["kernel"].shape == (3, 3, 9, 32)
  assert params["classifier"]["kernel"].shape == (64, 10)


# Full-depth and depth-pruned, basic and bottleneck; tracing all twelve shapes
# would only repeat these cases at several seconds each.
@pytest.mark.parametrize("name", ["C010-ResNet20", "C100-ResNet32",
                                  "C010-ResNet56", "C100-ResNet110",
                                  "C010-ResNet164"])
def test_released_cifar_shape_builds_with_reference_flops_and_params(name):
  shape = _released_shapes()[name]
  classes = shape["class_num"]
  model = models.cifar_resnet_from_shape(shape["xchannels"], shape["xblocks"],
                                         classes)
  variables = _abstract_init(model, (32, 32, 3))
  counted = flops.count(model, variables, (32, 32, 3))
  block = "bottleneck" if shape["module"] == "ResNetBottleneck" else "basic"
  ref_params, ref_flops = _reference_counts(shape["xchannels"],
                                            shape["xblocks"], block, classes)
  assert counted == {"flops": ref_flops, "params": ref_params}
  if list(shape["xblocks"]) == models.default_blocks(shape["depth"],
                                                     block=block):
    # Full-depth shapes: the authors' estimate (no classifier bias) agrees.
    assert round((ref_flops - classes) / 1e6, 2) == round(
        shape["estimated_FLOP"], 2)


@pytest.mark.parametrize("name", ["ImageNet-ResNet18V1", "ImageNet-ResNet50V1"])
def test_released_imagenet_shape_matches_reference(name):
  shape = _released_shapes()[name]
  model = models.imagenet_resnet_from_shape(shape["xchannels"],
                                            shape["xblocks"])
  variables = _abstract_init(model, (224, 224, 3))
  block = "basic" if shape["block_name"] == "BasicBlock" else "bottleneck"
  ref = _reference_counts(shape["xchannels"], shape["xblocks"], block, 1000,
                          layout="imagenet", image=224)
  counted = flops.count(model, variables, (224, 224, 3))
  assert (counted["params"], counted["flops"]) == ref


@pytest.mark.parametrize("kwargs,match", [
    (dict(widths=[16] * 18), "19 convs"),
    (dict(widths=[16] * 20), "19 convs"),
    (dict(widths=[16] * 18 + [0]), "positive"),
    (dict(widths=[16.0] * 19), "positive"),
    (dict(blocks=[3, 3]), "3 stages"),
    (dict(blocks=[3, 4, 3]), "blocks\\[1\\]"),
    (dict(blocks=[0, 3, 3]), "blocks\\[0\\]"),
])
def test_bad_shapes_raise_user_error(kwargs, match):
  with pytest.raises(UserError, match=match):
    models.cifar_resnet(20, **kwargs)


def test_bad_depths_raise_user_error():
  with pytest.raises(UserError, match="6n \\+ 2"):
    models.cifar_resnet(21)
  with pytest.raises(UserError, match="9n \\+ 2"):
    models.cifar_resnet(32, block="bottleneck")
  with pytest.raises(UserError, match="18, 34, 50"):
    models.imagenet_resnet(20)
  with pytest.raises(UserError, match="input channels"):
    models.cifar_resnet_from_shape([16] * 20, [3, 3, 3])


def test_default_widths_and_blocks():
  assert models.default_widths(20) == [16] + [16] * 6 + [32] * 6 + [64] * 6
  assert models.default_blocks(110) == [18, 18, 18]
  assert models.default_blocks(164) == [18, 18, 18]
  assert models.default_widths(164)[1:4] == [16, 16, 64]
  assert models.default_blocks(50, "imagenet") == [3, 4, 6, 3]
  assert len(models.default_widths(50, "imagenet")) == 49


def test_get_model_builds_by_name_and_rejects_bad_input():
  model = models.get_model("cifar_resnet", 100, depth=56)
  assert model.num_classes == 100 and model.full_depths == (9, 9, 9)
  assert models.get_model("lenet5", 10).num_classes == 10
  assert isinstance(models.get_model("imagenet_resnet", 10, depth=18),
                    models.ResNet)
  assert models.get_model("lenet300_100", 10, features=(10, 5)).features == (
      10, 5)
  with pytest.raises(UserError, match=", ".join(sorted(models.MODELS))):
    models.get_model("vgg", 10)  # the message lists every registered name
  with pytest.raises(UserError, match="lenet5"):
    models.get_model("lenet5", 10, depth=5)
  with pytest.raises(UserError, match="cifar_resnet"):
    models.get_model("cifar_resnet", 10)  # depth missing
