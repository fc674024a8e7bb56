"""Test setup: 8 simulated CPU devices, fast compiles, shared-data location."""
import os
import pathlib

import pytest

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxprune.engine import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

runtime.configure_xla_flags()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Tests check logic, not speed: cheaper XLA compiles.
jax.config.update("jax_disable_most_optimizations", True)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def require(ok: bool, message: str):
  """A missing prerequisite fails the test under CI=true and skips it elsewhere."""
  if not ok:
    if os.environ.get("CI") == "true":
      pytest.fail(message)
    pytest.skip(message)


def require_shared(path: pathlib.Path) -> pathlib.Path:
  """Returns ``path`` from ``../shared``, which must exist (see :func:`require`)."""
  require(path.exists(), f"missing shared data {path} (see ../shared/data/README.md)")
  return path


def load_config(path: str, arg: str | None = None, overrides: dict | None = None):
  """``get_config(arg)`` of the config file ``path`` (relative to the repository), with
  dotted ``overrides`` such as ``{"model.depth": 8}`` applied."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("_test_config", REPO / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg is not None else module.get_config()
  for dotted, value in (overrides or {}).items():
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config
