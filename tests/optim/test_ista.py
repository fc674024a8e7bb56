"""ISTA on batch-norm gamma: the prox kernel, the optax transform, rho_l and rescaling."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import sweep
from jaxprune import kernels, models, optim, surgery


def _rng():
  return np.random.default_rng()


def test_soft_threshold_matches_closed_form_per_channel():
  rng = _rng()
  x = rng.normal(size=(5, 7)).astype(np.float32)
  t = rng.uniform(0, 1, size=(7,)).astype(np.float32)
  want = np.sign(x) * np.maximum(np.abs(x) - t, 0)
  got = np.asarray(jax.jit(kernels.soft_threshold)(x, t))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert np.all(got[np.abs(x) <= t] == 0)  # exact zeros, not small numbers


def _params(rng):
  return {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
          "bn": {"scale": rng.normal(size=(4,)).astype(np.float32) * 0.05,
                 "bias": rng.normal(size=(4,)).astype(np.float32)},
          "bn2": {"scale": rng.normal(size=(3,)).astype(np.float32)}}


def test_ista_step_equals_closed_form_under_jit_with_schedule():
  rng = _rng()
  params = _params(rng)
  lr = optax.piecewise_constant_schedule(0.3, {1: 0.1})  # lr changes after step 0
  l1 = optax.piecewise_constant_schedule(0.2, {1: 2.0})
  rho = {"bn/scale": 1.28125, "bn2/scale": 0.671875}
  tx = optax.chain(optax.sgd(lr), optim.ista(lr, l1, rho=rho))
  state = tx.init(params)
  update = jax.jit(tx.update)
  p = jax.tree.map(np.asarray, params)
  for step in range(2):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), p)
    updates, state = update(grads, state, p)
    new = jax.device_get(optax.apply_updates(p, updates))
    lr_t, l1_t = float(lr(step)), float(l1(step))
    for name in ("bn", "bn2"):
      z = p[name]["scale"] - lr_t * grads[name]["scale"]
      t = lr_t * l1_t * rho[f"{name}/scale"]
      np.testing.assert_allclose(new[name]["scale"],
                                 np.sign(z) * np.maximum(np.abs(z) - t, 0), atol=1e-6)
    # Leaves outside the mask get the plain SGD step.
    np.testing.assert_allclose(new["bn"]["bias"], p["bn"]["bias"] - lr_t * grads["bn"]["bias"],
                               atol=1e-6)
    np.testing.assert_allclose(new["conv"]["kernel"],
                               p["conv"]["kernel"] - lr_t * grads["conv"]["kernel"],
                               atol=1e-6)
    p = new
  assert int(state[1].count) == 2


def test_leaves_outside_the_mask_are_untouched():
  rng = _rng()
  params = _params(rng)
  updates = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
  tx = optim.ista(0.5, 10.0, mask=r"^bn/scale$")  # a huge threshold on bn/scale only
  out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  for path in ("conv/kernel", "bn/bias", "bn2/scale"):
    a, b = path.split("/")
    np.testing.assert_array_equal(out[a][b], updates[a][b])
  new = params["bn"]["scale"] + out["bn"]["scale"]
  np.testing.assert_array_equal(new, 0.0)


def test_prox_after_momentum_is_the_documented_variant():
  rng = _rng()
  params = _params(rng)
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), optim.ista(0.1, 0.5))
  state = tx.init(params)
  p, trace = params, jax.tree.map(np.zeros_like, params)
  for _ in range(2):
    g = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), p)
    updates, state = tx.update(g, state, p)
    new = optax.apply_updates(p, updates)
    trace = jax.tree.map(lambda t, gi: 0.9 * t + gi, trace, g)
    z = p["bn"]["scale"] - 0.1 * trace["bn"]["scale"]
    np.testing.assert_allclose(new["bn"]["scale"],
                               np.sign(z) * np.maximum(np.abs(z) - 0.05, 0), atol=1e-6)
    p = new


def test_ista_errors_are_clear():
  params = _params(_rng())
  tx = optim.ista(0.1, 0.1)
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(params, tx.init(params))
  tx = optim.ista(0.1, 0.1, rho={"bn/scale": 1.0}, mask=r"scale$")
  with pytest.raises(ValueError, match="no penalty for the selected leaf 'bn2/scale'"):
    tx.update(params, tx.init(params), params)


def test_ista_in_an_nnx_optimizer_zeroes_small_gammas():
  nnx = pytest.importorskip("flax.nnx")

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.bn1 = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
      return jax.nn.relu(self.bn1(self.conv(x))).mean()

  net = Net(nnx.Rngs(0))
  net.bn1.scale[...] = jnp.array([0.05, 1.0, -0.02, 0.5])
  tx = optax.chain(optax.sgd(0.0), optim.ista(0.1, 1.0, mask=r"bn\d/scale$"))
  optimizer = nnx.Optimizer(net, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: m(jnp.ones((2, 5, 5, 3))))(net)
  optimizer.update(net, grads)
  np.testing.assert_allclose(net.bn1.scale[...], [0.0, 0.9, 0.0, 0.4], atol=1e-6)


def test_rho_of_resnet20_equals_the_reference():
  model = models.cifar_resnet(20)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, 32, 32, 3)), train=False))
  rho = surgery.ista_rho(model, variables, (32, 32, 3))
  assert len(rho) == 9 and all(k.endswith("/bn_a/scale") for k in rho)
  want = {0: (1.28125, 1.28125), 1: (0.671875, 0.8125), 2: (0.90625, 1.1875)}
  for s, (first, other) in want.items():
    assert rho[f"stage{s}_block0/bn_a/scale"] == first
    for b in (1, 2):
      assert rho[f"stage{s}_block{b}/bn_a/scale"] == other


def test_rho_of_the_convnet_counts_flattened_consumers():
  model = models.convnet()
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, 32, 32, 3)), train=False))
  rho = surgery.ista_rho(model, variables, (32, 32, 3))
  area = 32 * 32
  assert rho["bn1/scale"] == (32 * 32 + 25 * 3 + 25 * 192) / area
  assert rho["bn2/scale"] == (16 * 16 + 25 * 96 + 9 * 192) / area
  assert rho["bn3/scale"] == (8 * 8 + 9 * 192 + 16 * 384) / area  # 4x4 positions into fc1


def _random_bn(variables, rng):
  """Random gammas, betas and running statistics: BN is no longer the identity."""
  variables = jax.tree.map(np.array, variables)

  def walk(p, s):
    for k, node in p.items():
      if isinstance(node, dict) and "scale" in node:
        c = node["scale"].shape[0]
        node["scale"] = rng.normal(size=c).astype(np.float32)
        node["bias"] = rng.normal(size=c).astype(np.float32) * 0.5
        s[k]["mean"] = rng.normal(size=c).astype(np.float32) * 0.1
        s[k]["var"] = rng.uniform(0.5, 2, size=c).astype(np.float32)
      elif isinstance(node, dict):
        walk(node, s.get(k, {}))
  walk(variables["params"], variables["batch_stats"])
  return variables


@pytest.mark.parametrize("name", sweep(["resnet", "convnet"], {"convnet"}))
def test_gamma_w_rescaling_preserves_outputs_and_undoes(name):
  rng = _rng()
  model = (models.cifar_resnet(8) if name == "resnet"
           else models.convnet(features=(8, 12, 10), hidden=(16,)))
  variables = _random_bn(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                    train=False), rng)
  x = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  scales = surgery.ista_scales(model, variables, (32, 32, 3))
  alpha = {k: float(rng.uniform(0.1, 3)) for k in scales}
  scaled = surgery.rescale_gamma(model, variables, alpha, (32, 32, 3))
  some = scales[0].split("/")
  before, after = variables["params"], scaled["params"]
  for part in some[:-1]:
    before, after = before[part], after[part]
  assert not np.allclose(before["scale"], after["scale"])
  ref = model.apply(variables, x, train=False)
  np.testing.assert_allclose(model.apply(scaled, x, train=False), ref,
                             rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
  undone = surgery.rescale_gamma(model, scaled, {k: 1 / a for k, a in alpha.items()},
                                 (32, 32, 3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               undone["params"], jax.tree.map(np.asarray, variables["params"]))
