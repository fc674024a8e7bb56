"""Config helpers: argument parsing and the workdir compatibility check."""
import json
import os
import pathlib

import pytest

from jaxprune import config_lib
from jaxprune.errors import UserError


def test_parse_arg_types_flags_and_errors():
  args = config_lib.parse_arg("smoke,depth=56,ratio=0.6,kd=false,dataset=cifar100",
                              depth=20, ratio=0.47, kd=True, dataset="cifar10", smoke=False)
  assert (args.smoke, args.depth, args.ratio, args.kd, args.dataset) == (
      True, 56, 0.6, False, "cifar100")
  with pytest.raises(UserError, match="depth"):
    config_lib.parse_arg("dept=3", depth=20)
  with pytest.raises(UserError, match="int"):
    config_lib.parse_arg("depth=deep", depth=20)
  with pytest.raises(UserError, match="needs a value"):
    config_lib.parse_arg("depth", depth=20)


def test_workdir_accepts_logging_changes_and_rejects_others(tmp_path):
  config = config_lib.base_config("baseline")
  config.train = config_lib.train_config()
  config.tas = config_lib.train_config()
  config_lib.check_workdir(str(tmp_path), config)
  (tmp_path / "train" / "checkpoints" / "8").mkdir(parents=True)  # the run has progress
  config.tas.log_every_steps = 7
  config.train.checkpoint_every_steps = 11
  config_lib.check_workdir(str(tmp_path), config)  # only how often it logs/saves
  assert json.loads((tmp_path / "config.json").read_text())["tas"]["log_every_steps"] == 7
  config.train.learning_rate = 0.2
  with pytest.raises(UserError, match="train.learning_rate"):
    config_lib.check_workdir(str(tmp_path), config)
  config_lib.release_workdir(str(tmp_path))


def test_every_cifar_config_maps_cifar10_subset_to_the_shared_npz():
  from conftest import REPO, load_config  # pylint: disable=g-import-not-at-top
  names = ["baseline_resnet", "tas_resnet", "ista_resnet", "ista_convnet", "dnw_cifar",
           "autoprune_vgg"]
  for name in names:
    dataset = load_config(f"configs/{name}.py", "dataset=cifar10_subset").dataset
    assert (dataset.name, dataset.path) == ("npz", config_lib.CIFAR10_SUBSET_NPZ), name
    # ../shared beside the repository (as a path: the checkout may reach it through a link).
    assert os.path.normpath(REPO / dataset.path) == os.path.normpath(
        REPO.parent / "shared/data/cifar10-subset" / pathlib.Path(dataset.path).name)


def test_runtime_settings_are_checked_and_follow_the_backend(monkeypatch):
  """config.runtime: bad values are one-line errors before any work; "auto" decides the
  XLA:CPU flag from the platform JAX will use without starting a backend."""
  import jaxlib
  from jaxprune.engine import runtime
  for key, bad in (("layers", "fast"), ("xla_cpu_flags", "yes"), ("malloc_tuning", "1")):
    config = config_lib.base_config("baseline")
    config.runtime[key] = bad
    with pytest.raises(UserError) as e:
      config_lib.validate(config)
    assert f"runtime.{key}={bad!r}" in str(e.value) and "\n" not in str(e.value)
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not runtime.cpu_expected()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert runtime.cpu_expected()
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert not runtime.configure({"xla_cpu_flags": "off"})
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert not runtime.configure({"xla_cpu_flags": "auto"})  # not a CPU run: left alone
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  tested = tuple(int(v) for v in jaxlib.__version__.split(".")[:2]) in runtime._TESTED_JAXLIB
  assert runtime.configure({"xla_cpu_flags": "on"}) == tested  # set even on a TPU host
  assert all(f in os.environ["XLA_FLAGS"] for f in runtime.CPU_FLAGS) == tested
  with pytest.raises(UserError, match="runtime.xla_cpu_flags='maybe'"):
    runtime.configure({"xla_cpu_flags": "maybe"})
