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


def require_shared(path: pathlib.Path) -> pathlib.Path:
  """Returns ``path``; a missing path fails under CI=true and skips elsewhere."""
  if not path.exists():
    msg = f"missing shared data {path} (see ../shared/data/README.md)"
    if os.environ.get("CI") == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return path
