"""optim on NNX: one leaf-path convention, the same selections and numbers as Linen.

The same small CNN is written in Linen and in NNX with the same layer names and the
same weights; every optim function must give the same answer on Linen params,
``nnx.state(model, nnx.Param)`` (Variable leaves), ``nnx.as_pure`` and
``nnx.to_pure_dict`` trees.
"""
import importlib

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import optim, surgery


def _rng():
  return np.random.default_rng()


class LinenCNN(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(
        nn.Conv(4, (3, 3), name="conv1")(x)))
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn2")(
        nn.Conv(6, (3, 3), name="conv2")(x)))
    return nn.Dense(3, name="fc")(x.mean((1, 2)))


class NNXCNN(nnx.Module):

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, rngs=rngs)
    self.conv2 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(6, rngs=rngs)
    self.fc = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.fc(x.mean((1, 2)))


def _randomise(model, rng):
  """Fresh random weights and BN statistics (gammas with exact zeros) in place."""
  for _, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Variable) and jnp.issubdtype(v[...].dtype, jnp.floating):
      v[...] = jnp.asarray(rng.normal(size=v[...].shape) * 0.5, v[...].dtype)
  keep = rng.random(4) < 0.5
  keep[:2] = True, False  # some zeros, not all (all-zero: excluded by ISTA's default)
  model.bn1.scale[...] = model.bn1.scale[...] * keep
  model.bn2.var[...] = jnp.abs(model.bn2.var[...]) + 0.5
  model.bn1.var[...] = jnp.abs(model.bn1.var[...]) + 0.5


def _pair(rng):
  """(NNX model, Linen model, Linen variables) holding the same random weights."""
  model = NNXCNN(nnx.Rngs(int(rng.integers(1 << 30))))
  _randomise(model, rng)
  linen = LinenCNN()
  variables = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
               "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}
  ref = jax.eval_shape(lambda: linen.init(jax.random.key(0), jnp.zeros((1, 6, 6, 2))))
  assert jax.tree.structure(ref) == jax.tree.structure(variables)
  assert jax.tree.map(jnp.shape, ref) == jax.tree.map(jnp.shape, variables)
  return model, linen, variables


def _forms(model, variables):
  """The same parameters as every tree a user may hold."""
  state = nnx.state(model, nnx.Param)
  return {"linen": variables["params"], "nnx_state": state, "as_pure": nnx.as_pure(state),
          "to_pure_dict": nnx.to_pure_dict(state)}


def _by_path(tree):
  return {p: np.asarray(x) for p, x in optim.selection.named_leaves(tree)}


def test_leaf_paths_are_the_same_in_linen_and_nnx_trees():
  model, _, variables = _pair(_rng())
  want = ["bn1/bias", "bn1/scale", "bn2/bias", "bn2/scale", "conv1/bias", "conv1/kernel",
          "conv2/bias", "conv2/kernel", "fc/bias", "fc/kernel"]
  for name, tree in _forms(model, variables).items():
    assert sorted(optim.paths(tree)) == want, name
  # A dict key called "value" is a name, not a Variable's box.
  assert optim.paths({"value": {"value": 1.0}}) == ["value/value"]
  # Linen boxed (partitioned) params drop their box the same way.
  boxed = nn.Partitioned(jnp.zeros((2, 3)), names=("a", "b"))
  assert optim.paths({"fc": {"kernel": boxed}}) == ["fc/kernel"]


def test_select_picks_the_same_leaves_in_every_form():
  model, _, variables = _pair(_rng())
  for selector in (r"(^|/)kernel$", r"bn\d/scale$", lambda p, x: x.ndim == 1,
                   {"conv1/kernel", "fc/bias"}):
    got = {name: {p for p, m in optim.selection.named_leaves(optim.select(tree, selector)) if m}
           for name, tree in _forms(model, variables).items()}
    assert len({frozenset(v) for v in got.values()}) == 1, got
    assert got["linen"]


def test_a_selector_that_matches_nothing_is_an_error_listing_the_paths():
  model, _, variables = _pair(_rng())
  for tree in _forms(model, variables).values():
    with pytest.raises(ValueError, match=r"selects no leaf.*'bn1/scale'"):
      optim.select(tree, r"batch_norm\d/scale$")
    with pytest.raises(ValueError, match="No leaf is named 'bn9/scale'"):
      optim.select(tree, ["bn1/scale", "bn9/scale"])
  assert not any(jax.tree.leaves(optim.select(variables["params"], "nothing",
                                              allow_empty=True)))
  with pytest.raises(ValueError, match="selects no leaf"):
    optim.zero_fraction(nnx.state(model, nnx.Param), r"batch_norm\d/scale$")
  with pytest.raises(ValueError, match="selects no leaf"):
    optim.ista(0.1, 0.1, mask=r"batch_norm\d/scale$").init(nnx.state(model, nnx.Param))
  with pytest.raises(ValueError, match="selects no leaf"):
    optim.autoprune(0.1, mask=r"dense\d/kernel$").init(variables["params"])


def test_zero_fraction_counts_the_arrays_of_nnx_variables():
  rng = _rng()
  model, _, variables = _pair(rng)
  gammas = [np.asarray(model.bn1.scale[...]), np.asarray(model.bn2.scale[...])]
  want = sum(np.sum(g == 0) for g in gammas) / sum(g.size for g in gammas)
  assert want > 0
  for name, tree in _forms(model, variables).items():
    np.testing.assert_allclose(float(optim.zero_fraction(tree)), want, err_msg=name)
  k = np.asarray(model.conv1.kernel[...])
  np.testing.assert_allclose(float(optim.zero_fraction(nnx.state(model, nnx.Param),
                                                       r"conv1/kernel$")),
                             np.mean(k == 0))


def test_submodules_are_importable_by_name_and_the_factories_stay_functions():
  ap = importlib.import_module("jaxprune.optim.autoprune_lib")
  import jaxprune.optim.autoprune_lib as ap2  # pylint: disable=g-import-not-at-top
  import jaxprune.optim.ista_lib as il  # pylint: disable=g-import-not-at-top
  from jaxprune.optim import selection, sgd_lib  # pylint: disable=g-import-not-at-top
  assert ap is ap2 and callable(ap.effective_params) and callable(il.zero_fraction)
  assert callable(selection.leaf_path) and callable(sgd_lib.learning_rate_schedule)
  assert isinstance(optim.autoprune(0.1), optax.GradientTransformation)
  assert isinstance(optim.ista(0.1, 0.1), optax.GradientTransformation)
  assert optim.effective_params is ap.effective_params
  # The old module paths still resolve (deprecated) for importlib and from-imports.
  assert importlib.import_module("jaxprune.optim.autoprune") is ap
  assert importlib.import_module("jaxprune.optim.ista") is il
  from jaxprune.optim.autoprune import masks  # pylint: disable=g-import-not-at-top
  assert masks is ap.masks


def _grads_like(tree, rng):
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=jnp.shape(x)), jnp.float32), tree)


def test_ista_step_is_the_same_closed_form_on_linen_and_in_an_nnx_optimizer():
  rng = _rng()
  model, _, variables = _pair(rng)
  model.bn2.scale[...] = jnp.zeros((6,))  # a zero-initialised (residual-style) gamma
  variables["params"]["bn2"]["scale"] = np.zeros((6,), np.float32)
  lr, l1 = 0.1, float(rng.uniform(1.0, 5.0))
  tx = optax.chain(optax.sgd(lr), optim.ista(lr, l1))  # the default mask
  params = variables["params"]
  grads = _grads_like(params, rng)
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  linen_new = _by_path(optax.apply_updates(params, updates))

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx_grads = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(nnx_grads, grads)
  optimizer.update(model, nnx_grads)
  nnx_new = _by_path(nnx.state(model, nnx.Param))
  assert linen_new.keys() == nnx_new.keys()
  for p in linen_new:
    np.testing.assert_allclose(nnx_new[p], linen_new[p], atol=1e-6, err_msg=p)
  g = _by_path(grads)
  p0 = _by_path(params)
  z = p0["bn1/scale"] - lr * g["bn1/scale"]
  np.testing.assert_allclose(linen_new["bn1/scale"],
                             np.sign(z) * np.maximum(np.abs(z) - lr * l1, 0), atol=1e-6)
  # bn2's gamma was zero at init: the default leaves it out (a plain SGD step).
  np.testing.assert_allclose(linen_new["bn2/scale"], -lr * g["bn2/scale"], atol=1e-6)
  for p in ("conv1/kernel", "bn1/bias", "fc/kernel"):
    np.testing.assert_allclose(linen_new[p], p0[p] - lr * g[p], atol=1e-6)


def test_ista_default_mask_leaves_layernorm_scales_and_takes_explicit_masks():
  rng = _rng()
  params = {"LayerNorm_0": {"scale": np.ones(5, np.float32)},
            "ln1": {"scale": np.ones(5, np.float32)},
            "block/layer_norm": {"scale": np.ones(5, np.float32)},
            "bn": {"scale": rng.normal(size=5).astype(np.float32)}}
  assert {p: optim.ista_lib.is_default_scale(p) for p in optim.paths(params)} == {
      "LayerNorm_0/scale": False, "ln1/scale": False, "block/layer_norm/scale": False,
      "bn/scale": True}
  updates = _grads_like(params, rng)
  tx = optim.ista(1.0, 100.0)
  out = _by_path(tx.update(updates, tx.init(params), params)[0])
  u = _by_path(updates)
  for p in ("LayerNorm_0/scale", "ln1/scale", "block/layer_norm/scale"):
    np.testing.assert_array_equal(out[p], u[p])
  np.testing.assert_allclose(out["bn/scale"] + params["bn"]["scale"], 0.0)
  # An explicit selection (e.g. the graph's prunable gammas) is taken as given.
  tx = optim.ista(1.0, 100.0, mask=["ln1/scale"])
  out = _by_path(tx.update(updates, tx.init(params), params)[0])
  np.testing.assert_allclose(out["ln1/scale"] + 1.0, 0.0)
  np.testing.assert_array_equal(out["bn/scale"], u["bn/scale"])


def test_batchnorm_scales_are_the_same_for_linen_variables_and_nnx_models():
  model, _, variables = _pair(_rng())
  assert optim.batchnorm_scales(variables) == ["bn1/scale", "bn2/scale"]
  assert optim.batchnorm_scales(model) == ["bn1/scale", "bn2/scale"]
  assert optim.batchnorm_scales(nnx.state(model)) == ["bn1/scale", "bn2/scale"]
  with pytest.raises(ValueError, match="running statistics"):
    optim.batchnorm_scales(variables["params"])


def test_autoprune_default_mask_gives_kernels_their_own_m_on_nnx_state():
  model, _, variables = _pair(_rng())
  tx = optim.autoprune(0.1)
  want = {p: np.shape(x) if p.endswith("kernel") else () for p, x in
          _by_path(variables["params"]).items()}
  for name, tree in _forms(model, variables).items():
    m = optim.find_state(tx.init(tree)).m
    assert {p: np.shape(x) for p, x in _by_path(m).items()} == want, name
  optimizer = nnx.Optimizer(model, optax.chain(tx, optax.sgd(0.1)), wrt=nnx.Param)
  m = optim.find_state(nnx.as_pure(optimizer.opt_state)).m
  assert {p: np.shape(x) for p, x in _by_path(m).items()} == want


def test_autoprune_magnitude_m_init_is_the_scaled_weight_magnitude_in_every_form():
  rng = _rng()
  model, _, variables = _pair(rng)
  m_init = float(rng.uniform(0.05, 1.0))
  tx = optim.autoprune(0.1, m_init=m_init, m_init_rule="magnitude")
  want = {}
  for p, w in _by_path(variables["params"]).items():
    if p.endswith("kernel"):
      a = np.abs(w).astype(np.float64)
      want[p] = m_init * a / a.mean()
  for name, tree in _forms(model, variables).items():
    m = _by_path(optim.find_state(tx.init(tree)).m)
    for p, expected in want.items():
      np.testing.assert_allclose(m[p], expected, rtol=1e-5, err_msg=f"{name} {p}")
  with pytest.raises(ValueError, match="granularity='weight'"):
    optim.autoprune(0.1, m_init_rule="magnitude", granularity="neuron")
  with pytest.raises(ValueError, match="m_init_rule"):
    optim.autoprune(0.1, m_init_rule="norm")


def test_autoprune_masks_and_effective_params_agree_across_forms():
  rng = _rng()
  model, linen, variables = _pair(rng)
  tx = optim.autoprune(0.1, granularity="neuron", mask=r"conv\d/kernel$")
  state = tx.init(variables["params"])
  m = state.m
  m["conv1"]["kernel"] = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
  m["conv2"]["kernel"] = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
  state = state._replace(m=m)
  h1 = np.asarray(m["conv1"]["kernel"]) > 0
  want_eff = _by_path(variables["params"])
  want_eff["conv1/kernel"] = want_eff["conv1/kernel"] * h1
  want_eff["conv1/bias"] = want_eff["conv1/bias"] * h1  # a unit's bias goes with it
  want_eff["conv2/kernel"] = want_eff["conv2/kernel"] * (np.asarray(m["conv2"]["kernel"]) > 0)
  want_eff["conv2/bias"] = want_eff["conv2/bias"] * (np.asarray(m["conv2"]["kernel"]) > 0)
  want_kept = {"conv1/kernel": h1.mean(),
               "conv2/kernel": (np.asarray(m["conv2"]["kernel"]) > 0).mean()}
  # The state as an nnx.Optimizer holds it: Variable-boxed m.
  boxed_m = tx.init(nnx.state(model, nnx.Param)).m
  nnx.replace_by_pure_dict(boxed_m, state.m)
  boxed = state._replace(m=boxed_m)
  for sname, st in (("pure", state), ("boxed", boxed)):
    for name, tree in _forms(model, variables).items():
      got = _by_path(optim.effective_params(tree, st))
      for p in want_eff:
        np.testing.assert_allclose(got[p], want_eff[p], err_msg=f"{sname} {name} {p}")
      kept = optim.kept_fractions(tree, st, r"conv\d/kernel$")
      assert kept.keys() == want_kept.keys()
      for p in kept:
        np.testing.assert_allclose(kept[p], want_kept[p])
      masks = _by_path(optim.masks(tree, st))
      np.testing.assert_array_equal(masks["conv1/bias"], h1)
  # The effective NNX model computes the same logits as Linen on the effective params.
  optimizer = nnx.Optimizer(model, optax.chain(tx, optax.sgd(0.1)), wrt=nnx.Param)
  optimizer.opt_state[0].m["conv1"]["kernel"][...] = m["conv1"]["kernel"]
  optimizer.opt_state[0].m["conv2"]["kernel"][...] = m["conv2"]["kernel"]
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 2)), jnp.float32)
  pruned = optim.effective_model(model, optimizer)
  pruned.eval()
  want = linen.apply({**variables, "params": optim.effective_params(variables["params"], state)},
                     x)
  np.testing.assert_allclose(pruned(x), want, rtol=1e-5, atol=1e-5)


def test_a_gate_that_cannot_broadcast_to_its_leaf_is_an_error():
  model, _, variables = _pair(_rng())
  tx = optim.autoprune(0.1, mask=r"fc/kernel$")
  state = tx.init(variables["params"])
  state.m["fc"]["kernel"] = jnp.ones((5,))  # fc/kernel is (6, 3)
  with pytest.raises(ValueError, match=r"'fc/kernel' has shape \(5,\).*\(6, 3\)"):
    optim.effective_params(nnx.state(model, nnx.Param), state)
  with pytest.raises(ValueError, match="no auxiliary parameter for the leaf 'extra/kernel'"):
    optim.masks({**variables["params"], "extra": {"kernel": jnp.ones((2, 2))}}, state)


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_autoprune_nnx_step_equals_the_linen_step():
  rng = _rng()
  model, linen, variables = _pair(rng)
  tx = optax.chain(optim.autoprune(1.0, regularization=0.2, weight_decay=1e-3),
                   optax.sgd(0.1, momentum=0.9))
  xs = jnp.asarray(rng.normal(size=(3, 4, 6, 6, 2)), jnp.float32)
  ys = jnp.asarray(rng.integers(0, 3, size=(3, 4)))

  @jax.jit
  def linen_step(params, batch_stats, opt_state, x, y):
    eff = optim.effective_params(params, opt_state)

    def loss(p):
      logits, upd = linen.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
      return _ce(logits, y), upd["batch_stats"]
    (_, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(eff)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  @nnx.jit
  def nnx_step(model, optimizer, x, y):
    loss, grads = optim.autoprune_value_and_grad(lambda m, x, y: _ce(m(x), y))(
        model, optimizer, x, y)
    optimizer.update(model, grads)
    return loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  model.train()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for x, y in zip(xs, ys):
    params, batch_stats, opt_state = linen_step(params, batch_stats, opt_state, x, y)
    nnx_step(model, optimizer, x, y)
  for want, got in ((params, nnx.state(model, nnx.Param)),
                    (batch_stats, nnx.state(model, nnx.BatchStat)),
                    (optim.find_state(opt_state).m,
                     optim.find_state(nnx.as_pure(optimizer.opt_state)).m)):
    want, got = _by_path(want), _by_path(got)
    assert want.keys() == got.keys()
    for p in want:
      np.testing.assert_allclose(got[p], want[p], rtol=1e-4, atol=1e-5, err_msg=p)


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def test_autoprune_trains_and_prunes_an_nnx_mlp_through_nnx_optimizer():
  rng = _rng()
  teacher = rng.normal(size=(8, 3))
  x = jnp.asarray(rng.normal(size=(512, 8)), jnp.float32)
  y = jnp.asarray(np.argmax(np.asarray(x) @ teacher, -1))
  model = MLP(nnx.Rngs(int(rng.integers(1 << 30))))
  tx = optax.chain(optim.autoprune(1.0, regularization=0.003), optax.sgd(0.1, momentum=0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = optim.autoprune_value_and_grad(lambda m, x, y: _ce(m(x), y))(
        model, optimizer, x, y)
    optimizer.update(model, grads)
    return loss

  def accuracy():
    pruned = optim.effective_model(model, optimizer)
    return float(jnp.mean(jnp.argmax(pruned(x), -1) == y))

  before = accuracy()
  for _ in range(300):
    step(model, optimizer, x, y)
  after = accuracy()
  kept = optim.kept_fractions(nnx.state(model, nnx.Param), optimizer)
  assert set(kept) == {"fc1/kernel", "fc2/kernel"}
  total = sum(np.size(model.__getattribute__(p.split("/")[0]).kernel[...]) * f
              for p, f in kept.items()) / (8 * 32 + 32 * 3)
  assert after > max(0.85, before + 0.2), (before, after)
  assert 0.0 < total < 0.9, kept
  assert all(f > 0 for f in kept.values()), kept  # no layer dies whole
  # The export for any model (here NNX): hidden units the gates left with no input
  # weights read relu(bias), a constant that is 0 for a bias <= 0: those go, as do
  # units nobody reads; a unit reading relu(bias) > 0 stays (it needs a fold).
  pruned = optim.effective_model(model, optimizer)
  small, info = surgery.prune_zeros(pruned, None, (8,), probe=x[:16])
  assert info["max_abs_diff"] < 1e-4
  no_input = (~np.any(np.asarray(pruned.fc1.kernel[...]) != 0, axis=0)
              & (np.asarray(pruned.fc1.bias[...]) <= 0))
  unread = ~np.any(np.asarray(pruned.fc2.kernel[...]) != 0, axis=1)
  assert small.model.fc1.kernel[...].shape[1] == max(int(np.sum(~(no_input | unread))), 1)


def test_autoprune_value_and_grad_carries_dropout_rngs_and_aux():
  rng = _rng()

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.fc1 = nnx.Linear(4, 8, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
      return self.fc2(self.drop(nnx.relu(self.fc1(x))))

  model = Net(nnx.Rngs(int(rng.integers(1 << 30))))
  optimizer = nnx.Optimizer(model, optax.chain(optim.autoprune(0.1), optax.sgd(0.1)),
                            wrt=nnx.Param)
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, size=(16,)))

  @nnx.jit
  def step(model, optimizer):
    (loss, logits), grads = optim.autoprune_value_and_grad(
        lambda m: (_ce(logits := m(x), y), logits), has_aux=True)(model, optimizer)
    optimizer.update(model, grads)
    return loss, logits

  count = int(model.drop.rngs.count[...])
  _, logits1 = step(model, optimizer)
  _, logits2 = step(model, optimizer)
  assert int(model.drop.rngs.count[...]) == count + 2  # the copy's RNG use is kept
  assert logits1.shape == (16, 2) and not np.allclose(logits1, logits2)
