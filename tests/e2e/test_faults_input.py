"""Issue 23 (items 4, 5, 6, 8, 9): bad input is one line before any work, the report's
wall time is the whole command's, and a Ctrl-C outside a stage is one line, exit 130.

The models below are user models named ``test_faults_input:<factory>`` (this folder is
on ``sys.path`` under pytest, as a user's module is on ``PYTHONPATH``).
"""
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config
from jaxprune import config_lib, graph, methods, search, surgery
from jaxprune.errors import UserError
from jaxprune.methods import tas


class MixesBatch(nn.Module):
  """Averages over the batch: (1, C) for any batch (fine at batch 1 only)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3))(x).mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x).mean(axis=0, keepdims=True)


class FlattensBatch(nn.Module):
  """``x.reshape(1, -1)``: the batch becomes features."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(self.num_classes)(x.reshape(1, -1))


class NoLayers(nn.Module):
  """Logits from a fixed projection of the input: no conv or dense layer to prune."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    scale = self.param("scale", nn.initializers.ones, (self.num_classes,))
    return x.reshape(x.shape[0], -1)[:, :self.num_classes] * scale


def mixes_batch(num_classes: int):
  return MixesBatch(num_classes)


def flattens_batch(num_classes: int):
  return FlattensBatch(num_classes)


def no_layers(num_classes: int):
  return NoLayers(num_classes)


def _one_line(info) -> str:
  message = str(info.value)
  assert "\n" not in message and len(message) < 600, message
  return message


def _refused(config, workdir, needle):
  """methods.run stops with one line containing ``needle`` and writes nothing."""
  with pytest.raises(UserError) as info:
    methods.run(config, str(workdir))
  assert needle in _one_line(info), str(info.value)
  assert not workdir.exists()
  return str(info.value)


SMALL = {"dataset.synthetic.num_train": 64, "dataset.synthetic.num_test": 32,
         "dataset.synthetic.image_shape": (8, 8, 3), "train.batch_size": 16}


@pytest.mark.parametrize("factory,needle", [("mixes_batch", "gives (1, 10) for a batch of 3"),
                                            ("flattens_batch", "ScopeParamShapeError")])
def test_model_that_mixes_or_flattens_the_batch_is_one_line_before_any_work(
    tmp_path, factory, needle):
  config = load_config("configs/baseline_resnet.py", "smoke",
                       {**SMALL, "model.name": f"test_faults_input:{factory}"})
  message = _refused(config, tmp_path / "run", needle)
  assert "mixes the examples of a batch" in message and "x.shape[0]" in message


def test_one_class_data_is_refused_at_load_also_under_tas(tmp_path):
  config = load_config("configs/baseline_resnet.py", "smoke",
                       {**SMALL, "dataset.synthetic.num_classes": 1})
  _refused(config, tmp_path / "synthetic", "at least 2 classes")
  rng = np.random.default_rng()
  n = int(rng.integers(40, 80))
  x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
  y = np.zeros(n, np.int64)  # every label 0; the file says there are 10 classes
  path = tmp_path / "one_class.npz"
  np.savez(path, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8],
           class_names=np.array([str(i) for i in range(10)]))
  for recipe in ("baseline_resnet", "tas_resnet"):
    config = load_config(f"configs/{recipe}.py", "smoke",
                         {"dataset.name": "npz", "dataset.path": str(path),
                          "dataset.augment": "none"})
    for section in ("train", "teacher", "tas"):
      if section in config:
        config[section].batch_size = 8
    if recipe == "tas_resnet":
      config.model.depth = 8
    _refused(config, tmp_path / recipe, "Every training label")


@pytest.mark.parametrize("key,value,needle", [
    ("kd.alpha", 5.0, "in [0, 1]"),
    ("kd.alpha", -0.1, "in [0, 1]"),
    ("kd.temperature", 0.0, "> 0"),
    ("tas.arch_beta1", 1.0, "in [0, 1)"),
])
def test_tas_values_out_of_range_are_one_line_before_any_work(tmp_path, key, value, needle):
  config = load_config("configs/tas_resnet.py", "smoke")
  section, name = key.split(".")
  config[section][name] = value
  assert f"config {key}={value!r}" in _refused(config, tmp_path / "run", needle)


@pytest.mark.parametrize("key", ["report.inference_batch_size", "tas.latency_batch"])
def test_inference_batch_beyond_the_device_memory_is_one_line_before_any_work(tmp_path, key):
  config = load_config("configs/tas_resnet.py", "smoke", {key: 10**9})
  message = _refused(config, tmp_path / "run", "more than the device's")
  assert f"--config.{key}=" in message


def test_prune_recipe_with_no_prunable_layer_is_one_line_before_any_work(tmp_path):
  config = load_config("configs/prune_resnet.py", "smoke",
                       {**SMALL, "model.name": "test_faults_input:no_layers"})
  _refused(config, tmp_path / "layers", "has no prunable group")


def test_every_number_a_config_file_sets_has_a_range_rule_and_a_docs_row():
  docs = (REPO / "docs" / "config_checks.md").read_text()
  names = set()
  for path in sorted((REPO / "configs").glob("*.py")):
    for arg in (None, "smoke"):
      config = load_config(f"configs/{path.name}", arg)
      config_lib.validate(config)  # the shipped configs pass
      for key, value in config_lib.flatten(config.to_dict()).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
            not key.startswith("model."):
          rule = config_lib.range_rule(key)
          assert rule is not None, key
          names.add(rule[0])
  for name in set(config_lib.RANGES) | names:
    assert f"`{name}`" in docs, name


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def _linen_convnet():
  model = ConvNet()
  return model, model.init(jax.random.key(int(np.random.randint(1 << 30))),
                           jnp.zeros((1, 8, 8, 3)))


def test_surgery_prune_takes_a_boolean_mask_as_a_mask_and_refuses_non_integers():
  model, variables = _linen_convnet()
  g = graph.trace(model, variables, (8, 8, 3))
  group = g.prunable()[0]
  rng = np.random.default_rng()
  mask = rng.random(group.width) < 0.5
  mask[rng.integers(group.width)] = True
  by_mask = surgery.prune(model, variables, (8, 8, 3), {group.id: mask}, graph=g)
  by_index = surgery.prune(model, variables, (8, 8, 3), {group.id: np.flatnonzero(mask)},
                           graph=g)
  assert jax.tree.map(np.shape, by_mask.variables) == jax.tree.map(np.shape, by_index.variables)
  for a, b in zip(jax.tree.leaves(by_mask.variables), jax.tree.leaves(by_index.variables)):
    np.testing.assert_array_equal(a, b)
  kernel = next(leaf for path, leaf in jax.tree_util.tree_leaves_with_path(by_mask.variables)
                if leaf.ndim == 4)
  assert kernel.shape[-1] == mask.sum()  # not 2 channels (True, False as indices 1, 0)
  for keep, needle in [({group.id: mask[:-1]}, "boolean mask of shape"),
                       ({group.id: [0.0, 2.7]}, "float64 values"),
                       ({group.id + 0.7: [0, 1]}, "a group id is an int"),
                       ({True: [0, 1]}, "a group id is an int")]:
    with pytest.raises(UserError) as info:
      surgery.prune(model, variables, (8, 8, 3), keep, graph=g)
    assert needle in _one_line(info)
  with pytest.raises(UserError, match="round_to=2.5"):
    surgery.prune_to(model, variables, (8, 8, 3), flops_ratio=0.5, round_to=2.5)
  with pytest.raises(UserError, match="num_picks must be an int >= 2"):
    search.SearchSpace(model, variables, (8, 8, 3), num_picks=1)
  with pytest.raises(UserError, match="round_to must be an int >= 1"):
    search.SearchSpace(model, variables, (8, 8, 3), round_to=2.5)


@pytest.mark.parametrize("value", [0.0, -0.3, float("nan")])
def test_latency_table_with_a_time_that_is_not_positive_is_named(value):
  rng = np.random.default_rng()
  ms = rng.uniform(0.01, 1.0, int(rng.integers(3, 20)))
  tas.check_latency_times(ms, "w/search/latency_table.json")  # a good table passes
  ms[rng.integers(ms.size)] = value
  with pytest.raises(UserError) as info:
    tas.check_latency_times(ms, "w/search/latency_table.json")
  assert "w/search/latency_table.json" in _one_line(info) and "1 of" in str(info.value)


def _hold(workdir, seconds, config):
  """One invocation on ``workdir`` that lasts ``seconds``: ``(start, end)``."""
  config_lib.start_invocation()
  start = time.time()
  config_lib.check_workdir(str(workdir), config)
  time.sleep(seconds)
  config_lib.release_workdir(str(workdir))
  return start, time.time()


def test_report_wall_time_sums_every_invocation_to_its_exit_killed_ones_to_last_write(
    tmp_path):
  from jaxprune.engine import report  # pylint: disable=g-import-not-at-top
  config = load_config("configs/baseline_lenet.py", "smoke")
  workdir = tmp_path / "run"
  workdir.mkdir()
  a = _hold(workdir, 0.3, config)
  # A run killed by SIGKILL: it takes the lock, writes a file, then dies unrecorded.
  code = ("import sys, time; from jaxprune.engine import workdir as w; "
          "start = w.start_invocation(); w.lock(sys.argv[1]); time.sleep(0.4); "
          "open(sys.argv[1] + '/ckpt', 'w').write('x'); print(start, flush=True); "
          "time.sleep(60)")
  proc = subprocess.Popen([sys.executable, "-c", code, str(workdir)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  killed_start = float(proc.stdout.readline())
  while not (workdir / "ckpt").exists():
    time.sleep(0.05)
  last_write = os.stat(workdir / "ckpt").st_mtime
  proc.kill()
  proc.wait()
  config_lib.start_invocation(time.time() - 0.5)  # the CLI's process start, 0.5 s ago
  config_lib.start_invocation()
  start = time.time() - 0.5
  config_lib.check_workdir(str(workdir), config)
  time.sleep(0.2)
  report.write_report(str(workdir), {"wall_time_s": 1.0}, title="t")
  now = time.time()
  config_lib.release_workdir(str(workdir))
  got = json.loads((workdir / "report.json").read_text())["wall_time_s"]
  want = (a[1] - a[0]) + (last_write - killed_start) + (now - start)
  assert want - 0.1 <= got <= want + 0.05, (got, want)
  assert got >= 0.3 + 0.4 + 0.7 - 0.1


_OUTSIDE_A_STAGE = """
import os, signal, sys, time
sys.path.insert(0, "tests")
from conftest import load_config
from jaxprune import config_lib, main, methods
signal.signal(signal.SIGINT, main._on_sigint)  # what python -m jaxprune.main installs

def recipe(config, workdir):  # holds the workdir, then a Ctrl-C between two stages
  config_lib.check_workdir(workdir, config)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(30)

methods.run = recipe
main.run(load_config("configs/baseline_lenet.py", "smoke"), sys.argv[1])
"""


def test_sigint_outside_a_stage_is_one_line_exit_130(tmp_path):
  """A Ctrl-C inside ``methods.run`` but outside ``run_stage`` (between stages, while
  final variables or the report are written), once the workdir is taken."""
  proc = subprocess.run([sys.executable, "-c", _OUTSIDE_A_STAGE, str(tmp_path / "run")],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 130, proc.stderr[-2000:]
  assert len(err) == 1 and err[0].startswith("interrupted (SIGINT) outside a training "
                                             "stage"), err
  assert (tmp_path / "run" / "config.json").exists()


def test_sigint_during_start_up_is_one_line_exit_130(tmp_path):
  proc = subprocess.Popen([sys.executable, "-m", "jaxprune.main", "--config",
                           "configs/baseline_lenet.py:smoke", "--workdir", str(tmp_path / "w")],
                          cwd=REPO, stderr=subprocess.PIPE, text=True)
  # Inside the imports (~3 s; at 0.5-1.2 s a KeyboardInterrupt once landed in jax's
  # garbage-collection callback, which swallowed it: the run went on).
  time.sleep(0.3 + np.random.default_rng().uniform(0, 1.5))
  proc.send_signal(signal.SIGINT)
  err = proc.communicate(timeout=120)[1].strip().splitlines()
  assert proc.returncode == 130, err
  assert len(err) == 1 and "interrupted (SIGINT) before any work" in err[0], err
  assert not (tmp_path / "w").exists()
