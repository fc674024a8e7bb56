"""Multi-process runs: joining JAX's multi-controller runtime, agreeing across processes,
preemption. Knows no models, datasets or methods."""
import contextlib
import fcntl
import itertools
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxprune import jsonio
from jaxprune.errors import UserError

ENV_NUM_PROCESSES = "JAXPRUNE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXPRUNE_PROCESS_ID"
ENV_AUTO = "JAXPRUNE_DISTRIBUTED"

_sync_ids = itertools.count()


def initialize() -> bool:
  """Joins the multi-process runtime when the environment says to; returns whether it did.

  Call once per process before the first JAX computation.

  Raises:
    UserError: for an incomplete or malformed explicit setting.
  """
  num, pid = os.environ.get(ENV_NUM_PROCESSES), os.environ.get(ENV_PROCESS_ID)
  if num is not None or pid is not None:
    if num is None or pid is None or not os.environ.get("JAX_COORDINATOR_ADDRESS"):
      raise UserError(f"A multi-process run needs {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} "
                      "and JAX_COORDINATOR_ADDRESS (host:port of process 0) all set; "
                      "use launch/local.py or set all three.")
    try:
      num, pid = int(num), int(pid)
    except ValueError:
      raise UserError(f"{ENV_NUM_PROCESSES}={num!r} and {ENV_PROCESS_ID}={pid!r} must "
                      "be integers.") from None
    if not 0 <= pid < num:
      raise UserError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={num}).")
    jax.distributed.initialize(num_processes=num, process_id=pid)
    return True
  if os.environ.get(ENV_AUTO, "0") not in ("", "0"):
    jax.distributed.initialize()  # Cluster auto-detection (TPU, Slurm, MPI, K8s).
    return True
  return False


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_main_process() -> bool:
  """Process 0: the one that writes metrics, reports, plots and JSON products."""
  return jax.process_index() == 0


def barrier(name: str):
  """Blocks until every process gets here (a no-op for one process)."""
  if is_multiprocess():
    multihost_utils.sync_global_devices(f"jaxprune:{name}")


def agreed(value: bool) -> bool:
  """Process 0's ``value`` on every process (so all take the same branch)."""
  if not is_multiprocess():
    return bool(value)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(value))))


def from_main(value) -> np.ndarray:
  """Process 0's array on every process (e.g. times it measured; same shape on all)."""
  if not is_multiprocess():
    return np.asarray(value)
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def json_from_main(obj):
  """Process 0's JSON-able ``obj`` on every process (others may pass anything)."""
  if not is_multiprocess():
    return obj
  data = (np.frombuffer(jsonio.dumps(obj).encode("utf-8"), np.uint8) if is_main_process()
          else np.zeros(0, np.uint8))
  size = int(from_main(np.asarray([data.size], np.int64))[0])
  buf = np.zeros(size, np.uint8)
  if is_main_process():
    buf[:] = data
  return json.loads(from_main(buf).tobytes().decode("utf-8"))


def preemption_requested() -> bool:
  """Whether all processes have reached the agreed stop after a SIGTERM anywhere.

  Call exactly once per training step on every process (the calls are numbered
  and must match across processes). Always False for a single process, which
  handles its signals itself (``engine.loop.catch_signals``).
  """
  if not is_multiprocess():
    return False
  return multihost_utils.reached_preemption_sync_point(next(_sync_ids))


@contextlib.contextmanager
def main_process_first(name: str, lock_path: str | None = None):
  """Process 0 runs the block first, then the others (e.g. building a dataset).

  With shared storage the others then find the work done; with per-host disks
  each host does it once, serialised by an exclusive lock on ``lock_path``.
  """
  if not is_main_process():
    barrier(f"{name}:main-done")
  lock = None
  if lock_path is not None and is_multiprocess():
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    lock = open(lock_path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    fcntl.flock(lock, fcntl.LOCK_EX)
  try:
    yield
  finally:
    if lock is not None:
      fcntl.flock(lock, fcntl.LOCK_UN)
      lock.close()
    if is_main_process():
      barrier(f"{name}:main-done")
