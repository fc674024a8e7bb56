"""AutoPrune: STE surrogates, the update rules, recoverability, masks, neuron export, recipe."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, sweep
from jaxprune import flops as flops_lib, kernels, models, optim, surgery
from jaxprune.kernels.ste import step_ste
from jaxprune.methods import autoprune as recipe

# The module; ``jaxprune.optim.autoprune`` is the transform factory.
from jaxprune.optim import autoprune_lib as ap  # pylint: disable=g-import-not-at-top,g-bad-import-order


def _rng():
  return np.random.default_rng()


def _params(rng, shapes=(("fc1", (6, 5)), ("fc2", (5, 3)))):
  return {name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32),
                 "bias": jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32)}
          for name, shape in shapes}


@pytest.mark.parametrize("surrogate", ["softplus", "leaky_relu", "linear"])
def test_step_ste_is_a_step_forward_and_surrogate_derivative_backward(surrogate):
  rng = _rng()
  m = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
  slope = float(rng.uniform(0.01, 0.5))
  np.testing.assert_array_equal(kernels.step_ste(m, surrogate, slope), (m > 0) * 1.0)
  grad = jax.grad(lambda x: jnp.sum(step_ste(x, surrogate, slope) * c))(m)
  mn = np.asarray(m)
  closed = {"softplus": 1 / (1 + np.exp(-mn)),
            "leaky_relu": np.where(mn > 0, 1.0, slope),
            "linear": np.ones_like(mn)}[surrogate]
  np.testing.assert_allclose(grad, np.asarray(c) * closed, rtol=1e-6)


def test_step_ste_rejects_unknown_surrogate():
  with pytest.raises(ValueError, match="surrogate"):
    kernels.step_ste(jnp.zeros(3), "tanh")


@pytest.mark.parametrize("rule", ["decoupled", "naive"])
def test_update_matches_hand_computed_rule(rule):
  rng = _rng()
  params = _params(rng)
  lr_m, lam, wd = 0.7, float(rng.uniform(1e-3, 1e-1)), 0.01
  tx = optim.autoprune(lr_m, regularization=lam, rule=rule, weight_decay=wd,
                       mask=r"fc1/kernel$")
  state = tx.init(params)
  m0 = np.asarray(rng.normal(size=(6, 5)), np.float32)
  state = state._replace(m={**state.m, "fc1": {**state.m["fc1"], "kernel": jnp.asarray(m0)}})
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  updates, new = jax.jit(tx.update)(grads, state, params)

  w, g = np.asarray(params["fc1"]["kernel"]), np.asarray(grads["fc1"]["kernel"])
  h = (m0 > 0).astype(np.float32)
  coupling = np.sign(w) if rule == "decoupled" else w
  sig = 1 / (1 + np.exp(-m0))
  np.testing.assert_allclose(new.m["fc1"]["kernel"], m0 - lr_m * (g * coupling + lam) * sig,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["fc1"]["kernel"], g * h + wd * w * h, rtol=1e-6)
  # Unselected leaves: gradient plus decay, placeholders unchanged.
  np.testing.assert_allclose(updates["fc2"]["kernel"],
                             grads["fc2"]["kernel"] + wd * params["fc2"]["kernel"], rtol=1e-6)
  assert new.m["fc2"]["kernel"].shape == () and float(new.m["fc2"]["kernel"]) > 0


def test_regularization_scale_multiplies_lambda_per_layer():
  rng = _rng()
  params = _params(rng, (("conv1", (3, 3, 2, 4)), ("fc1", (6, 5)), ("fc2", (5, 3))))
  lr_m, lam = 0.7, float(rng.uniform(1e-3, 1e-1))
  scale = {"conv": float(rng.uniform(0, 2)), "fc1/": float(rng.uniform(0, 2))}
  tx = optim.autoprune(lr_m, regularization=lam, regularization_scale=scale)
  state = tx.init(params)
  m0 = {k: jnp.asarray(rng.normal(size=v["kernel"].shape), jnp.float32)
        for k, v in params.items()}
  state = state._replace(m={k: {**state.m[k], "kernel": m0[k]} for k in params})
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  _, new = jax.jit(tx.update)(grads, state, params)
  for name, factor in (("conv1", scale["conv"]), ("fc1", scale["fc1/"]), ("fc2", 1.0)):
    w, g, m = (np.asarray(t[name]["kernel"]) for t in (params, grads, state.m))
    expected = m - lr_m * (g * np.sign(w) + lam * factor) / (1 + np.exp(-m))
    np.testing.assert_allclose(new.m[name]["kernel"], expected, rtol=1e-5, atol=1e-6)
  for bad, match in (({"conv2": 1.0}, "matches no pruned leaf"),
                     ({"fc": 1.0, "fc1": 2.0}, "two regularization_scale"),
                     ({"fc1": -1.0}, ">= 0")):
    with pytest.raises(ValueError, match=match):
      optim.autoprune(lr_m, regularization_scale=bad).init(params)
  assert recipe.parse_scale(" conv=0.7, fc1=1.25 ") == {"conv": 0.7, "fc1": 1.25}
  for text in ("conv", "conv=x", "=1.0", "conv=0.5,conv=2"):
    with pytest.raises(recipe.UserError, match="pattern=factor"):
      recipe.parse_scale(text)


def test_paired_error_difference_is_the_mean_and_standard_error_of_per_image_differences():
  from jaxprune.methods import common  # pylint: disable=g-import-not-at-top
  rng = _rng()
  n = int(rng.integers(50, 5000))
  wrong_a, wrong_b = rng.random(n) < rng.uniform(0, 0.5), rng.random(n) < rng.uniform(0, 0.5)
  d = wrong_b.astype(float) - wrong_a
  change, se = common.paired_error_difference(int(np.sum(wrong_a & ~wrong_b)),
                                              int(np.sum(wrong_b & ~wrong_a)), n)
  assert change == pytest.approx(wrong_b.mean() - wrong_a.mean(), abs=1e-12)
  assert se == pytest.approx(np.std(d, ddof=1) / np.sqrt(n), rel=1e-9, abs=1e-15)
  assert common.paired_error_difference(0, 0, n) == (0.0, 0.0)
  with pytest.raises(ValueError, match="at least 2"):
    common.paired_error_difference(0, 1, 1)


def test_neuron_rule_sums_over_the_unit_fan_in_and_gates_the_bias():
  rng = _rng()
  params = _params(rng)
  tx = optim.autoprune(0.5, regularization=0.0, granularity="neuron", mask=r"fc1/kernel$")
  state = tx.init(params)
  m0 = np.asarray(rng.normal(size=(5,)), np.float32)
  state = state._replace(m={**state.m, "fc1": {**state.m["fc1"], "kernel": jnp.asarray(m0)}})
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  updates, new = tx.update(grads, state, params)
  w, g = np.asarray(params["fc1"]["kernel"]), np.asarray(grads["fc1"]["kernel"])
  expected = m0 - 0.5 * np.sum(g * np.sign(w), axis=0) / (1 + np.exp(-m0))
  np.testing.assert_allclose(new.m["fc1"]["kernel"], expected, rtol=1e-5, atol=1e-6)
  h = (m0 > 0).astype(np.float32)
  np.testing.assert_allclose(updates["fc1"]["bias"], np.asarray(grads["fc1"]["bias"]) * h)
  eff = ap.effective_params(params, state)
  np.testing.assert_allclose(eff["fc1"]["kernel"], w * h[None, :])
  np.testing.assert_allclose(eff["fc1"]["bias"], np.asarray(params["fc1"]["bias"]) * h)


def _train(tx, params, grad_fn, steps):
  state = tx.init(params)
  for _ in range(steps):
    eff = ap.effective_params(params, state)
    updates, state = tx.update(grad_fn(eff), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_masked_weight_keeps_its_value_and_returns_when_m_turns_positive():
  rng = _rng()
  params = _params(rng, (("fc1", (4, 3)),))
  w0 = np.asarray(params["fc1"]["kernel"])
  # Phase 1: one step of a strong regulariser prunes every weight while the loss
  # pulls each effective weight towards w + 2 sign(w) (a nonzero gradient when masked).
  target = jax.tree.map(lambda p: p + 2 * jnp.sign(p), params)
  grad_fn = lambda eff: jax.tree.map(lambda e, t: e - t, eff, target)
  inner = optax.sgd(0.05)
  tx = optax.chain(optim.autoprune(0.5, regularization=4.0, m_init=0.1,
                                   weight_decay=1e-3), inner)
  params1, state1 = _train(tx, params, grad_fn, 1)
  assert not np.any(np.asarray(ap.masks(params1, state1)["fc1"]["kernel"]))
  w1 = np.asarray(params1["fc1"]["kernel"])
  # Phase 2: no regulariser; the decoupled rule pulls m up (sign(w) * dL/dt < 0)
  # while the weights stay frozen, then they come back with the values they had.
  tx2 = optax.chain(optim.autoprune(0.5, regularization=0.0, weight_decay=1e-3), inner)
  state2 = tx2.init(params1)
  state2 = state2[0]._replace(m=ap.find_state(state1).m), state2[1]
  params2, state2 = params1, state2
  returned = np.zeros(w1.shape, bool)
  for _ in range(20):
    alive = np.asarray(ap.masks(params2, state2)["fc1"]["kernel"])
    new = alive & ~returned
    # A weight that comes back has the value it had when it was masked out.
    np.testing.assert_array_equal(np.asarray(params2["fc1"]["kernel"])[new], w1[new])
    eff = ap.effective_params(params2, state2)
    np.testing.assert_array_equal(np.asarray(eff["fc1"]["kernel"])[new], w1[new])
    returned |= alive
    if returned.all():
      break
    updates, state2 = tx2.update(grad_fn(eff), state2, params2)
    params2 = optax.apply_updates(params2, updates)
  assert returned.all()
  # Weight decay on W instead of T shrinks masked weights (lower recoverability).
  tx3 = optax.chain(optim.autoprune(0.5, regularization=10.0, m_init=-1.0,
                                    weight_decay=0.1, decay_on="weights"), optax.sgd(1.0))
  params3, _ = _train(tx3, params, lambda eff: jax.tree.map(jnp.zeros_like, eff), 3)
  np.testing.assert_allclose(params3["fc1"]["kernel"], w0 * 0.9 ** 3, rtol=1e-5)


def test_leaves_outside_the_mask_are_untouched_by_pruning():
  rng = _rng()
  params = _params(rng)
  grad_fn = lambda eff: jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                                           jnp.float32), eff)
  tx = optax.chain(optim.autoprune(5.0, regularization=1.0, mask=r"fc1/kernel$"),
                   optax.sgd(0.0))
  params_out, state = _train(tx, params, grad_fn, 4)
  eff = ap.effective_params(params_out, state)
  for path in (("fc1", "bias"), ("fc2", "kernel"), ("fc2", "bias")):
    np.testing.assert_array_equal(eff[path[0]][path[1]], params[path[0]][path[1]])
  assert np.mean(np.asarray(ap.masks(params_out, state)["fc1"]["kernel"])) < 1


def test_bad_options_raise():
  for kwargs in ({"rule": "exact"}, {"granularity": "layer"}, {"regularizer": "l0"},
                 {"decay_on": "bias"}, {"surrogate": "relu"}, {"neuron_axis": "both"}):
    with pytest.raises(ValueError):
      optim.autoprune(0.1, **kwargs)
  tx = optim.autoprune(0.1)
  params = _params(_rng())
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))


def test_neuron_in_axis_gates_fan_out_rows_and_sums_over_them():
  rng = _rng()
  params = _params(rng, (("conv", (3, 3, 4, 5)),))
  tx = optim.autoprune(0.5, regularization=0.1, granularity="neuron", neuron_axis="in")
  state = tx.init(params)
  m0 = np.asarray(rng.normal(size=(4, 1)), np.float32)
  state = state._replace(m={"conv": {**state.m["conv"], "kernel": jnp.asarray(m0)}})
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  updates, new = tx.update(grads, state, params)
  w, g = np.asarray(params["conv"]["kernel"]), np.asarray(grads["conv"]["kernel"])
  d = np.sum(g * np.sign(w), axis=(0, 1, 3))[:, None]
  np.testing.assert_allclose(new.m["conv"]["kernel"], m0 - 0.5 * (d + 0.1) / (1 + np.exp(-m0)),
                             rtol=1e-5, atol=1e-6)
  h = (m0 > 0).astype(np.float32)  # (in, 1): rows of every tap
  np.testing.assert_allclose(updates["conv"]["kernel"], g * h)
  np.testing.assert_array_equal(updates["conv"]["bias"], grads["conv"]["bias"])  # not gated


@pytest.mark.parametrize("name,axis", sweep([("lenet5", "out"), ("lenet300_100", "out"),
                                             ("lenet5", "in"), ("lenet300_100", "in")],
                                            {"lenet300_100"}))
def test_neuron_export_gives_the_masked_network_outputs(name, axis):
  rng = _rng()
  model = models.get_model(name, num_classes=10)
  x = jnp.asarray(rng.normal(size=(4, 28, 28, 1)), jnp.float32)
  params = model.init(jax.random.key(int(rng.integers(1 << 30))), x)["params"]
  tx = optim.autoprune(0.1, granularity="neuron", neuron_axis=axis,
                       mask=recipe.neuron_mask(name, axis, model, (28, 28, 1)))
  state = tx.init(params)
  m = dict(state.m)
  for i, (path, leaf) in enumerate(sorted(
      (p, l) for p, l in ((k, v["kernel"]) for k, v in state.m.items()) if l.ndim)):
    k = rng.random(leaf.shape) < 0.4
    if i == 0:
      k[:] = False  # a layer with no unit left is still exported exactly
    m[path] = {**m[path], "kernel": jnp.where(jnp.asarray(k), 1.0, -1.0)}
  state = state._replace(m=m)
  masked = model.apply({"params": ap.effective_params(params, state)}, x)
  keep = recipe.kept_units(model, (28, 28, 1), ap.masks(params, state), axis)
  effective = {"params": ap.effective_params(params, state)}
  small, info = surgery.prune_zeros(model, effective, x.shape[1:], probe=x)
  layers = list(keep)  # the unit layers, in forward order
  widths = [small.variables["params"][l]["kernel"].shape[-1] for l in layers]
  # Every unit the gates switched off goes; so do the units of a layer whose whole input
  # is gated off (axis "in": the next layer reads none of its input rows; here layer 1
  # once every unit of layer 0 is gone): zero fan-in, zero bias, relu(0). A layer keeps
  # at least one (all-zero) unit.
  fan_in = [axis == "out" or j == 0 or keep[layers[j - 1]].any() for j in range(len(layers))]
  assert widths == [max(int(keep[l].sum()) if live else 0, 1)
                    for l, live in zip(layers, fan_in)]
  assert sum(widths) < sum(model.features)
  np.testing.assert_allclose(small.model.apply(small.variables, x), masked,
                             rtol=1e-5, atol=1e-5)
  assert info["max_abs_diff"] < 1e-4


def _config(arg="smoke"):
  config = load_config("configs/autoprune_lenet.py", arg)
  config.dataset.synthetic.update(num_train=256, num_test=64)
  config.pretrain.update(epochs=1, batch_size=32, eval_batch_size=64)
  config.train.update(epochs=2, batch_size=32, eval_batch_size=64, log_every_steps=4)
  config.autoprune.update(prune_epochs=1, regularization=0.04, m_learning_rate=2.0)
  return config


@pytest.mark.e2e
@pytest.mark.parametrize("arg,pretrain", [("smoke,arch=lenet300", 0),
                                          ("smoke,arch=lenet300,granularity=neuron", 1)])
def test_recipe_end_to_end_reports_compression_and_plots(tmp_path, arg, pretrain):
  config = _config(arg)
  config.pretrain.epochs = pretrain  # 0: prune from scratch
  out = recipe.run(config, str(tmp_path))
  assert out["kept_weights"] < out["weights"]
  assert out["compression"] == pytest.approx(out["weights"] / out["kept_weights"])
  assert 0 < out["pruned_flops"] < out["dense_flops"]
  assert os.path.exists(tmp_path / "plots" / "kept_fraction.png")
  history = [json.loads(l) for l in open(tmp_path / "prune" / "kept_history.jsonl")]
  assert history[0]["total_kept_fraction"] == 1.0
  gated = out["layers"].values()
  assert history[-1]["total_kept_fraction"] == pytest.approx(
      sum(r["kept"] for r in gated) / sum(r["weights"] for r in gated))
  # Recoverability counts: between two records a layer's kept weights change by those
  # that returned minus those masked; the dense start has no earlier mask.
  assert history[0]["returned"] is None and history[0]["masked"] is None
  for before, after in zip(history, history[1:]):
    for layer, n in after["kept_weights"].items():
      assert n == (before["kept_weights"][layer] - after["masked"][layer]
                   + after["returned"][layer]), (after["epoch"], layer)
  assert sum(history[1]["masked"].values()) > 0
  assert history[-1]["kept_weights"] == {l: r["kept"] for l, r in out["layers"].items()}
  if pretrain:  # the paired counts are the two test errors, image by image
    n = out["wrong_both"] + out["wrong_only_dense"]
    assert out["error_before"] == pytest.approx(n / config.dataset.synthetic.num_test)
    n = out["wrong_both"] + out["wrong_only_pruned"]
    assert out["error_after"] == pytest.approx(n / config.dataset.synthetic.num_test)
    assert out["error_change"] == pytest.approx(out["error_after"] - out["error_before"])
  else:
    assert "error_change" not in out
  if "neuron" in arg:
    assert out["export_max_abs_diff"] < 1e-4
  else:  # the saved pruned network has exactly the reported kept weights
    from jaxprune.engine import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    saved = ckpt_lib.load_variables(str(tmp_path / "prune" / "final"))["params"]
    assert out["kept_weights"] == sum(int(np.count_nonzero(np.asarray(l["kernel"])))
                                      for l in saved.values())
  again = recipe.run(config, str(tmp_path))  # finished stages are not redone
  assert again["kept_weights"] == out["kept_weights"]
  if "neuron" not in arg:  # fixed-mask retraining keeps exactly the pruned weights out
    config.autoprune.update(init_from=str(tmp_path / "prune" / "final"),
                            zeros_start_pruned=True, prune_epochs=0)
    config.train.epochs = 1
    retrained = recipe.run(config, str(tmp_path / "retrain"))
    assert retrained["kept_weights"] == out["kept_weights"]
    assert retrained["layers"] == out["layers"]


@pytest.mark.parametrize("mode", ["continue", "restart"])
def test_finetune_schedule_and_decay_switch_at_the_end_of_pruning(mode):
  rng = _rng()
  per_epoch, prune_epochs, epochs = int(rng.integers(3, 9)), 2, 5
  lr, wd0, wd1 = rng.uniform(0.01, 0.1), rng.uniform(1e-4, 1e-3), rng.uniform(0, 1e-4)
  lr_tune = rng.uniform(0.01, 0.1)
  config = _config("smoke,arch=lenet300")
  config.train.update(epochs=epochs, learning_rate=lr, weight_decay=wd0, nesterov=False)
  config.autoprune.update(prune_epochs=prune_epochs, finetune_schedule=mode,
                          finetune_weight_decay=wd1)
  if mode == "restart":
    config.autoprune.finetune_learning_rate = lr_tune
  total, cut = epochs * per_epoch, prune_epochs * per_epoch
  tx, schedule = recipe.transform(config, per_epoch, total, ap.DEFAULT_MASK)
  cosine = lambda t, n, peak=lr: peak * 0.5 * (1 + np.cos(np.pi * min(t, n) / n))
  for t in range(total + 1):
    want = (cosine(t, total) if mode == "continue" else
            cosine(t, cut) if t < cut else cosine(t - cut, total - cut, lr_tune))
    assert float(schedule(t)) == pytest.approx(want, rel=1e-5, abs=1e-6 * lr), t
  # Weight decay: a kept weight with zero loss gradient moves by -lr_t * wd_t * w on
  # the first step (the momentum trace is still empty).
  params = _params(rng)
  grads = jax.tree.map(jnp.zeros_like, params)
  for t, wd in ((cut - 1, wd0), (cut, wd1)):
    state = tx.init(params)
    pruner = state[0]._replace(count=jnp.asarray(t, state[0].count.dtype))
    sgd_state = jax.tree.map(
        lambda x: jnp.asarray(t, x.dtype) if jnp.ndim(x) == 0 and
        jnp.issubdtype(x.dtype, jnp.integer) else x, state[1])
    updates, _ = tx.update(grads, (pruner, sgd_state), params)
    w = params["fc1"]["kernel"]
    np.testing.assert_allclose(updates["fc1"]["kernel"], -float(schedule(t)) * wd * w,
                               rtol=1e-4, atol=1e-9)
  if mode == "continue":  # a restart peak without a restart is a config mistake
    config.autoprune.finetune_learning_rate = lr_tune
    with pytest.raises(recipe.UserError, match="finetune_schedule=restart"):
      recipe.transform(config, per_epoch, total, ap.DEFAULT_MASK)
  config.autoprune.finetune_schedule = "cyclic"
  with pytest.raises(recipe.UserError, match="finetune_schedule"):
    recipe.transform(config, per_epoch, total, ap.DEFAULT_MASK)


@pytest.mark.slow
def test_vgg_like_has_13_bn_convs_2_dense_and_reports_per_layer():
  model = models.get_model("vgg_like", num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  kinds = [r["kind"] for r in flops_lib.count_layers(model, shapes, (32, 32, 3))]
  assert kinds == ["conv"] * 13 + ["dense"] * 2
  assert len([k for k in shapes["batch_stats"] if k.startswith("bn")]) == 14
  # The report's per-layer table on a BN model (a narrow VGG-like, really initialised).
  small = models.get_model("vgg_like", num_classes=10, features=(4,) * 13 + (8,))
  variables = small.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = variables["params"]
  state = optim.autoprune(0.1).init(params)
  table = recipe.layer_table(small, params, state, ap.DEFAULT_MASK, (32, 32, 3),
                             {"batch_stats": variables["batch_stats"]})
  assert len(table) == 15 and all(r["kept"] == r["weights"] for r in table.values())
  assert all(r["kept_macs"] == r["macs"] > 0 for r in table.values())


@pytest.mark.parametrize("name", ["lenet5", "lenet300_100"])
def test_neuron_mask_from_the_graph_is_the_lenet_unit_layers(name):
  """The graph's unit layers (producers of prunable groups) are the LeNets' hidden layers
  (the classifier's outputs are never pruned), and the layers that read them one row per
  unit are the next ones, except across LeNet-5's flatten (conv2 -> fc1)."""
  import re  # pylint: disable=g-import-not-at-top
  model = models.get_model(name, num_classes=10)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 28, 28, 1))))["params"]
  leaves = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in
            jax.tree_util.tree_flatten_with_path(params)[0]]
  pick = lambda regex: sorted(l for l in leaves if re.search(regex, l))
  units, readers = {"lenet5": (["conv1", "conv2", "fc1"], ["conv2", "fc2"]),
                    "lenet300_100": (["fc1", "fc2"], ["fc2", "fc3"])}[name]
  assert pick(recipe.neuron_mask(name, "out", model, (28, 28, 1))) == [
      f"{l}/kernel" for l in units]
  assert pick(recipe.neuron_mask(name, "in", model, (28, 28, 1))) == [
      f"{l}/kernel" for l in readers]



def test_report_of_a_network_with_every_weight_pruned_is_one_line():
  """h(M) = 0 everywhere keeps no weight: the report refuses rather than divide by 1."""
  model = models.get_model("lenet5", num_classes=10)
  params = model.init(jax.random.key(int(_rng().integers(1 << 30))),
                      jnp.zeros((1, 28, 28, 1)))["params"]
  state = optim.autoprune(0.1).init(params)
  state = state._replace(m=jax.tree.map(lambda m: -jnp.abs(m) - 0.5, state.m))
  with pytest.raises(recipe.UserError, match="every gated weight is pruned"):
    recipe.weight_report(model, params, state, ap.DEFAULT_MASK, (28, 28, 1))


def test_reported_compression_counts_the_nonzero_effective_weights():
  """The report's kept weights, compression and pruned FLOPs (``weight_report``, what
  ``run`` writes) are the nonzero entries of ``W * h(M)``, the network ``prune/final``
  saves; pruned MACs drop by each removed weight's output positions (LeNet-5: conv1
  24x24, conv2 8x8, dense 1)."""
  rng = _rng()
  model = models.get_model("lenet5", num_classes=10)
  params = model.init(jax.random.key(int(rng.integers(1 << 30))),
                      jnp.zeros((1, 28, 28, 1)))["params"]
  state = optim.autoprune(0.1).init(params)
  m = {layer: {**leaves, "kernel": jnp.asarray(  # a different kept fraction per layer
      rng.random(np.shape(leaves["kernel"])) < rng.uniform(0.002, 0.5), jnp.float32) - 0.5}
       for layer, leaves in state.m.items()}
  state = state._replace(m=m)
  out = recipe.weight_report(model, params, state, ap.DEFAULT_MASK, (28, 28, 1))
  eff = ap.effective_params(params, state)
  nonzero = {l: int(np.count_nonzero(np.asarray(eff[l]["kernel"]))) for l in eff}
  sizes = {l: int(np.size(eff[l]["kernel"])) for l in eff}
  assert {l: (r["kept"], r["weights"]) for l, r in out["layers"].items()} == {
      l: (nonzero[l], sizes[l]) for l in sizes}
  assert out["kept_weights"] == sum(nonzero.values()) < sum(sizes.values())
  assert out["compression"] == pytest.approx(sum(sizes.values()) / sum(nonzero.values()),
                                             rel=1e-12)
  positions = {"conv1": 24 * 24, "conv2": 8 * 8, "fc1": 1, "fc2": 1}
  assert out["dense_flops"] - out["pruned_flops"] == sum(
      (sizes[l] - nonzero[l]) * positions[l] for l in sizes)


def test_lambda_ramp_rises_linearly_then_holds_then_freezes_with_the_mask():
  """``regularization_warmup_epochs``: lambda_m rises linearly from 0 over the warmup,
  holds until the end of pruning, and M stops there. With zero loss gradient the
  L1-on-h(M) rule moves m by -lr_m * lambda_t * sigmoid(m) (softplus surrogate)."""
  rng = _rng()
  per_epoch, warmup, prune_epochs = int(rng.integers(3, 9)), 2, 3
  lam, lr_m = float(rng.uniform(1e-3, 1e-1)), float(rng.uniform(0.5, 2.0))
  config = _config("smoke,arch=lenet300")
  config.train.epochs = 5
  config.autoprune.update(prune_epochs=prune_epochs, regularization=lam,
                          regularization_warmup_epochs=warmup, m_learning_rate=lr_m)
  ramp, cut = warmup * per_epoch, prune_epochs * per_epoch
  tx, _ = recipe.transform(config, per_epoch, 5 * per_epoch, ap.DEFAULT_MASK)
  params = _params(rng)
  grads = jax.tree.map(jnp.zeros_like, params)
  m0 = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  update = jax.jit(tx.update)
  for t in (0, 1, ramp // 2, ramp - 1, ramp, cut - 1, cut, cut + 1):
    state = tx.init(params)
    pruner = state[0]
    pruner = pruner._replace(count=jnp.asarray(t, pruner.count.dtype),
                             m={**pruner.m, "fc1": {**pruner.m["fc1"], "kernel": m0}})
    _, new = update(grads, (pruner,) + tuple(state[1:]), params)
    lam_t = lam * min(t / ramp, 1.0) if t < cut else 0.0
    want = m0 - (lr_m if t < cut else 0.0) * lam_t / (1 + np.exp(-np.asarray(m0)))
    np.testing.assert_allclose(new[0].m["fc1"]["kernel"], want, rtol=1e-5, atol=1e-7,
                               err_msg=f"step {t}")
  config.autoprune.regularization_warmup_epochs = prune_epochs + 0.5
  with pytest.raises(recipe.UserError, match="longer than prune_epochs"):
    recipe.transform(config, per_epoch, 5 * per_epoch, ap.DEFAULT_MASK)


def test_cosine_m_schedule_decays_the_m_step_to_zero_at_the_end_of_pruning():
  """``m_schedule="cosine"``: M's learning rate is lr_m * (1 + cos(pi t / T)) / 2 over
  the T pruning steps and 0 after; with zero loss gradient m moves by
  -lr_m(t) * lambda_m * sigmoid(m)."""
  rng = _rng()
  per_epoch, prune_epochs = int(rng.integers(3, 9)), 3
  lam, lr_m = float(rng.uniform(1e-3, 1e-1)), float(rng.uniform(0.5, 2.0))
  config = _config("smoke,arch=lenet300")
  config.train.epochs = 5
  config.autoprune.update(prune_epochs=prune_epochs, regularization=lam,
                          m_learning_rate=lr_m, m_schedule="cosine")
  cut = prune_epochs * per_epoch
  tx, _ = recipe.transform(config, per_epoch, 5 * per_epoch, ap.DEFAULT_MASK)
  params = _params(rng)
  grads = jax.tree.map(jnp.zeros_like, params)
  m0 = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  update = jax.jit(tx.update)
  for t in (0, 1, cut // 2, cut - 1, cut, cut + 1):
    state = tx.init(params)
    at_t = lambda x: (jnp.asarray(t, x.dtype) if jnp.ndim(x) == 0 and
                      jnp.issubdtype(x.dtype, jnp.integer) else x)  # M's optimizer count
    pruner = state[0]._replace(count=jnp.asarray(t, state[0].count.dtype),
                               m={**state[0].m, "fc1": {**state[0].m["fc1"], "kernel": m0}},
                               m_opt_state=jax.tree.map(at_t, state[0].m_opt_state))
    _, new = update(grads, (pruner,) + tuple(state[1:]), params)
    lr_t = lr_m * 0.5 * (1 + np.cos(np.pi * t / cut)) if t < cut else 0.0
    lam_t = lam if t < cut else 0.0
    want = m0 - lr_t * lam_t / (1 + np.exp(-np.asarray(m0)))
    np.testing.assert_allclose(new[0].m["fc1"]["kernel"], want, rtol=1e-5, atol=1e-7,
                               err_msg=f"step {t}")
  config.autoprune.m_schedule = "linear"
  with pytest.raises(recipe.UserError, match="m_schedule"):
    recipe.transform(config, per_epoch, 5 * per_epoch, ap.DEFAULT_MASK)


def test_finetune_distillation_replaces_cross_entropy_from_the_end_of_pruning():
  """finetune_distill_alpha: before the mask freezes the loss is the paper's cross-entropy;
  from then on Hinton's KD against the dense start (closed form in NumPy), at fresh random
  weights, teacher and batch; a bad alpha or a missing dense start is one line."""
  from jaxprune.engine.state import TrainState  # pylint: disable=g-import-not-at-top
  rng = _rng()
  per_epoch, prune_epochs, epochs = 3, 2, 4
  config = _config("smoke,arch=lenet300")
  config.train.update(epochs=epochs)
  alpha, temp = float(rng.uniform(0.2, 0.95)), float(rng.uniform(1.5, 6.0))
  config.autoprune.update(prune_epochs=prune_epochs, finetune_distill_alpha=alpha,
                          finetune_distill_temperature=temp)
  recipe.validate(config)
  model = models.lenet300_100(10)
  x = jnp.asarray(rng.normal(size=(16, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
  student = model.init(jax.random.key(int(rng.integers(1 << 30))), x[:1], train=False)
  teacher = model.init(jax.random.key(int(rng.integers(1 << 30))), x[:1], train=False)
  cut = prune_epochs * per_epoch
  tx, _ = recipe.transform(config, per_epoch, epochs * per_epoch, ap.DEFAULT_MASK)
  step = jax.jit(recipe.make_step(model, tx, seed=0, selector=ap.DEFAULT_MASK,
                                  teacher=teacher, distill_from=cut, alpha=alpha,
                                  temperature=temp))

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  opt_state = tx.init(student["params"])
  eff = ap.effective_params(student["params"], opt_state)
  s = np.asarray(model.apply({"params": eff}, x, train=False), np.float64)
  t = np.asarray(model.apply(teacher, x, train=False), np.float64)
  ce = -np.mean(log_softmax(s)[np.arange(16), np.asarray(labels)])
  lt, ls = log_softmax(t / temp), log_softmax(s / temp)
  kd = (1 - alpha) * ce + alpha * temp ** 2 * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))
  for t_step, want in ((cut - 1, ce), (cut, kd), (cut + 1, kd)):
    state = TrainState(step=jnp.asarray(t_step, jnp.int32), params=student["params"],
                       model_state={}, opt_state=opt_state)
    _, metrics = step(state, {"image": x, "label": labels})
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-4), (t_step, ce, kd)
  from jaxprune import config_lib  # pylint: disable=g-import-not-at-top
  config.autoprune.finetune_distill_alpha = 1.5
  with pytest.raises(recipe.UserError, match="finetune_distill_alpha"):
    config_lib.validate(config)
  config.autoprune.finetune_distill_alpha = 0.5
  config.pretrain.epochs = 0
  with pytest.raises(recipe.UserError, match="dense start"):
    recipe.validate(config)
