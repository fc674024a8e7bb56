"""Tests for jaxprune.flops: the TAS numbers and hand-counted toy models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxprune import flops
from jaxprune import models


def _abstract_init(model, input_shape, **kwargs):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1,) + input_shape),
                         **kwargs))


@pytest.mark.parametrize("depth,mflops", [(20, 40.81), (32, 69.12),
                                          (56, 125.75), (110, 253.15),
                                          (164, 247.65)])
def test_cifar10_resnet_flops_match_tas(depth, mflops):
  # tas.md §5: the official counter's numbers for the base networks.
  model = models.cifar_resnet(depth, 10)
  variables = _abstract_init(model, (32, 32, 3))
  assert round(flops.count(model, variables, (32, 32, 3))["flops"] / 1e6,
               2) == mflops


class Toy(nn.Module):
  """Conv with bias, grouped strided conv without bias, dense with bias."""

  @nn.compact
  def __call__(self, x):  # No `train` argument on purpose.
    x = nn.Conv(8, (3, 3), padding="SAME", name="conv")(x)
    x = nn.relu(x)
    x = nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME",
                feature_group_count=2, use_bias=False, name="grouped")(x)
    x = nn.BatchNorm(use_running_average=True, name="bn")(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(5, name="head")(x)


def _toy_reference():
  conv = 10 * 12 * 8 * (3 * 3 * 4) + 10 * 12 * 8  # MACs + bias adds
  grouped = 5 * 6 * 6 * (3 * 3 * 8 // 2)  # C_in / groups, no bias
  head = (5 * 6 * 6) * 5 + 5
  params = (3 * 3 * 4 * 8 + 8) + (3 * 3 * 4 * 6) + 2 * 6 + (180 * 5 + 5)
  return conv, grouped, head, params


def test_toy_model_matches_hand_formulas():
  model = Toy()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 10, 12, 4)))
  conv, grouped, head, params = _toy_reference()
  assert flops.count(model, variables, (10, 12, 4)) == {
      "flops": conv + grouped + head, "params": params}

  layers = flops.count_layers(model, variables, (10, 12, 4))
  assert [(l["name"], l["kind"], l["flops"]) for l in layers] == [
      ("conv", "conv", conv), ("grouped", "conv", grouped),
      ("head", "dense", head)]
  assert layers[1]["in_shape"] == (1, 10, 12, 8)
  assert layers[1]["out_shape"] == (1, 5, 6, 6)
  assert layers[1]["kernel_shape"] == (3, 3, 4, 6)
  assert layers[1]["bias_adds"] == 0 and layers[2]["bias_adds"] == 5


def test_kernel_shapes_match_params():
  model = Toy()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 10, 12, 4)))
  for layer in flops.count_layers(model, variables, (10, 12, 4)):
    assert layer["kernel_shape"] == variables["params"][layer["name"]][
        "kernel"].shape


def test_input_shape_with_or_without_batch_axis():
  model = Toy()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 10, 12, 4)))
  assert flops.count(model, variables, (10, 12, 4)) == flops.count(
      model, variables, (1, 10, 12, 4))
  resnet = models.cifar_resnet(20, blocks=[1, 1, 1])
  variables = _abstract_init(resnet, (32, 32, 3))
  assert flops.count(resnet, variables, (32, 32, 3)) == flops.count(
      resnet, variables, [1, 32, 32, 3])


def test_lenet5_flops_by_hand():
  model = models.lenet5()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  expected = (24 * 24 * 20 * 25 + 24 * 24 * 20) + (
      8 * 8 * 50 * 25 * 20 + 8 * 8 * 50) + (800 * 500 + 500) + (500 * 10 + 10)
  assert flops.count(model, variables, (28, 28, 1))["flops"] == expected


def test_dense_subclass_calling_super_counts_once():

  class ScaledDense(nn.Dense):

    def __call__(self, x):
      return 2 * super().__call__(x)

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train: bool = False):
      del train
      return ScaledDense(3, use_bias=False, name="dense")(x)

  model = Net()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 7)))
  assert flops.count(model, variables, (7,)) == {"flops": 21, "params": 21}


def test_shared_layer_called_twice_counts_twice():

  class Twice(nn.Module):

    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(4, name="dense")
      return dense(dense(x))

  model = Twice()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  assert flops.count(model, variables, (4,)) == {"flops": 2 * (16 + 4),
                                                 "params": 20}
