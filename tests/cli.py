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


def prune_smoke_on_user_code(tmp_path, module: str, source: str, *flags, devices: int = 2):
  """The prune recipe's smoke (2 steps per stage) on the factory ``<module>:make`` written
  from ``source`` into a user's code folder; returns its report (the run must succeed)."""
  code = tmp_path / "code"
  code.mkdir()
  (code / f"{module}.py").write_text(source)
  work = tmp_path / "work"
  proc = run_main("--config", "configs/prune_resnet.py:smoke",
                  f"--config.model.name={module}:make", *flags,
                  "--config.train.max_steps=2", "--config.finetune.max_steps=2",
                  "--config.scratch.max_steps=2", "--workdir", str(work), devices=devices,
                  pythonpath=[code], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return read_report(work)
