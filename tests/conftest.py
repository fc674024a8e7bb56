"""Test setup: 8 simulated CPU devices, fast compiles, shared-data location, the tiers.

Tiers (markers registered in pytest.ini, which sets ``--strict-markers``):

- ``e2e``: the end-to-end tier, left out day to day. A test is in it when it runs a
  recipe end to end -- ``jaxprune.methods.run``, a recipe module's ``run`` or
  ``jaxprune.main`` to its end, in this process or as a subprocess (the CLI, a
  fault-injection stage script), or several processes -- marked in the test file
  (``@pytest.mark.e2e`` or a module's ``pytestmark``), or when it is marked ``slow``
  (:func:`pytest_collection_modifyitems` adds ``e2e``). A test that is in neither and
  whose in-process recipe run returns fails here with what to do (a forgotten mark would
  slow down the day-to-day tier); a run stopped by an expected error does not count.
  Subprocess runs cannot be seen from here: mark them by the rule.
- ``slow``: a test that takes more than about 5 s on 2 CPU cores (compiles of big
  models, data builds, recipe stages); in a sweep over models (:func:`sweep`) every case
  but a representative few.

Day to day: ``python -m pytest -n 2 -m "not e2e" tests``; the recipe runs alone:
``-m "e2e and not slow"``; everything (the README's command): ``python -m pytest -q -n 2
tests``.
"""
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests check logic, not speed: cheaper XLA compiles, here (below) and in every
# subprocess a test starts (the CLI, stage scripts, several processes), which reads it
# from the environment.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One XLA compilation cache per test run, shared by the pytest processes (xdist workers
# inherit the controlling process's environment) and the subprocesses they start: a
# recipe, its killed twin and its resume compile their programs once. The key covers the
# program, XLA_FLAGS and the compile options. The process that made the directory
# removes it at the end; a cache the caller set is left alone.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="jaxprune-tests-xla-")
# Every compile is stored (0 s): most compiles here are short (optimisations off) and recur
# in the subprocesses and recipe reruns (new jitted functions each run). Timed in one
# alternated run (2026-12-07, clean clone, tests/e2e/test_faults*.py + test_cli.py, -n 2):
# 87 and 89 s at 0 against 92 and 93 s at 1 s.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from jaxprune.engine import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

runtime.configure_xla_flags()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

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


@pytest.fixture(autouse=True)
def _recipe_runs_are_e2e(request, monkeypatch):
  """Fails a test not marked ``e2e`` when a recipe it runs returns (see the docstring)."""
  if request.node.get_closest_marker("e2e"):
    return
  from jaxprune import methods  # pylint: disable=g-import-not-at-top

  def guard(run, name):
    def run_to_the_end(*args, **kwargs):
      out = run(*args, **kwargs)
      pytest.fail(f"{request.node.nodeid} ran {name} to its end: mark the test "
                  "@pytest.mark.e2e (tests/conftest.py)", pytrace=False)
      return out
    return run_to_the_end

  monkeypatch.setattr(methods, "run", guard(methods.run, "jaxprune.methods.run"))
  for module_name in methods.RECIPES.values():
    module = sys.modules.get(module_name)  # imported by the test module
    if module is not None and hasattr(module, "run"):
      monkeypatch.setattr(module, "run", guard(module.run, f"{module_name}.run"))


def sweep(cases, quick):
  """``parametrize`` cases of a sweep over models: a case whose value (its first value,
  for several) is not in ``quick`` is marked ``slow``. The day-to-day tier runs the
  ``quick`` ones, the full suite every case."""
  out = []
  for case in cases:
    values = case if isinstance(case, tuple) else (case,)
    out.append(pytest.param(*values, marks=() if values[0] in quick else pytest.mark.slow))
  return out


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(items):
  """Puts every ``slow`` test in the ``e2e`` tier (see the docstring)."""
  for item in items:
    if item.get_closest_marker("slow") and not item.get_closest_marker("e2e"):
      item.add_marker(pytest.mark.e2e)


def pytest_sessionfinish(session):
  """Removes the run's XLA cache (in the process that made it: see above)."""
  del session
  if _XLA_CACHE:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)
