"""A run's workdir: its lock and its invocation log (the report's ``wall_time_s``)."""
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

# The lock file of each workdir this process holds (see lock).
_LOCKS: dict[str, Any] = {}
# When this invocation started (time.time()): set by start_invocation.
_INVOCATION = {"start": None, "pending": None}
INVOCATIONS = "invocations.jsonl"  # in <workdir>/.jaxprune: one start and end per run


def start_invocation(started: float | None = None) -> float | None:
  """Marks the start of the invocation the report's ``wall_time_s`` counts.

  The CLI passes its process start (kept until :func:`jaxprune.methods.run` calls this
  without a time and makes it this invocation's start); a library caller's invocation
  starts when ``methods.run`` is called. Returns the invocation's start (None while only
  pending).
  """
  if started is not None:
    _INVOCATION["pending"] = started
    return None
  _INVOCATION["start"] = _INVOCATION["pending"] or time.time()
  _INVOCATION["pending"] = None
  return _INVOCATION["start"]


def _record_invocation(workdir: str, kind: str):
  """Appends ``{"start": t}`` or ``{"end": t}`` to the workdir's invocation log (process 0,
  under the lock); a failed write loses only this run's share of ``wall_time_s``."""
  if _INVOCATION["start"] is None:
    return
  # "locked": when this run took the workdir (a run killed before it wrote last then).
  record = ({"start": _INVOCATION["start"], "locked": time.time()} if kind == "start" else
            {"end": time.time()})
  try:
    with open(os.path.join(meta_dir(workdir), INVOCATIONS), "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
  except OSError:
    pass


def _last_write(workdir: str, before: float) -> float | None:
  """The newest modification time in ``workdir`` earlier than ``before`` (the end of a run
  that was killed without a chance to record it)."""
  last = None
  for root, dirs, files in os.walk(workdir):
    dirs[:] = [d for d in dirs if d != ".jaxprune"] if root == workdir else dirs
    for name in files:
      try:
        t = os.stat(os.path.join(root, name)).st_mtime
      except OSError:
        continue
      if t < before and (last is None or t > last):
        last = t
  return last


def run_wall_time(workdir: str) -> float | None:
  """Seconds of every invocation that held ``workdir``, this one up to now: from each
  process start (CLI) or ``methods.run`` call (library) to its exit; a run killed without
  warning (SIGKILL) counts up to its last write to the workdir. None before
  :func:`start_invocation`."""
  if _INVOCATION["start"] is None:
    return None
  now = time.time()
  try:
    with open(os.path.join(meta_dir(workdir), INVOCATIONS), encoding="utf-8") as f:
      records = []
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # a cut last line (a kill while appending)
  except OSError:
    records = []
  total, start = 0.0, None
  for r in records:
    if not isinstance(r, dict):
      continue
    if "start" in r:
      if start is not None:  # killed: no end recorded
        total += max((_last_write(workdir, r.get("locked", r["start"])) or start) - start, 0.0)
      start = None if r["start"] == _INVOCATION["start"] else r["start"]
    elif "end" in r and start is not None:
      total += max(r["end"] - start, 0.0)
      start = None
  if start is not None:  # killed, and this run's start is not in the log
    total += max((_last_write(workdir, _INVOCATION["start"]) or start) - start, 0.0)
  return total + now - _INVOCATION["start"]


def meta_dir(workdir: str) -> str:
  return os.path.join(workdir, ".jaxprune")


def lock(workdir: str) -> str | None:
  """Takes ``<workdir>/.jaxprune/lock`` (process 0 only); the holder's line, or None."""
  key = os.path.realpath(workdir)
  if key in _LOCKS:
    return None
  path = os.path.join(meta_dir(workdir), "lock")
  f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    return holder
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(sys.argv)}\n")
  f.flush()
  _LOCKS[key] = f
  _record_invocation(workdir, "start")
  return None


def held() -> bool:
  """Whether this process holds a workdir's lock (a Ctrl-C then unwinds instead of
  exiting at once: ``jaxprune.main``)."""
  return bool(_LOCKS)


def release_workdir(workdir: str):
  """Releases the lock :func:`lock` took for ``config_lib.check_workdir`` (process exit
  releases it too)."""
  f = _LOCKS.pop(os.path.realpath(workdir), None)
  if f is not None:
    _record_invocation(workdir, "end")
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()
