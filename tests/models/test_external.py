"""A user's own Linen or NNX model in the recipes (jaxprune.models.external).

The models are in ``tests/user_models.py``, outside the package, written as Flax's docs
write them; the command-line runs put this folder on PYTHONPATH and name them
``user_models:<factory>``.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cli
import user_models
from jaxprune import models, surgery
from jaxprune.errors import UserError
from jaxprune.models import external


def _x(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("spec,kwargs,shape,classes,needle", [
    ("nope_module:f", None, (8, 8, 3), 10, "cannot import module 'nope_module'"),
    ("user_models:missing", None, (8, 8, 3), 10, "has no attribute 'missing'"),
    ("user_models", None, (8, 8, 3), 10, "'<module path>:<factory>'"),
    ("user_models:not_a_model", None, (8, 8, 3), 10, "returned a dict"),
    ("user_models:broken_factory", None, (8, 8, 3), 10, "the user's factory is broken"),
    ("user_models:linen_cnn", "{'feat': 3}", (8, 8, 3), 10, "unexpected keyword"),
    ("user_models:linen_cnn", "[1, 2]", (8, 8, 3), 10, "dict with string keys"),
    ("user_models:linen_cnn", "{oops", (8, 8, 3), 10, "not a Python dict literal"),
    # The NNX CNN is built for 32x32 inputs: its first Linear does not fit 8x8.
    ("user_models:nnx_cnn", None, (8, 8, 3), 10, "does not run on the dataset's input shape"),
    # A factory without num_classes: the logits must still match the dataset.
    ("user_models:fixed_head_mlp", None, (8, 8, 3), 7, "logits of shape (batch, 7)"),
])
def test_bad_user_models_are_one_line_errors(spec, kwargs, shape, classes, needle):
  with pytest.raises(UserError) as e:
    external.build(spec, kwargs, classes, shape)
  message = str(e.value)
  assert needle in message and "\n" not in message, message


def test_build_model_routes_a_user_factory_and_keeps_builtin_fields():
  from jaxprune import config_lib
  cfg = config_lib.model_config("user_models:linen_mlp", depth=20)
  cfg.kwargs = "{'hidden': 12}"
  model = models.build_model(cfg, 10, (4, 4, 1))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), train=False)
  # The built-in field (depth) is not passed to the user's factory; kwargs are.
  assert variables["params"]["Dense_0"]["kernel"].shape == (16, 12)
  cfg = config_lib.model_config("lenet300_100")
  cfg.kwargs = "{'features': (20, 10)}"
  lenet = models.build_model(cfg, 10, (28, 28, 1))
  shapes = jax.tree.map(jnp.shape, lenet.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                              train=False))
  assert shapes["params"]["fc1"]["kernel"] == (784, 20)


def test_linen_without_train_flag_shares_the_users_variable_tree():
  user = user_models.LinenMLP(hidden=9, num_classes=5)
  wrapped = external.build("user_models:linen_mlp", "{'hidden': 9}", 5, (3, 3, 2))
  x = _x((4, 3, 3, 2), np.random.randint(1 << 30))
  own = user.init(jax.random.key(3), x)
  ours = wrapped.init(jax.random.key(3), x, train=True)
  assert jax.tree.structure(own) == jax.tree.structure(ours)
  np.testing.assert_array_equal(wrapped.apply(own, x, train=True), user.apply(own, x))


def test_nnx_model_through_linen_matches_the_nnx_module():
  seed = np.random.randint(1 << 30)
  wrapped = external.build("user_models:nnx_cnn", "{'spatial': 8, 'features': 4}", 10,
                           (8, 8, 3))
  x = _x((6, 8, 8, 3), seed)
  variables = wrapped.init(jax.random.key(seed), x[:1], train=False)
  again = wrapped.init(jax.random.key(seed), x[:1], train=False)
  other = wrapped.init(jax.random.key(seed + 1), x[:1], train=False)
  jax.tree.map(np.testing.assert_array_equal, variables, again)
  assert not np.allclose(other["params"]["conv1"]["kernel"],
                         variables["params"]["conv1"]["kernel"])
  # A fresh draw is the factory's own module made with nnx.Rngs(key).
  key = jax.random.key(seed)
  reference = user_models.nnx_cnn(10, spatial=8, features=4, rngs=nnx.Rngs(key))
  drawn = wrapped.split.draw(key)["params"]
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(nnx.state(reference, nnx.Param))):
    ours = drawn
    for k in path:
      ours = ours[str(k.key)]
    np.testing.assert_array_equal(ours, leaf)
  variables = {"params": drawn, "batch_stats": variables["batch_stats"]}
  # Eval mode: the NNX module's own eval forward.
  reference.eval()
  np.testing.assert_allclose(wrapped.apply(variables, x, train=False), reference(x),
                             rtol=1e-6, atol=1e-6)
  # Train mode: batch statistics move exactly as the NNX module's do (dropout aside:
  # p = 0 here through a module whose dropout rate is set to 0).
  reference.train()
  reference.dropout.rate = 0.0
  out, updates = wrapped.apply(variables, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(1)})
  module = wrapped.module(variables)
  module.train()
  module.dropout.rate = 0.0
  expected = module(x)
  bn_mean = np.asarray(nnx.state(module, nnx.BatchStat)["bn1"]["mean"][...])
  np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"], bn_mean, rtol=1e-6,
                             atol=1e-7)
  assert not np.allclose(bn_mean, variables["batch_stats"]["bn1"]["mean"])
  assert out.shape == expected.shape == (6, 10)


def test_nnx_dropout_is_reseeded_per_step_key():
  wrapped = external.build("user_models:nnx_cnn", "{'spatial': 8, 'features': 4}", 10,
                           (8, 8, 3))
  x = _x((4, 8, 8, 3), 0)
  variables = wrapped.init(jax.random.key(0), x[:1], train=False)

  def run(k):
    return jax.jit(lambda v: wrapped.apply(v, x, train=True, mutable=["batch_stats"],
                                           rngs={"dropout": jax.random.key(k)})[0])(variables)
  np.testing.assert_array_equal(run(5), run(5))
  assert not np.allclose(run(5), run(6))


def test_surgery_on_a_wrapped_nnx_model_matches_surgery_on_the_module():
  seed = np.random.randint(1 << 30)
  wrapped = external.build("user_models:nnx_cnn", "{'spatial': 8}", 10, (8, 8, 3))
  x = _x((3, 8, 8, 3), seed)
  variables = wrapped.init(jax.random.key(seed), x[:1], train=False)
  small, info = surgery.prune_to(wrapped, variables, (8, 8, 3), flops_ratio=0.5)
  # The same channels removed from the NNX module itself (the NNX path of surgery).
  module = wrapped.module(variables)
  direct, direct_info = surgery.prune_to(module, None, (8, 8, 3), flops_ratio=0.5)
  assert {g: list(k) for g, k in info["keep"].items()} == {
      g: list(k) for g, k in direct_info["keep"].items()}
  direct.model.eval()
  np.testing.assert_allclose(small.model.apply(small.variables, x, train=False),
                             direct.model(x), rtol=1e-5, atol=1e-6)
  assert small.shapes["params/conv1/kernel"][1][-1] < 16
  # init of the pruned wrapper: a fresh full-width draw cut to the kept channels.
  fresh = small.model.init(jax.random.key(7), x[:1], train=False)
  full = wrapped.init(jax.random.key(7), x[:1], train=False)
  kept = info["keep"][next(g for g in info["keep"]
                           if len(info["keep"][g]) == fresh["params"]["conv1"]["bias"].size)]
  np.testing.assert_array_equal(fresh["params"]["conv1"]["kernel"],
                                np.asarray(full["params"]["conv1"]["kernel"])[..., kept])
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, small.variables)


def _main(tmp_path, *args):
  return cli.run_main(*args, "--workdir", str(tmp_path), pythonpath=[cli.TESTS])


_report = cli.read_report


@pytest.mark.e2e
def test_cli_prune_recipe_on_a_user_nnx_model(tmp_path):
  proc = _main(tmp_path, "--config", "configs/prune_resnet.py:smoke",
               "--config.model.name=user_models:nnx_cnn",
               "--config.model.kwargs={'features': 8}", "--config.train.max_steps=4",
               "--config.finetune.max_steps=4", "--config.scratch.max_steps=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = _report(tmp_path)
  assert r["model"] == "user_models:nnx_cnn"
  assert 0 < r["pruned_flops"] <= 0.5 * r["dense_flops"]
  assert r["shapes"]["params/conv1/kernel"][1][-1] < 8


@pytest.mark.e2e
def test_cli_ista_recipe_on_a_user_linen_model(tmp_path):
  proc = _main(tmp_path, "--config", "configs/ista_resnet.py:smoke",
               "--config.model.name=user_models:linen_cnn",
               "--config.model.kwargs={'features': 8}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = _report(tmp_path)
  assert r["model"] == "user_models:linen_cnn"
  assert r["pruned_flops"] < r["base_flops"]


@pytest.mark.slow
def test_cli_user_model_errors_are_one_line(tmp_path):
  proc = _main(tmp_path, "--config", "configs/ista_resnet.py:smoke",
               "--config.model.name=user_models:linen_cnn",
               "--config.sparsify.weight_decay_on=nothing_matches")
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert "Traceback" not in proc.stderr
  assert last.startswith("error: config sparsify.weight_decay_on='nothing_matches'"), last
  assert not os.listdir(tmp_path)  # stopped before any work


@pytest.mark.e2e
def test_cli_tas_recipe_on_a_user_nnx_model(tmp_path):
  """TAS on a model jaxprune did not write: the graph search space with the depth of its
  stage of residual blocks, a derived network built by surgery (blocks beyond the
  argmax depth skipped) whose counted FLOPs are the search's argmax FLOPs. (A Linen
  user model's search is tests/search/test_search.py; its CLI path is the ISTA test's.)
  The cost is the measured latency (tas.cost=latency): a per-op table timed in the
  workdir, the history's latency keys and the report's measured speed-up."""
  spec, kwargs = "user_models:nnx_resnet", "{'features': 8, 'blocks': 3}"
  proc = _main(tmp_path, "--config", "configs/tas_resnet.py:smoke",
               f"--config.model.name={spec}", f"--config.model.kwargs={kwargs}",
               "--config.teacher.epochs=1", "--config.train.epochs=1",
               "--config.tas.epochs=2", "--config.tas.cost=latency",
               "--config.tas.latency_batch=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = _report(tmp_path)
  arch = r["architecture"]
  assert r["model"] == spec and arch["space"] == "graph" and r["depth"] is None
  with open(os.path.join(tmp_path, "search", "arch_history.jsonl"), encoding="utf-8") as f:
    history = [json.loads(line) for line in f]
  chosen = next(h for h in history if h["epoch"] == arch["search_epoch"])
  assert arch["flops"] == chosen["argmax_flops"] == r["derived_flops"]
  assert list(arch["widths"].values()) == chosen["argmax_widths"]
  assert chosen["depth_candidates"] == [[1, 2, 3]] and chosen["stage_names"] == [
      "blocks/0..blocks/2"]
  assert arch["blocks"] == {"blocks/0..blocks/2": chosen["argmax_blocks"][0]}
  assert arch["skipped_blocks"] == [f"blocks/{b}" for b in
                                    range(chosen["argmax_blocks"][0], 3)]
  assert r["derived_flops"] < r["base_flops"]
  assert os.path.exists(os.path.join(tmp_path, "plots", "width_probs.png"))
  with open(os.path.join(tmp_path, "search", "latency_table.json"), encoding="utf-8") as f:
    table = json.load(f)
  assert table["batch_size"] == 8 and all(h["cost"] == "latency" for h in history)
  for h in history:  # the cost loss's max is the table's full latency
    assert 0 < h["argmax_latency_ms"] <= h["latency_max_ms"] == pytest.approx(
        table["full_ms"])
    assert h["expected_latency_ms"] > 0 and h["argmax_flops"] > 0  # FLOPs still recorded
  assert r["speedup"] > 0 and r["flops_speedup"] == r["base_flops"] / r["derived_flops"]
  assert r["predicted_speedup"] == pytest.approx(
      chosen["latency_max_ms"] / chosen["argmax_latency_ms"])
  assert "latency_table" in proc.stdout  # the measurement said where it saved the table


@pytest.mark.e2e
def test_cli_tas_recipe_on_a_user_linen_model_with_rounded_widths(tmp_path):
  """TAS with the FLOPs cost on a Linen model with no residual blocks (widths only),
  candidates rounded to multiples of 4 (tas.round_to): every searched width, and so
  every derived width, is a multiple of 4 or the full width, and the derived network's
  counted FLOPs are the search's argmax FLOPs."""
  spec = "user_models:linen_cnn"
  proc = _main(tmp_path, "--config", "configs/tas_resnet.py:smoke",
               f"--config.model.name={spec}", "--config.model.kwargs={'features': 12}",
               "--config.teacher.epochs=1", "--config.train.epochs=1",
               "--config.tas.epochs=2", "--config.tas.round_to=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = _report(tmp_path)
  arch = r["architecture"]
  assert r["model"] == spec and arch["space"] == "graph" and arch["cost"] == "flops"
  with open(os.path.join(tmp_path, "search", "arch_history.jsonl"), encoding="utf-8") as f:
    history = [json.loads(line) for line in f]
  chosen = next(h for h in history if h["epoch"] == arch["search_epoch"])
  assert chosen["depth_candidates"] == [] and arch["skipped_blocks"] == []
  full = {"Conv_0": 12, "Conv_1": 24, "Dense_0": 32}
  widths = arch["widths"]
  assert widths and list(widths.values()) == chosen["argmax_widths"]
  for name, width in widths.items():
    layer = next(k for k in full if k in name)
    assert 0 < width <= full[layer] and (width % 4 == 0 or width == full[layer]), widths
  for cands in chosen["width_candidates"]:
    assert all(c % 4 == 0 for c in cands[:-1]), cands
  assert arch["flops"] == chosen["argmax_flops"] == r["derived_flops"] <= r["base_flops"]
  assert r["speedup"] > 0 and "predicted_speedup" not in r


@pytest.mark.slow
def test_cli_tas_resnet_space_refuses_a_user_model(tmp_path):
  proc = _main(tmp_path, "--config", "configs/tas_resnet.py:smoke",
               "--config.model.name=user_models:linen_cnn", "--config.tas.space=resnet")
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert "tas.space='resnet'" in last and "--config.tas.space=graph" in last, last
  assert not os.listdir(tmp_path)


def test_dnw_refuses_a_user_model_before_any_work(tmp_path):
  import ml_collections
  from jaxprune.methods import dnw
  config = ml_collections.ConfigDict({"model": {"name": "user_models:linen_cnn"}})
  with pytest.raises(UserError, match="DNW learns the wiring of its own graph networks"):
    dnw.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.e2e
def test_cli_autoprune_neurons_of_a_user_linen_model(tmp_path):
  """AutoPrune at neuron granularity on a model jaxprune did not write: the gated units
  are the graph's (every layer whose output channels can be removed, not the
  classifier), and the exported smaller network reproduces the masked one."""
  proc = _main(tmp_path, "--config", "configs/autoprune_lenet.py:smoke,granularity=neuron",
               "--config.model.name=user_models:linen_cnn", "--config.pretrain.epochs=0",
               "--config.train.epochs=1", "--config.autoprune.prune_epochs=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = _report(tmp_path)
  assert r["model"] == "user_models:linen_cnn" and r["granularity"] == "neuron"
  assert set(r["layers"]) == {"Conv_0", "Conv_1", "Dense_0"}  # the head is not gated
  assert set(r["kept_units"]) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}
  assert r["kept_units"]["Dense_1"] == 10 and r["export_max_abs_diff"] < 1e-4
  assert r["pruned_flops"] <= r["dense_flops"]


def test_autoprune_neuron_axis_in_gates_a_user_models_readers_and_exports_exactly():
  """neuron_axis='in' on a model jaxprune did not write: the gates sit on the input rows
  of the layers that read a unit layer's outputs one row each (the graph's consumers; the
  flatten into Dense_0 reads many and is left out), and the exported smaller network
  keeps exactly the units some gate keeps and gives the masked network's outputs."""
  from jaxprune import optim  # pylint: disable=g-import-not-at-top
  from jaxprune.methods import autoprune as recipe  # pylint: disable=g-import-not-at-top
  from jaxprune.optim import autoprune_lib as ap  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng()
  model, shape = user_models.linen_cnn(10, 8), (12, 12, 1)
  x = jnp.asarray(rng.normal(size=(4, *shape)), jnp.float32)
  variables = model.init(jax.random.key(int(rng.integers(1 << 30))), x, train=False)
  assert recipe.neuron_layers(model, shape) == [("Conv_0/kernel", ["Conv_1/kernel"]),
                                                ("Conv_1/kernel", []),
                                                ("Dense_0/kernel", ["Dense_1/kernel"])]
  tx = optim.autoprune(0.1, granularity="neuron", neuron_axis="in",
                       mask=recipe.neuron_mask("linen_cnn", "in", model, shape))
  state = tx.init(variables["params"])
  m = dict(state.m)
  for layer, units in (("Conv_1", 8), ("Dense_1", 32)):  # one gate per input row
    assert m[layer]["kernel"].size == units
    keep = rng.random(units) < 0.5
    keep[rng.integers(units)] = True
    m[layer] = {**m[layer], "kernel": jnp.where(jnp.asarray(keep), 1.0, -1.0).reshape(
        m[layer]["kernel"].shape)}
  state = state._replace(m=m)
  masked = {**variables, "params": ap.effective_params(variables["params"], state)}
  kept = recipe.kept_units(model, shape, ap.masks(variables["params"], state), "in")
  small, info = surgery.prune_zeros(model, jax.device_get(masked), shape, probe=x)
  widths = {k: v["kernel"].shape[-1] for k, v in small.variables["params"].items()
            if k.startswith(("Conv", "Dense"))}
  assert widths == {"Conv_0": int(kept["Conv_0"].sum()), "Conv_1": 16,
                    "Dense_0": int(kept["Dense_0"].sum()), "Dense_1": 10}
  np.testing.assert_allclose(small.model.apply(small.variables, x, train=False),
                             model.apply(masked, x, train=False), rtol=1e-5, atol=1e-5)
  assert info["max_abs_diff"] < 1e-4
