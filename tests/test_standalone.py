"""The product needs nothing outside its repository: a copy with no ``../shared`` beside it
checks every command of the README and the config docstrings, and builds the released
TAS shapes from the package's own data (the wheel ships them too)."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

CHECK = r'''
import importlib, importlib.util, json, pathlib, re, sys
import jax, jax.numpy as jnp
import jaxprune
from jaxprune import config_lib, flops, methods, models
from jaxprune.methods import tas
root = pathlib.Path.cwd()
assert pathlib.Path(jaxprune.__file__).resolve().is_relative_to(root), jaxprune.__file__
assert not (root.parent / "shared").exists()
texts = [(root / "README.md").read_text()] + [p.read_text() for p in root.glob("configs/*.py")]
pattern = r"--config[ =](configs/\w+\.py(?::[\w=.,-]+)?)"
commands = sorted({m for t in texts for m in re.findall(pattern, t)})
checked = []
for command in commands:
  path, _, arg = command.partition(":")
  spec = importlib.util.spec_from_file_location("c", root / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config_lib.validate(config)
  recipe = importlib.import_module(methods.RECIPES[config.method])
  if hasattr(recipe, "validate"):
    recipe.validate(config)
  if config.method == "tas" and config.tas.released_shape:
    shape = tas.released_shape(config.tas.released_shapes_file, config.tas.released_shape)
    net = models.cifar_resnet_from_shape(shape["xchannels"], shape["xblocks"], shape["class_num"])
    abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
    assert flops.count(net, abstract, (32, 32, 3))["flops"] > 0
  checked.append(command)
print("CHECKED " + json.dumps(checked))
'''


def _copy_repository(dest: pathlib.Path):
  try:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
  except (OSError, subprocess.CalledProcessError):  # not a git checkout: copy the tree
    files = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
             if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts]
  for name in filter(None, files):
    target = dest / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / name, target)


@pytest.mark.slow
def test_a_copy_of_the_repository_alone_runs_the_documented_configs(tmp_path):
  copy = tmp_path / "repo"  # nothing beside it: no ../shared
  _copy_repository(copy)
  env = dict(os.environ, PYTHONPATH=str(copy), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", CHECK], cwd=copy, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  checked = json.loads(proc.stdout.split("CHECKED ", 1)[1])
  assert "configs/tas_resnet.py:depth=56,shape=C010-ResNet56" in checked
  assert "configs/tas_resnet.py:smoke" in checked and len(checked) >= 10
  # The wheel carries the released shapes (what `pip install` users get).
  wheel_dir = tmp_path / "wheel"
  built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(wheel_dir), str(copy)],
                         capture_output=True, text=True, timeout=600, check=False)
  assert built.returncode == 0, built.stderr[-3000:]
  (wheel,) = wheel_dir.glob("*.whl")
  with zipfile.ZipFile(wheel) as z:
    shapes = json.loads(z.read("jaxprune/resources/tas_released_shapes.json"))
  assert shapes["C010-ResNet56"]["depth"] == 56
