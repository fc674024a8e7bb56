"""Bad input stops before any work with one line; the workdir is written only after it.

Config values, TAS fields, released shapes, .npz data, the workdir's remembered
config, its lock and unwritable paths.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from jaxprune import config_lib, data, methods, models
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.errors import UserError
from jaxprune.methods import tas


def _get_config(name, arg=None):
  return load_config(f"configs/{name}.py", arg or None)


def _one_line(e) -> str:
  message = str(e.value)
  assert "\n" not in message and len(message) < 600, message
  return message


@pytest.mark.parametrize("key,value,needle", [
    ("train.learning_rate", float("nan"), "finite"),
    ("train.learning_rate", 1e6, "(0, 100]"),
    ("tas.arch_learning_rate", -1e-3, "(0, 100]"),
    ("train.epochs", 0, "at least 1"),
    ("teacher.epochs", -3, "at least 1"),
    ("tas.batch_size", 0, ">= 1"),
    ("train.momentum", 1.0, "[0, 1)"),
    ("train.weight_decay", float("inf"), "finite"),
    ("tas.ratio", 0.0, "(0, 1)"),
    ("tas.ratio", 1.0, "(0, 1)"),
    ("tas.num_picks", 1, "no gradient"),
    ("tas.tau_min", 0.0, "> 0"),
    ("tas.tau_schedule", "exp", "cosine"),
    ("tas.released_shape", "C010-ResNet99", "C010-ResNet20"),
    ("tas.released_shape", "C010-ResNet56", "add depth=56"),
])
def test_bad_config_values_stop_before_any_work(tmp_path, key, value, needle):
  config = _get_config("tas_resnet", "smoke")
  section, name = key.split(".")
  config[section][name] = value
  workdir = tmp_path / "run"
  with pytest.raises(UserError) as info:
    methods.run(config, str(workdir))
  assert needle in _one_line(info), str(info.value)
  assert not workdir.exists()  # nothing written, nothing trained


def test_valid_configs_pass_validation():
  for name, arg in [("tas_resnet", "smoke"), ("tas_resnet", "depth=56,shape=C010-ResNet56"),
                    ("baseline_resnet", None), ("autoprune_lenet", None),
                    ("ista_resnet", None), ("dnw_cifar", None)]:
    config = _get_config(name, arg)
    config_lib.validate(config)
    if config.method == "tas":
      tas.validate(config)


def test_pretrain_may_be_skipped_with_zero_epochs():
  config = _get_config("autoprune_lenet")
  config.pretrain.epochs = 0
  config_lib.validate(config)
  config.train.epochs = 0
  with pytest.raises(UserError, match="train.epochs"):
    config_lib.validate(config)


def test_released_shapes_ship_with_the_package():
  shape = tas.released_shape("", "C100-ResNet56")
  assert shape["depth"] == 56 and shape["class_num"] == 100
  reference = REPO.parent / "shared" / "reference" / "tas_released_shapes.json"
  if reference.exists():  # the package's copy is the released file
    packaged = json.loads((REPO / "jaxprune/resources/tas_released_shapes.json").read_text())
    assert packaged == json.loads(reference.read_text())


def _npz(path, x_train, y_train, **extra):
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_train[:4], y_test=y_train[:4],
           **extra)


def _images(n, shape=(8, 8, 3)):
  return np.random.default_rng().integers(0, 256, (n, *shape), dtype=np.uint8)


def _labels(n, k):
  return np.random.default_rng().permutation(np.arange(n) % k).astype(np.int64)


def _load(path, **kw):
  return data.load(config_lib.ml_collections.ConfigDict(
      {"name": "npz", "path": str(path), "augment": "none", **kw}))


def test_npz_labels_are_checked_against_the_class_count(tmp_path, capfd):
  n = 40
  y = _labels(n, 10)
  p = tmp_path / "ok.npz"
  _npz(p, _images(n), y)
  assert _load(p)["train"].num_classes == 10
  assert "10 classes inferred" in capfd.readouterr().out
  # One stray 99 among 0..9: not silently 100 classes.
  y_bad = y.copy()
  y_bad[np.random.default_rng().integers(n)] = 99
  p = tmp_path / "bad.npz"
  _npz(p, _images(n), y_bad)
  with pytest.raises(UserError, match="no training images") as info:
    _load(p)
  _one_line(info)
  with pytest.raises(UserError, match="label 99 .*outside 0..9"):
    _load(p, num_classes=10)
  _npz(p, _images(n), y_bad, class_names=np.array([str(i) for i in range(10)]))
  with pytest.raises(UserError, match="label 99 .*class_names"):
    _load(p)
  y_neg = y.copy()
  y_neg[3] = -1
  _npz(p, _images(n), y_neg)
  with pytest.raises(UserError, match="label -1"):
    _load(p, num_classes=10)
  # A given count is taken as is (classes without images are then the user's choice).
  assert _load(tmp_path / "ok.npz", num_classes=12)["train"].num_classes == 12


def test_npz_channels_first_images_are_an_error(tmp_path):
  p = tmp_path / "nchw.npz"
  _npz(p, _images(16, (3, 32, 32)), _labels(16, 4))
  with pytest.raises(UserError, match="channels-first") as info:
    _load(p)
  _one_line(info)


def _config_a():
  config = config_lib.base_config("baseline")
  config.train = config_lib.train_config()
  return config


def test_a_workdir_without_progress_takes_a_new_config(tmp_path):
  config = _config_a()
  config_lib.check_workdir(str(tmp_path), config)
  config_lib.release_workdir(str(tmp_path))
  config.train.learning_rate = 0.3  # the user fixed the input after a failed start
  config_lib.check_workdir(str(tmp_path), config)
  config_lib.release_workdir(str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 0.3


def _progress(workdir):
  os.makedirs(workdir / "baseline" / "checkpoints" / "4")


def test_deleted_config_json_is_remembered(tmp_path):
  config = _config_a()
  config_lib.check_workdir(str(tmp_path), config)
  config_lib.release_workdir(str(tmp_path))
  _progress(tmp_path)
  os.remove(tmp_path / "config.json")
  other = _config_a()
  other.train.learning_rate = 0.3
  with pytest.raises(UserError, match="train.learning_rate: 0.1 -> 0.3") as info:
    config_lib.check_workdir(str(tmp_path), other)
  _one_line(info)
  config_lib.release_workdir(str(tmp_path))
  config_lib.check_workdir(str(tmp_path), config)  # the same config resumes
  config_lib.release_workdir(str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
      config.to_json_best_effort())


def test_damaged_config_json(tmp_path):
  config = _config_a()
  config_lib.check_workdir(str(tmp_path), config)
  config_lib.release_workdir(str(tmp_path))
  _progress(tmp_path)
  (tmp_path / "config.json").write_text('{"method": "base')  # cut off
  config_lib.check_workdir(str(tmp_path), config)  # the kept copy stands in
  config_lib.release_workdir(str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["method"] == "baseline"
  (tmp_path / "config.json").write_text("garbage")
  (tmp_path / ".jaxprune" / "config.json").write_text("garbage too")
  with pytest.raises(UserError, match="config.json is damaged") as info:
    config_lib.check_workdir(str(tmp_path), config)
  _one_line(info)
  config_lib.release_workdir(str(tmp_path))


def test_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  config = _config_a()
  config_lib.check_workdir(str(tmp_path), config)
  try:
    code = ("import sys, ml_collections; from jaxprune import config_lib\n"
            "from jaxprune.errors import UserError\n"
            "c = ml_collections.ConfigDict(__import__('json').loads(sys.argv[2]))\n"
            "try:\n  config_lib.check_workdir(sys.argv[1], c)\n"
            "except UserError as e:\n  print(e); sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path),
                           config.to_json_best_effort()], capture_output=True, text=True,
                          timeout=300, check=False, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "in use by another run" in proc.stdout and f"pid {os.getpid()}" in proc.stdout
  finally:
    config_lib.release_workdir(str(tmp_path))
  config_lib.check_workdir(str(tmp_path), config)  # free again
  config_lib.release_workdir(str(tmp_path))


def test_unwritable_workdir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match="Cannot write to the workdir") as info:
    config_lib.check_workdir(str(tmp_path / "file" / "run"), _config_a())
  _one_line(info)


def test_teacher_of_another_architecture_is_one_line(tmp_path):
  small = models.cifar_resnet(8, num_classes=4, widths=[8, 8, 8, 8, 8, 16, 16])
  other = models.cifar_resnet(8, num_classes=4, widths=[8, 8, 8, 8, 8, 16, 32])
  x = np.zeros((1, 16, 16, 3), np.float32)
  variables = small.init(jax.random.key(0), x, train=False)
  ckpt_lib.save_variables(str(tmp_path / "final"), variables)
  abstract = jax.eval_shape(lambda: other.init(jax.random.key(0), x, train=False))
  with pytest.raises(UserError, match="do not fit .* has shape") as info:
    ckpt_lib.load_variables(str(tmp_path / "final"), abstract)
  _one_line(info)


def test_batch_larger_than_the_data_stops_before_the_workdir(tmp_path):
  config = _get_config("baseline_resnet", "smoke")
  config.dataset.synthetic.update(num_train=64, num_test=16)
  config.train.batch_size = 128
  with pytest.raises(UserError, match="train.batch_size=128 exceeds the 64") as info:
    methods.run(config, str(tmp_path / "run"))
  _one_line(info)
  assert not (tmp_path / "run").exists()


def test_bad_autoprune_option_stops_before_pretraining(tmp_path):
  config = _get_config("autoprune_lenet", "smoke")
  config.autoprune.update(finetune_schedule="continue", finetune_learning_rate=0.01)
  with pytest.raises(UserError, match="finetune_schedule=restart") as info:
    methods.run(config, str(tmp_path / "run"))
  _one_line(info)
  assert not (tmp_path / "run").exists()
  config = _get_config("autoprune_lenet", "smoke")
  config.autoprune.surrogate = "cubic"
  with pytest.raises(UserError, match="cubic"):
    methods.run(config, str(tmp_path / "run"))
