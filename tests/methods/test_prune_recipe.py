"""The criterion-pruning recipe end to end: baseline, iterative prune + fine-tune, scratch control."""
import json

import jax
import numpy as np

import pytest

from conftest import load_config
from jaxprune import methods, surgery
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import metrics
from jaxprune.errors import UserError


def _config(arg="smoke"):
  config = load_config("configs/prune_resnet.py", arg)
  config.model.depth = 8
  config.dataset.synthetic.update(num_train=64, num_test=16, image_shape=(16, 16, 3),
                                  num_classes=4)
  config.report.inference_batch_size = 8
  for section, steps in (("train", 3), ("finetune", 2), ("scratch", 2)):
    config[section].update(batch_size=16, eval_batch_size=16, max_steps=steps,
                           log_every_steps=1)
  return config


def _forbid_selection(monkeypatch):
  """A rerun must rebuild the recorded networks: selecting again fails the test."""
  def no_selection(*args, **kwargs):
    raise AssertionError("a rerun selected channels again")
  monkeypatch.setattr(surgery, "prune_to", no_selection)


@pytest.mark.e2e
def test_iterative_pruning_meets_the_target_and_reports(tmp_path, monkeypatch):
  config = _config("smoke,steps=2,round_to=2")
  out = methods.run(config, str(tmp_path))
  assert out["flops_ratio"] <= 0.5 < out["steps"][0]["flops"] / out["dense_flops"]
  assert [s["target_ratio"] for s in out["steps"]] == [0.75, 0.5]
  for step in out["steps"]:
    assert all(w % 2 == 0 for w in step["widths"].values())
  # The control's accuracy is its final evaluation's, k of the 16 test images.
  evals = [r for r in metrics.read_jsonl(f"{tmp_path}/scratch/metrics.jsonl")
           if "eval_accuracy" in r]
  assert out["scratch_accuracy"] == evals[-1]["eval_accuracy"]
  assert abs(out["scratch_accuracy"] * 16 - round(out["scratch_accuracy"] * 16)) < 1e-6
  # The paired change (dense to last step), scored image by image on the same images.
  assert out["accuracy_change"] == pytest.approx(
      out["pruned_accuracy"] - out["dense_accuracy"], abs=1e-9)
  arch = json.load(open(tmp_path / "architecture.json"))
  assert arch["flops"] == out["pruned_flops"] and arch["shapes"]
  report = (tmp_path / "report.md").read_text()
  assert "pruned + fine-tuned" in report and "same size, from scratch" in report
  # Each step's selection is recorded before its fine-tuning; a rerun resumes every stage
  # and fine-tunes the recorded networks without selecting again (a latency selection is
  # timed, and could choose another network).
  for k, step in enumerate(out["steps"], 1):
    record = json.load(open(tmp_path / f"finetune{k}" / "pruned.json"))
    assert {g: len(kept) for g, kept in record["keep"].items()} == step["widths"]
    assert record["after"]["flops"] == step["flops"]

  _forbid_selection(monkeypatch)
  again = methods.run(config, str(tmp_path))
  assert again["pruned_flops"] == out["pruned_flops"]
  assert again["pruned_accuracy"] == out["pruned_accuracy"]


@pytest.mark.e2e
def test_taylor_criterion_uses_the_gradients_of_a_training_batch(tmp_path):
  config = _config("smoke,criterion=taylor")
  out = methods.run(config, str(tmp_path))
  assert out["criterion"] == "taylor" and out["flops_ratio"] <= 0.5
  # prune.round_to=0 (the config's default): the backend's multiple, reported.
  from jaxprune.engine import runtime  # pylint: disable=g-import-not-at-top
  assert config.prune.round_to == 0 and out["round_to_source"] == "backend default"
  assert out["round_to"] == runtime.default_round_to()
  (step,) = out["steps"]
  dense_widths = {16, 32, 64}  # cifar_resnet(8): every group wider than 8
  assert not step["fitted_round_to"] and all(
      w % out["round_to"] == 0 or w in dense_widths for w in step["widths"].values())
  # The gradients are those of the cross-entropy on batch 0 of the training split.
  from jaxprune import data, models  # pylint: disable=g-import-not-at-top
  from jaxprune.methods import prune as recipe  # pylint: disable=g-import-not-at-top
  ds = data.load(config.dataset)["train"]
  model = models.cifar_resnet(8, num_classes=4)
  variables = model.init(jax.random.key(1), np.zeros((1, 16, 16, 3), np.float32), train=False)
  grads = recipe.taylor_grads(model, variables, ds, 8, seed=3)
  batch = data.batch_at(ds, 0, 8, seed=3, train=True)
  eps = 1e-3
  w = np.asarray(variables["params"]["classifier"]["bias"])

  def loss_at(bias):
    params = {**variables["params"], "classifier": {**variables["params"]["classifier"],
                                                    "bias": bias}}
    logits = model.apply({**variables, "params": params}, batch["image"], train=False)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64))
    return -float(np.mean(np.take_along_axis(logp, batch["label"][:, None], 1)))
  numeric = [(loss_at(w + eps * e) - loss_at(w - eps * e)) / (2 * eps) for e in np.eye(4)]
  np.testing.assert_allclose(grads["classifier"]["bias"], numeric, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("override, message", [
    ({"ratio": 1.5}, "prune.ratio"), ({"criterion": "l3"}, "prune.criterion"),
    ({"steps": 0}, "prune.steps"), ({"target": "speed"}, "prune.target"),
    ({"target": "latency", "latency_grid": 0}, "prune.latency_grid"),
    ({"round_to": -1}, "prune.round_to"), ({"depth": True}, "prune.target=latency")])
def test_bad_prune_settings_are_one_line_errors_before_any_work(tmp_path, override, message):
  config = _config()
  config.prune.update(override)
  with pytest.raises(UserError, match=message):
    methods.run(config, str(tmp_path))
  assert not (tmp_path / "config.json").exists()


@pytest.mark.e2e
def test_latency_target_with_blocks_removed_runs_reports_and_resumes(tmp_path, monkeypatch):
  """prune.target=latency with prune.depth=True on a ResNet-14 (three removable blocks):
  the step's record names the removed blocks, the fine-tuned network has none of their
  variables, and a rerun rebuilds the recorded network without selecting again."""
  config = _config("smoke,target=latency")
  config.model.depth = 14
  config.prune.update(depth=True, ratio=0.3, latency_grid=2, calibration_rounds=2,
                      scratch_comparison=False)
  config.report.inference_batch_size = 1
  out = methods.run(config, str(tmp_path))
  (step,) = out["steps"]
  record = json.load(open(tmp_path / "finetune1" / "pruned.json"))
  assert step["removed_blocks"] == record["removed_blocks"]
  # (0.3 of the latency at batch 1: the narrowest widths alone leave about 0.36)
  assert record["removed_blocks"]
  assert set(record["removed_blocks"]) <= {"stage0_block1", "stage1_block1", "stage2_block1"}
  final = ckpt_lib.load_variables(str(tmp_path / "finetune1" / "final"))
  for block in record["removed_blocks"]:
    assert block not in final["params"]
  assert out["pruned_flops"] == record["after"]["flops"] < out["dense_flops"]

  _forbid_selection(monkeypatch)
  again = methods.run(config, str(tmp_path))
  assert again["pruned_flops"] == out["pruned_flops"]
  assert again["pruned_accuracy"] == out["pruned_accuracy"]
