"""Runs ``python -m jaxprune.main`` as a user does, for the end-to-end tests."""
import json
import os
import subprocess
import sys

from conftest import REPO

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_main(*args, devices: int = 1, pythonpath=(), timeout: int = 900):
  """The finished ``jaxprune.main`` process (``.returncode``, ``.stdout``, ``.stderr``), run
  from the repository root on ``devices`` simulated CPU devices with the folders
  ``pythonpath`` (a user's model code) importable."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join([*map(str, pythonpath),
                                         os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-m", "jaxprune.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def read_report(workdir) -> dict:
  """``<workdir>/report.json``."""
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    return json.load(f)
