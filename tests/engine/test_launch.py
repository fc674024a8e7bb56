"""Launchers in dry-run mode: the exact commands a TPU pod, Slurm or local launch runs."""
import random
import shlex
import subprocess
import sys

import pytest

from conftest import REPO
from jaxprune.engine import distributed
from jaxprune.errors import UserError

MAIN_ARGS = ["--config", "configs/tas_resnet.py:depth=56,dataset=cifar100",
             "--workdir", "/mnt/runs/tas 56"]  # a space: quoting must survive


def _dry_run(script: str, *options: str) -> str:
  result = subprocess.run([sys.executable, str(REPO / "launch" / script), *options,
                           "--dry_run", "--", *MAIN_ARGS],
                          capture_output=True, text=True, check=True, cwd=REPO)
  return result.stdout


def test_tpu_launcher_creates_copies_installs_and_runs_on_all_workers():
  name, zone = f"tpu-{random.randrange(10**6)}", random.choice(["us-central2-b", "eu-w4-a"])
  out = _dry_run("tpu.py", "--name", name, "--zone", zone, "--project", "proj",
                 "--create", "--accelerator", "v4-32", "--spot", "--setup", "echo ready")
  commands = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("$ ")]
  where = [f"--zone={zone}", "--project=proj"]
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  tar = "/tmp/jaxprune-src.tar.gz"
  assert commands == [
      [*tpu, "create", name, *where, "--accelerator-type=v4-32",
       "--version=tpu-ubuntu2204-base", "--spot"],
      ["tar", "czf", tar, "--exclude=.git", "--exclude=workdirs", "-C", str(REPO), "."],
      [*tpu, "scp", tar, f"{name}:~/jaxprune-src.tar.gz", *where, "--worker=all"],
      [*tpu, "ssh", name, *where, "--worker=all",
       "--command=mkdir -p ~/jaxprune && tar xzf ~/jaxprune-src.tar.gz -C ~/jaxprune && "
       "pip install -q -U 'jax[tpu]' && pip install -q -e ~/jaxprune && echo ready"],
      [*tpu, "ssh", name, *where, "--worker=all",
       "--command=cd ~/jaxprune && JAXPRUNE_DISTRIBUTED=1 python -m jaxprune.main "
       + " ".join(shlex.quote(a) for a in MAIN_ARGS)],
  ]
  # The remote shell gets back exactly the training arguments.
  remote = shlex.split(commands[-1][-1].split("=", 1)[1].split("&& ", 1)[1])
  assert remote == ["JAXPRUNE_DISTRIBUTED=1", "python", "-m", "jaxprune.main", *MAIN_ARGS]


def test_tpu_launcher_without_create_only_copies_installs_runs():
  out = _dry_run("tpu.py", "--name", "v", "--zone", "z")
  verbs = [shlex.split(line[2:])[4] if line.startswith("$ gcloud") else "tar"
           for line in out.splitlines() if line.startswith("$ ")]
  assert verbs == ["tar", "scp", "ssh", "ssh"]


def test_slurm_script_runs_one_task_per_gpu_with_term_before_the_limit():
  nodes, gpus = random.randint(1, 16), random.choice([1, 2, 4, 8])
  out = _dry_run("slurm.py", "--nodes", str(nodes), "--gpus_per_node", str(gpus),
                 "--partition", "gpu", "--time", "02:00:00", "--setup", "module load cuda",
                 "--repo", "/home/me/jaxprune")
  lines = out.splitlines()
  assert lines[0] == "#!/bin/bash"
  directives = {l.split("=")[0]: l.split("=", 1)[1] for l in lines
                if l.startswith("#SBATCH") and "=" in l}
  assert directives["#SBATCH --nodes"] == str(nodes)
  assert directives["#SBATCH --ntasks-per-node"] == str(gpus)
  assert directives["#SBATCH --gpus-per-node"] == str(gpus)
  assert directives["#SBATCH --time"] == "02:00:00"
  assert directives["#SBATCH --partition"] == "gpu"
  assert directives["#SBATCH --signal"] == "TERM@120"
  assert "#SBATCH --requeue" in lines
  body = [l for l in lines if not l.startswith("#")]
  assert body[:3] == ["set -euo pipefail", "module load cuda", "cd /home/me/jaxprune"]
  assert body[3].startswith("export JAXPRUNE_DISTRIBUTED=1")
  assert shlex.split(body[4]) == ["srun", "--kill-on-bad-exit=1", "python", "-m",
                                  "jaxprune.main", *MAIN_ARGS]


def test_local_launcher_gives_each_process_its_rank_and_device_share():
  n, d = random.randint(2, 5), random.randint(1, 4)
  out = _dry_run("local.py", "--processes", str(n), "--cpu_devices_per_process", str(d),
                 "--port", "23456")
  envs = []
  for line in out.splitlines():
    words = shlex.split(line)
    assert words[0] == "env"
    i = words.index("-m")
    assert words[i:] == ["-m", "jaxprune.main", *MAIN_ARGS]
    envs.append(dict(w.split("=", 1) for w in words[1:i - 1]))
  assert [e["JAXPRUNE_PROCESS_ID"] for e in envs] == [str(i) for i in range(n)]
  for e in envs:
    assert e["JAXPRUNE_NUM_PROCESSES"] == str(n)
    assert e["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:23456"
    assert f"--xla_force_host_platform_device_count={d}" in e["XLA_FLAGS"].split()
    assert e["JAX_PLATFORMS"] == "cpu"


def test_launchers_require_the_training_arguments_after_a_double_dash():
  for script in ("local.py", "slurm.py", "tpu.py"):
    result = subprocess.run([sys.executable, str(REPO / "launch" / script), "--dry_run"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "after '--'" in result.stderr


def test_launchers_print_their_help_without_training_arguments():
  for script in ("local.py", "slurm.py", "tpu.py"):
    for flag in ("-h", "--help"):
      result = subprocess.run([sys.executable, str(REPO / "launch" / script), flag],
                              capture_output=True, text=True, cwd=REPO)
      assert result.returncode == 0 and result.stdout.startswith(f"usage: {script}"), result


@pytest.mark.parametrize("env", [
    {"JAXPRUNE_NUM_PROCESSES": "2"},  # no process id, no coordinator
    {"JAXPRUNE_NUM_PROCESSES": "2", "JAXPRUNE_PROCESS_ID": "0"},  # no coordinator
    {"JAXPRUNE_NUM_PROCESSES": "2", "JAXPRUNE_PROCESS_ID": "2",
     "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"},  # id out of range
    {"JAXPRUNE_NUM_PROCESSES": "two", "JAXPRUNE_PROCESS_ID": "0",
     "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"},
])
def test_incomplete_multiprocess_environment_is_a_clear_error(monkeypatch, env):
  for k in ("JAXPRUNE_NUM_PROCESSES", "JAXPRUNE_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(UserError, match="JAXPRUNE_"):
    distributed.initialize()


def test_single_process_environment_initializes_nothing(monkeypatch):
  for k in ("JAXPRUNE_NUM_PROCESSES", "JAXPRUNE_PROCESS_ID", "JAXPRUNE_DISTRIBUTED"):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize() is False
  assert not distributed.is_multiprocess() and distributed.is_main_process()
  assert distributed.agreed(True) and not distributed.agreed(False)
  assert distributed.preemption_requested() is False
