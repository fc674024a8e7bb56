"""ISTA recipe end to end: staged lambda, pruning, fine-tuning, dense comparison, report."""
import json
import os

import jax
import jax.numpy as jnp
import pytest

from conftest import load_config
from jaxprune import flops, methods, models
from jaxprune.errors import UserError
from jaxprune.methods import ista as ista_recipe


def _config(name="ista_resnet", arg="smoke"):
  config = load_config(f"configs/{name}.py", arg)
  config.dataset.synthetic.update(num_train=64, num_test=16, image_shape=(16, 16, 3),
                                  num_classes=4)
  config.report.inference_batch_size = 8
  for section, steps in (("warmup", 2), ("sparsify", 3), ("finetune", 2), ("dense", 2)):
    config[section].update(batch_size=16, eval_batch_size=16, max_steps=steps,
                           log_every_steps=1)
  return config


@pytest.mark.e2e
def test_resnet_smoke_runs_all_stages_and_reports(tmp_path):
  config = _config(arg="smoke,dense")
  config.model.depth = 8
  config.sparsify.l1 = 20.0  # one prox step zeroes every gamma below lr * 20 * rho
  config.sparsify.max_steps = 8  # two epochs of 4 steps: zeros must survive an epoch
  out = methods.run(config, str(tmp_path))
  n = config.dataset.synthetic.num_test
  for key in ("accuracy_before_pruning", "accuracy_after_pruning",
              "accuracy_after_finetune", "dense_accuracy"):
    assert abs(out[key] * n - round(out[key] * n)) < 1e-6, key  # k of the n test images
  # Removing the zero-gamma channels is exact: the same predictions before and after.
  assert out["accuracy_after_pruning"] == out["accuracy_before_pruning"]
  assert out["zero_gamma_fraction"] > 0.5 and 0.5 < out["channels_removed_fraction"] <= 1
  assert out["pruned_params"] < out["base_params"]
  # No target by design; the report gives the FLOPs and the measured speed-up.
  assert out["flops_speedup"] == out["base_flops"] / out["pruned_flops"] > 1
  assert out["speedup"] > 0
  # The paired change (warm-up to fine-tuned), scored image by image on the same images.
  assert out["accuracy_change"] == pytest.approx(
      out["accuracy_after_finetune"] - out["warmup_accuracy"], abs=1e-9)
  eq = out["equivalence"]
  assert eq["interior_max_abs_diff"] <= 1e-4 * max(eq["activation_max_abs"], 1.0)
  arch = json.load(open(tmp_path / "architecture.json"))
  assert arch["params"] == out["pruned_params"]
  history = [json.loads(l) for stage in ("warmup", "sparsify", "finetune")
             for l in open(tmp_path / stage / "gamma_history.jsonl")]
  assert [r["stage"] for r in history][0] == "warmup"
  steps = [r["step"] for r in history]
  assert steps == sorted(steps)
  # The prox keeps zeros exactly zero between epochs: the fraction never falls in sparsify.
  sparse = [r["zero_fraction"] for r in history if r["stage"] == "sparsify"]
  assert len(sparse) >= 2 and sparse == sorted(sparse), sparse
  for name in ("ista_zero_fraction.png", "ista_gamma_histograms.png"):
    assert os.path.getsize(tmp_path / "plots" / name) > 0
  report = open(tmp_path / "report.md").read()
  assert "pruned + fine-tuned" in report and "dense, equal params" in report


def test_convnet_smoke_config_builds_the_paper_convnet_family():
  config = _config("ista_convnet")
  assert config.model.name == "convnet" and config.method == "ista"
  full = _config("ista_convnet", "dataset=cifar10")
  assert tuple(full.model.features) == (96, 192, 192) and tuple(full.model.hidden) == (384,)
  assert (full.warmup.l1, full.sparsify.l1, full.finetune.l1) == (0.001, 0.005, 0.0)
  assert full.finetune.learning_rate == 0.01 and full.sparsify.momentum == 0.0


def test_unknown_rho_mode_is_a_user_error():
  with pytest.raises(UserError, match="ista.rho"):
    ista_recipe.penalties(None, (16, 16, 3), "flops")


def test_dense_comparison_matches_the_pruned_parameter_count():
  model = models.convnet(features=(24, 32, 32), hidden=(64,))
  dense, multiplier = ista_recipe.dense_equal_params(model, 20_000, (16, 16, 3))
  n = flops.count_params(jax.eval_shape(lambda: dense.init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)))
  assert abs(n - 20_000) / 20_000 < 0.1 and 0 < multiplier < 1
