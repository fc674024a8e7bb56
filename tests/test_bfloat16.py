"""model.dtype=bfloat16: convs and matmuls in bfloat16, parameters, optimizer states,
batch-norm statistics, costs and losses in float32 (baseline and TAS on the ResNets)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from jaxprune import config_lib, methods
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import metrics
from jaxprune.errors import UserError
from jaxprune.methods import tas


def _config(path, arg, **overrides):
  return load_config(path, arg, overrides)


SMALL = {"model.depth": 8, "dataset.synthetic.num_train": 256, "dataset.synthetic.num_test": 64,
         "dataset.synthetic.image_shape": (8, 8, 3), "train.epochs": 3,
         "train.learning_rate": 0.05, "train.batch_size": 32, "train.eval_batch_size": 64,
         "train.log_every_steps": 2, "train.checkpoint_every_steps": 1000,
         "report.inference_batch_size": 8}


def _losses(stage_dir):
  return np.asarray([r["train_loss"] for r in metrics.read_jsonl(f"{stage_dir}/metrics.jsonl")])


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
  assert 0 <= report["test_accuracy"] <= 1


def test_bfloat16_tas_search_model_mixes_in_bfloat16_and_prices_in_float32():
  config = _config("configs/tas_resnet.py", "smoke", **{"model.depth": 8})
  config.model.dtype = "bfloat16"
  config_lib.validate(config)
  tas.validate(config)
  shape = (8, 8, 3)
  net16 = tas.make_supernet(config, None, 4, shape)
  net32 = tas.ResNetSupernet(8, 4, 2, shape)
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


def test_bfloat16_where_not_supported_is_one_line_before_any_work(tmp_path):
  config = _config("configs/ista_resnet.py", "smoke")
  config.model.dtype = "bfloat16"
  with pytest.raises(UserError) as e:
    methods.run(config, str(tmp_path / "ista"))
  assert "model.dtype='bfloat16'" in str(e.value) and "\n" not in str(e.value)
  config = _config("configs/baseline_resnet.py", "smoke")
  config.model.dtype = "float16"
  with pytest.raises(UserError, match="use one of float32, bfloat16"):
    methods.run(config, str(tmp_path / "f16"))
  config = _config("configs/tas_resnet.py", "smoke", **{"model.depth": 8})
  config.model.dtype = "bfloat16"
  config.tas.space = "graph"
  with pytest.raises(UserError, match="dedicated ResNet space"):
    tas.make_supernet(config, None, 4, (8, 8, 3))
  assert not (tmp_path / "ista").exists() and not (tmp_path / "f16").exists()
