"""The fast drop-in layers equal the stock Flax layers (values, gradients, stats)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models import layers

CASES = [  # (input HW, kernel, stride, padding)
    (8, 3, 1, ((1, 1), (1, 1))),
    (8, 3, 2, ((1, 1), (1, 1))),   # the sub-pixel-phase input gradient
    (7, 3, 2, ((1, 1), (1, 1))),   # odd size: generic backward
    (8, 1, 2, ((0, 0), (0, 0))),
    (12, 5, 1, "VALID"),           # LeNet-5
    (8, 3, 1, "SAME"),
    (9, 2, 2, ((0, 1), (0, 1))),   # asymmetric padding: lax fallback
]


@pytest.mark.parametrize("hw,k,stride,padding", CASES)
def test_conv_matches_nn_conv_values_and_gradients(hw, k, stride, padding):
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(3, hw, hw, 5)), jnp.float32)
  kwargs = dict(features=6, kernel_size=(k, k), strides=(stride, stride), padding=padding)
  stock, fast = nn.Conv(**kwargs), layers.Conv(**kwargs)
  variables = stock.init(jax.random.key(int(rng.integers(1 << 30))), x)
  y0 = stock.apply(variables, x)
  cot = jnp.asarray(rng.normal(size=y0.shape), jnp.float32)

  def loss(module):
    return lambda v, x_: jnp.sum(module.apply(v, x_) * cot)

  np.testing.assert_allclose(fast.apply(variables, x), y0, rtol=1e-5, atol=1e-5)
  g0 = jax.jit(jax.grad(loss(stock), (0, 1)))(variables, x)
  g1 = jax.jit(jax.grad(loss(fast), (0, 1)))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g1, g0)


def test_batch_norm_matches_nn_batch_norm_in_train_and_eval():
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(4, 5, 5, 7)) * 3 + 1, jnp.float32)
  cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  stock = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  fast = layers.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  variables = stock.init(jax.random.key(0), x)
  variables = {"params": jax.tree.map(lambda p: p + rng.normal(size=p.shape), variables["params"]),
               "batch_stats": variables["batch_stats"]}
  assert jax.tree.structure(fast.init(jax.random.key(0), x)) == jax.tree.structure(variables)

  def loss(module):
    def f(params, x_):
      y, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x_,
                            mutable=["batch_stats"])
      return jnp.sum(y * cot), upd
    return f

  (l0, s0), g0 = jax.value_and_grad(loss(stock), (0, 1), has_aux=True)(variables["params"], x)
  (l1, s1), g1 = jax.value_and_grad(loss(fast), (0, 1), has_aux=True)(variables["params"], x)
  np.testing.assert_allclose(l1, l0, rtol=1e-4, atol=1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               (g1, s1), (g0, s0))
  stock_eval = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
  fast_eval = layers.BatchNorm(use_running_average=True, epsilon=1e-5)
  trained = {"params": variables["params"], **s0}
  np.testing.assert_allclose(fast_eval.apply(trained, x), stock_eval.apply(trained, x),
                             rtol=1e-6, atol=1e-6)


def test_max_pool_matches_nn_max_pool():
  x = jnp.asarray(np.random.default_rng().normal(size=(2, 8, 6, 3)), jnp.float32)
  np.testing.assert_array_equal(layers.max_pool(x, 2),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))
  odd = x[:, :7]
  np.testing.assert_array_equal(layers.max_pool(odd, 2),
                                nn.max_pool(odd, (2, 2), strides=(2, 2)))
