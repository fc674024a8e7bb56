"""methods.common.start: every recipe's start-up (data, model, checks, then the workdir)."""
import json
import os

import numpy as np
import pytest

from conftest import load_config
from jaxprune import config_lib
from jaxprune.errors import UserError
from jaxprune.methods import common


def _config():
  config = load_config("configs/baseline_lenet.py", "smoke")
  rng = np.random.default_rng()
  config.dataset.synthetic.update(num_train=int(rng.integers(64, 128)), num_test=32,
                                  seed=int(rng.integers(1 << 20)))
  config.train.update(batch_size=16, eval_batch_size=16)
  return config


def test_start_runs_the_recipe_check_on_the_built_model_then_takes_the_workdir(tmp_path):
  config = _config()
  seen = []
  started = common.start(config, str(tmp_path), check=lambda model, train_ds: seen.append(
      (type(model).__name__, train_ds.num_examples)) or "checked")
  try:
    assert seen == [("LeNet5", config.dataset.synthetic.num_train)]
    assert started.checked == "checked" and type(started.model).__name__ == "LeNet5"
    assert started.input_shape == (28, 28, 1) and started.test_ds.num_examples == 32
    with open(os.path.join(tmp_path, "config.json"), encoding="utf-8") as f:
      assert json.load(f)["dataset"]["synthetic"]["num_train"] == seen[0][1]
  finally:
    config_lib.release_workdir(str(tmp_path))


def test_start_leaves_the_workdir_untouched_when_a_check_fails(tmp_path):
  config = _config()

  def check(model, train_ds):
    raise UserError(f"{type(model).__name__} refused")

  with pytest.raises(UserError, match="LeNet5 refused"):
    common.start(config, str(tmp_path / "run"), check=check)
  config.train.weight_decay_on = "no_such_layer"
  with pytest.raises(UserError, match="weight_decay_on='no_such_layer' selects no parameter"):
    common.start(config, str(tmp_path / "run"), check=lambda *a: pytest.fail("ran"))
  assert not os.path.exists(tmp_path / "run")
