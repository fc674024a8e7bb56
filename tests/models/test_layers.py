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


def _conv_jaxpr(module, variables, x):
  return str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2)))(variables))


def test_stock_choice_runs_the_stock_computation_and_auto_follows_the_backend():
  """layers.use: "stock" makes Conv exactly nn.Conv (the same gradient program) and
  max_pool nn.max_pool (same gradient, ties to the first maximum); "auto" is the
  XLA:CPU-tuned set on the CPU backend; the variables do not depend on the choice."""
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  kwargs = dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  stock, fast = nn.Conv(**kwargs), layers.Conv(**kwargs)
  variables = stock.init(jax.random.key(int(rng.integers(1 << 30))), x)
  assert layers.choice() == "auto"
  try:
    assert layers.use("auto") == ("jaxprune" if jax.default_backend() == "cpu" else "stock")
    # the tuned backward: sub-pixel phases (4 small convs) instead of one dilated conv
    assert _conv_jaxpr(fast, variables, x) != _conv_jaxpr(stock, variables, x)
    assert layers.use("stock") == "stock" and layers.active() == "stock"
    assert _conv_jaxpr(fast, variables, x) == _conv_jaxpr(stock, variables, x)
    assert jax.tree.structure(fast.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    tied = jnp.ones((1, 4, 4, 1))  # ties: stock gives the gradient to one maximum
    g_stock = jax.grad(lambda a: jnp.sum(layers.max_pool(a, 2)))(tied)
    np.testing.assert_array_equal(
        g_stock, jax.grad(lambda a: jnp.sum(nn.max_pool(a, (2, 2), strides=(2, 2))))(tied))
    # BatchNorm: nn.BatchNorm's own computation, in train and eval mode.
    bn_kw = dict(momentum=0.9, epsilon=1e-5)
    xb = jnp.asarray(rng.normal(size=(4, 3, 3, 5)) * 2 + 1, jnp.float32)
    bn_vars = nn.BatchNorm(use_running_average=False, **bn_kw).init(jax.random.key(0), xb)
    for train in (True, False):
      ours, theirs = (m(use_running_average=not train, **bn_kw) for m in
                      (layers.BatchNorm, nn.BatchNorm))
      a = ours.apply(bn_vars, xb, mutable=["batch_stats"])
      b = theirs.apply(bn_vars, xb, mutable=["batch_stats"])
      jax.tree.map(np.testing.assert_array_equal, a, b)
    layers.use("jaxprune")
    g_fast = jax.grad(lambda a: jnp.sum(layers.max_pool(a, 2)))(tied)
    np.testing.assert_allclose(g_fast, np.full((1, 4, 4, 1), 0.25))  # split evenly
    with pytest.raises(layers.UserError, match="use one of auto, jaxprune, stock"):
      layers.use("fast")
  finally:
    layers.use("auto")
