"""model.dtype=bfloat16: convs and matmuls in bfloat16, parameters, optimizer states,
batch-norm statistics, costs and losses in float32, for every recipe, jaxprune's models
and a user's (Linen through its module's ``dtype`` field, NNX through its factory's
``dtype`` argument)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, sweep
from jaxprune import config_lib, methods, models
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import metrics
from jaxprune.errors import UserError
from jaxprune.methods import common, tas
from jaxprune.models import external


def _config(path, arg, **overrides):
  return load_config(path, arg, overrides)


SMALL = {"model.depth": 8, "dataset.synthetic.num_train": 256, "dataset.synthetic.num_test": 64,
         "dataset.synthetic.image_shape": (8, 8, 3), "train.epochs": 3,
         "train.learning_rate": 0.05, "train.batch_size": 32, "train.eval_batch_size": 64,
         "train.log_every_steps": 2, "train.checkpoint_every_steps": 1000,
         "report.inference_batch_size": 8}


def _losses(stage_dir):
  return np.asarray([r["train_loss"] for r in metrics.read_jsonl(f"{stage_dir}/metrics.jsonl")])


@pytest.mark.e2e
def test_bfloat16_baseline_trains_close_to_float32_with_float32_state(tmp_path):
  seed = int(np.random.randint(1 << 20))
  runs = {}
  for dtype in ("float32", "bfloat16"):
    config = _config("configs/baseline_resnet.py", "smoke", **SMALL, seed=seed)
    if dtype == "bfloat16":
      config.model.dtype = dtype
    methods.run(config, str(tmp_path / dtype))
    runs[dtype] = _losses(tmp_path / dtype / "baseline")
  f32, bf16 = runs["float32"], runs["bfloat16"]
  assert np.all(np.isfinite(bf16)) and len(bf16) == len(f32) >= 10
  np.testing.assert_allclose(bf16[:2], f32[:2], rtol=0.05)  # the first logged means
  assert bf16[-3:].mean() < bf16[:2].mean()  # it learns
  variables = ckpt_lib.load_variables(str(tmp_path / "bfloat16" / "baseline" / "final"))
  dtypes = {x.dtype for x in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype("float32")}, dtypes  # params and BN statistics
  report = json.loads((tmp_path / "bfloat16" / "report.json").read_text())
  # The report's accuracy is the final evaluation's, k of the 64 test images.
  evals = [r for r in metrics.read_jsonl(f"{tmp_path}/bfloat16/baseline/metrics.jsonl")
           if "eval_accuracy" in r]
  assert report["test_accuracy"] == evals[-1]["eval_accuracy"]
  assert report["test_accuracy"] * 64 == round(report["test_accuracy"] * 64)


@pytest.mark.slow
def test_bfloat16_tas_search_model_mixes_in_bfloat16_and_prices_in_float32():
  config = _config("configs/tas_resnet.py", "smoke", **{"model.depth": 8})
  config.model.dtype = "bfloat16"
  config_lib.validate(config)
  tas.validate(config)
  shape = (8, 8, 3)
  net16 = tas.make_space(config, None, 4, shape)
  net32 = tas.resnet_space(8, 4, 2, shape, round_to=tas.round_to_of(config))
  assert net16.model.dtype == jnp.bfloat16 and net16.flops_max == net32.flops_max
  key = jax.random.key(int(np.random.randint(1 << 30)))
  params, state, arch = net32.init(key)
  images = jax.random.normal(jax.random.fold_in(key, 1), (16, *shape))
  outs = {}
  for name, net in (("f32", net32), ("bf16", net16)):
    logits, new_state = net.forward(params, state, arch, images, 1.0, jax.random.key(3))
    assert logits.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(new_state)} == {jnp.dtype("float32")}
    outs[name] = (logits, net.expected_cost(arch))
  (l32, c32), (l16, c16) = outs["f32"], outs["bf16"]
  scale = float(jnp.abs(l32).max())
  np.testing.assert_allclose(l16, l32, atol=0.05 * scale)
  assert c16.dtype == jnp.float32 and float(c16) == pytest.approx(float(c32), rel=1e-6)


# The first logged losses (log_every_steps=1: the untrained network's loss, then after
# one step) of the first stage are compared with float32; that stage must learn.
_TINY = {"dataset.synthetic.num_train": 128, "dataset.synthetic.num_test": 32,
         "dataset.synthetic.num_classes": 4, "report.inference_batch_size": 8}


def _stage(steps, lr=None, batch=16):
  out = {"batch_size": batch, "eval_batch_size": 32, "max_steps": steps,
         "log_every_steps": 1, "checkpoint_every_steps": 1000}
  return {**out, "learning_rate": lr} if lr else out


RECIPES = {
    "ista": ("configs/ista_resnet.py", "smoke", "warmup", {
        "model.depth": 8, "dataset.synthetic.image_shape": (8, 8, 3),
        "warmup": _stage(24, 0.05, batch=32), "sparsify": _stage(2), "finetune": _stage(2)}),
    "prune": ("configs/prune_resnet.py", "smoke", "baseline", {
        "model.depth": 8, "dataset.synthetic.image_shape": (8, 8, 3),
        # 16 steps at lr 0.05 hardly learned (1 of 10 seeds' last losses were not below the
        # first, a CI failure); 48 steps (6 epochs) at 0.1 fall from ~1.4 to ~0.1 (12 seeds)
        "train": {**_stage(48, 0.1), "epochs": 6}, "finetune": _stage(2),
        "scratch": _stage(2)}),
    "dnw": ("configs/dnw_cifar.py", "smoke", "train", {
        "model.block_sizes": (8, 16, 16), "model.num_outputs": 8, "model.prune_rate": 0.8,
        "dataset.synthetic.image_shape": (16, 16, 3),
        "train": {**_stage(24, 0.1, batch=32), "epochs": 6, "decay_epochs": (100,)}}),
    # The search's sampled narrow widths learn slowly: 24 steps of 16 stayed at ln 4 in both
    # dtypes (the loss "fell" by chance); 96 steps of 32 at lr 0.1 fell in every run tried.
    "tas": ("configs/tas_resnet.py", "smoke", "search", {
        "model.depth": 8, "dataset.synthetic.image_shape": (8, 8, 3),
        "dataset.synthetic.num_train": 512, "teacher": _stage(2), "train": _stage(2),
        "tas": {**_stage(96, 0.1, batch=32), "log_every_steps": 4, "epochs": 12}}),
    "autoprune": ("configs/autoprune_lenet.py", "smoke", "prune", {
        "dataset.synthetic.image_shape": (28, 28, 1), "pretrain.epochs": 0,
        "train": {**_stage(16), "epochs": 2}, "autoprune.prune_epochs": 1}),
}


# "It learns": the mean of the last logged losses is below the mean of the first. Windows
# (first, last) per recipe, default (2, 3). AutoPrune's 16 steps at its smoke lr jump about
# in steps 2-7, and (2, 3) failed CI once (1.533 vs 1.506). This test's body run for
# seeds 0-59 (issue 23): with (2, 3) the margin was 0.65 +- 0.29 (min 0.23; 0 of 60 failed,
# a normal fit fails ~1.2% of runs); with (4, 4) 0.68 +- 0.18 (min 0.37; 0 of 60, a normal
# fit ~1e-4 of runs). The same in float32.
LEARNING_WINDOWS = {"autoprune": (4, 4), "prune": (12, 12)}


def _apply(config, overrides):
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      node = node[part]
    if isinstance(value, dict):
      node[leaf].update(value)
    else:
      node[leaf] = value
  return config


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_bfloat16_recipe_starts_like_float32_learns_and_keeps_float32_state(tmp_path, recipe):
  path, arg, first, overrides = RECIPES[recipe]
  seed = int(np.random.randint(1 << 20))
  runs = {}
  for dtype in ("float32", "bfloat16"):
    config = _apply(load_config(path, arg), {**_TINY, **overrides, "seed": seed})
    if dtype == "bfloat16":
      config.model.dtype = dtype
    elif recipe == "tas":  # the reference needs only the search's losses (the same run's)
      config.tas.search_only = True
    methods.run(config, str(tmp_path / dtype))
    runs[dtype] = _losses(tmp_path / dtype / first)
  f32, bf16 = runs["float32"], runs["bfloat16"]
  assert len(bf16) == len(f32) >= 12 and np.all(np.isfinite(bf16))
  np.testing.assert_allclose(bf16[:2], f32[:2], rtol=0.05)
  first, last = LEARNING_WINDOWS.get(recipe, (2, 3))
  assert bf16[-last:].mean() < bf16[:first].mean(), bf16  # it learns
  stages = sorted(d for d in (tmp_path / "bfloat16").iterdir() if (d / "final").exists())
  assert stages
  for stage in stages:
    assert np.all(np.isfinite(_losses(stage))), stage.name
    variables = ckpt_lib.load_variables(str(stage / "final"))
    floats = {x.dtype for x in jax.tree.leaves(variables)
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype("float32")}, (stage.name, floats)
  assert json.loads((tmp_path / "bfloat16" / "report.json").read_text())


@pytest.mark.parametrize("name,shape,kwargs", sweep([
    ("lenet5", (28, 28, 1), {}), ("lenet300_100", (28, 28, 1), {}),
    ("vgg_like", (32, 32, 3), {"features": (8,) * 13 + (16,)}),
    ("convnet", (16, 16, 3), {"features": (8, 8, 8)}),
    ("cifar_resnet", (8, 8, 3), {"depth": 8}),
    ("dnw_static", (16, 16, 3), {"block_sizes": (4, 8, 8), "num_outputs": 4}),
    # At prune_rate 0.95 a 24-node graph's outputs are often cut off from its inputs
    # (exactly zero logits on 21% / 2% of seeds, a vacuous comparison); 0.5 keeps them wired.
    ("dnw_discrete", (16, 16, 3),
     {"nodes": 24, "stem_width": 8, "num_outputs": 4, "prune_rate": 0.5}),
    ("dnw_continuous", (16, 16, 3),
     {"nodes": 24, "stem_width": 8, "num_outputs": 4, "prune_rate": 0.5}),
    ("dnw_mobilenet", (16, 16, 3), {"blocks": ((8, 16, 1, 1), (16, 16, 2, 2))}),
], {"lenet5", "lenet300_100"}))
def test_every_model_computes_in_bfloat16_close_to_float32(name, shape, kwargs):
  assert {name, "imagenet_resnet"} <= set(models.MODELS)
  m32 = models.get_model(name, 5, **kwargs)
  m16 = models.get_model(name, 5, dtype=jnp.bfloat16, **kwargs)
  key = jax.random.key(int(np.random.randint(1 << 30)))
  x = jax.random.normal(key, (4, *shape))
  variables = m32.init(jax.random.fold_in(key, 1), x)
  jaxpr = jax.make_jaxpr(lambda v: m16.apply(v, x, train=True, mutable=True))(variables)
  assert jnp.dtype("bfloat16") in external.compute_dtypes(jaxpr.jaxpr)
  l16, s16 = m16.apply(variables, x, train=True, mutable=True)
  assert l16.dtype == jnp.float32 and np.all(np.isfinite(l16))
  assert {a.dtype for a in jax.tree.leaves(s16) if a.dtype != jnp.int32} <= {jnp.dtype("float32")}
  # Compared in eval mode: at init, train-mode batch norm amplifies any perturbation with
  # depth (VGG-like's 14 norms turn bf16 rounding into ~10% of the logits). Judged on the
  # median over fresh initialisations, because some initialisations are ill-conditioned in
  # float32 too: the DNW graphs' instance norm divides by the spread of nearly constant
  # channels, and the continuous graph's adaptive solver (rtol = atol = 1e-3) takes other
  # steps. On 100 seeds the relative error is ~1.5% typically; at prune_rate 0.95 it is >5%
  # on 9 in 100 of the continuous graph's (its float32 logits there are as far from a
  # tight-tolerance solve), at 0.5 on none (at most 4.7%).
  init = jax.jit(m32.init)
  apply16, apply32 = (jax.jit(lambda v, x, m=m: m.apply(v, x, train=False)) for m in (m16, m32))
  errors = []
  for i in range(9):
    k = jax.random.fold_in(key, 2 + i)
    x = jax.random.normal(k, (4, *shape))
    variables = init(jax.random.fold_in(k, 1), x)
    l16, l32 = (np.asarray(f(variables, x), np.float64) for f in (apply16, apply32))
    assert np.all(np.isfinite(l16))
    if np.any(l32):  # a rare dead initialisation (~1 in 800 of dnw_static's) has 0 logits
      errors.append(np.linalg.norm(l16 - l32) / np.linalg.norm(l32))
  assert len(errors) >= 5 and np.median(errors) < 0.05, np.round(errors, 4)


@pytest.mark.slow
@pytest.mark.parametrize("spec,kwargs", [
    ("user_models:linen_cnn", {"features": 8}),  # the module's dtype field
    ("user_models:nnx_resnet", {"features": 8, "blocks": 2}),  # the factory's argument
])
def test_bfloat16_graph_search_space_of_a_user_model_mixes_like_float32(spec, kwargs):
  shape = (8, 8, 3)
  nets = {}
  for dtype in ("float32", "bfloat16"):
    config = load_config("configs/tas_resnet.py", "smoke",
                         {"model.name": spec, "model.kwargs": repr(kwargs),
                          "tas.space": "graph"})
    config.model.dtype = dtype
    nets[dtype] = tas.make_space(
        config, common.build_model(config.model, 4, shape), 4, shape)
  assert nets["bfloat16"].depth_candidates == nets["float32"].depth_candidates
  key = jax.random.key(int(np.random.randint(1 << 30)))
  params, state, arch = nets["float32"].init(key)
  images = jax.random.normal(jax.random.fold_in(key, 1), (16, *shape))
  outs = {}
  for dtype, net in nets.items():
    logits, new_state = net.forward(params, state, arch, images, 1.0, jax.random.key(3))
    assert {x.dtype for x in jax.tree.leaves(new_state)} == {jnp.dtype("float32")}
    outs[dtype] = (np.asarray(logits, np.float32), net.expected_cost(arch))
  (l32, c32), (l16, c16) = outs["float32"], outs["bfloat16"]
  # The CWI mix sits after each producer's batch norm in both (a bfloat16 norm reads
  # its input through two casts): otherwise the norm rescales the mix, and they differ.
  np.testing.assert_allclose(l16, l32, atol=0.03 * float(np.abs(l32).max()))
  assert float(c16) == pytest.approx(float(c32), rel=1e-6)


def test_bfloat16_where_a_model_has_no_compute_dtype_is_one_line_before_any_work(tmp_path):
  for spec, want in (("user_models:linen_mlp", "no `dtype` field"),
                     ("user_models:nnx_cnn", "factory takes no `dtype` argument"),
                     ("user_models:ignores_dtype", "runs no conv or matmul in it")):
    config = load_config("configs/baseline_lenet.py", "smoke", {"model.name": spec})
    config.model.dtype = "bfloat16"
    with pytest.raises(UserError) as e:
      methods.run(config, str(tmp_path / spec))
    assert want in str(e.value) and "model.dtype='bfloat16'" in str(e.value), spec
    assert "\n" not in str(e.value) and not (tmp_path / spec).exists()
  with pytest.raises(UserError, match="not also in model.kwargs"):
    external.build("user_models:nnx_resnet", {"dtype": "bfloat16"}, 4, (8, 8, 3),
                   jnp.bfloat16)
  config = load_config("configs/baseline_resnet.py", "smoke")
  config.model.dtype = "float16"
  with pytest.raises(UserError, match="use one of float32, bfloat16"):
    methods.run(config, str(tmp_path / "f16"))
  assert not (tmp_path / "f16").exists()
