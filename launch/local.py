r"""Runs one jaxprune job as N processes on this machine (127.0.0.1), as on N hosts.

Each process gets a share of simulated CPU devices (or the machine's GPUs split
by ``--gpus_per_process``) and the environment that makes
``jaxprune.engine.distributed.initialize`` join them into one multi-process run:
``JAX_COORDINATOR_ADDRESS``, ``JAXPRUNE_NUM_PROCESSES``, ``JAXPRUNE_PROCESS_ID``.
Output lines are prefixed with ``[pI]``. SIGINT/SIGTERM to the launcher go to
every process as SIGTERM (all checkpoint at one agreed step and exit 143);
relaunching the same command resumes. If a process fails, the others are
stopped after ``--grace_s`` seconds.

  # 2 processes x 4 simulated CPU devices (= 1 process with 8 devices):
  python launch/local.py --processes 2 --cpu_devices_per_process 4 -- \
      --config configs/baseline_resnet.py:smoke --workdir /tmp/jaxprune_2proc
  # Print the commands and environments only:
  python launch/local.py --processes 2 --dry_run -- --config ... --workdir ...
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

FAILURE_CODES_NOT_STOPPING_OTHERS = (0, 128 + signal.SIGTERM, 128 + signal.SIGINT)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_envs(n: int, port: int, cpu_devices: int | None,
                 gpus_per_process: int | None, base_env=None) -> list[dict]:
  """The environment of each of the ``n`` processes."""
  envs = []
  for i in range(n):
    env = dict(os.environ if base_env is None else base_env)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAXPRUNE_NUM_PROCESSES=str(n), JAXPRUNE_PROCESS_ID=str(i))
    if cpu_devices:
      flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
      env["XLA_FLAGS"] = " ".join(flags + [
          f"--xla_force_host_platform_device_count={cpu_devices}"])
      env["JAX_PLATFORMS"] = "cpu"
    if gpus_per_process:
      env["CUDA_VISIBLE_DEVICES"] = ",".join(
          str(i * gpus_per_process + g) for g in range(gpus_per_process))
    envs.append(env)
  return envs


def _pump(stream, prefix: str):
  for line in iter(stream.readline, b""):
    sys.stdout.buffer.write(prefix.encode() + line)
    sys.stdout.flush()


def run(command: list[str], envs: list[dict], grace_s: float) -> int:
  """Starts every process, forwards signals, returns the job's exit code."""
  procs = []
  for i, env in enumerate(envs):
    p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    print(f"[launch] process {i}: pid {p.pid}", flush=True)
    threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] "), daemon=True).start()
    procs.append(p)

  def forward(signum, frame):
    del signum, frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)
  failed_at = None
  while any(p.poll() is None for p in procs):
    codes = [p.poll() for p in procs]
    if failed_at is None and any(c not in (None, *FAILURE_CODES_NOT_STOPPING_OTHERS)
                                 for c in codes):
      failed_at = time.monotonic()
      print(f"[launch] a process failed (exit codes {codes}); stopping the others in "
            f"{grace_s:g} s", flush=True)
    if failed_at is not None and time.monotonic() - failed_at > grace_s:
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.2)
  codes = [p.wait() for p in procs]
  time.sleep(0.2)  # let the output threads drain
  print(f"[launch] exit codes {codes}", flush=True)
  return next((c for c in codes if c != 0), 0)


def main(argv):
  options, main_args = common.split_argv(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--cpu_devices_per_process", type=int, default=None,
                      help="simulated CPU devices per process (sets JAX_PLATFORMS=cpu)")
  parser.add_argument("--gpus_per_process", type=int, default=None,
                      help="split this machine's GPUs: process i sees GPUs "
                      "i*G .. i*G+G-1 (CUDA_VISIBLE_DEVICES)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--grace_s", type=float, default=30.0)
  parser.add_argument("--dry_run", action="store_true")
  args = parser.parse_args(options)
  if args.processes < 1:
    parser.error("--processes must be >= 1")
  port = args.port or free_port()
  command = common.main_command(main_args, python=sys.executable)
  envs = process_envs(args.processes, port, args.cpu_devices_per_process,
                      args.gpus_per_process)
  if args.dry_run:
    keys = ("JAX_COORDINATOR_ADDRESS", "JAXPRUNE_NUM_PROCESSES", "JAXPRUNE_PROCESS_ID",
            "XLA_FLAGS", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")
    for env in envs:
      shown = [f"{k}={env[k]}" for k in keys if k in env]
      print(common.shell_join(["env", *shown, *command]))
    return 0
  return run(command, envs, args.grace_s)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
