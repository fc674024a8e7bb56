"""Metric logging: ``metrics.jsonl``, TensorBoard events and a progress line; only process
0 writes (other processes get a writer that does nothing)."""
import json
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np

from jaxprune.errors import UserError
from jaxprune import jsonio

# The run's JSON files (:mod:`jaxprune.jsonio`), under this module's names too.
standard, dumps = jsonio.standard, jsonio.dumps
write_json, read_json = jsonio.write_json, jsonio.read_json


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, directory: str, *, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._tb = None
    if not self._active:
      return
    self._directory = directory
    os.makedirs(directory, exist_ok=True)
    self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]):
    if not self._active:
      return
    record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    try:
      self._jsonl.write(dumps(record) + "\n")
      self._jsonl.flush()
      if self._tb is not None:
        for k, v in record.items():
          if k != "step" and isinstance(v, (int, float)):
            self._tb.add_scalar(k, v, int(step))
    except OSError as e:
      self.close(quiet=True)
      raise self._error(f"Writing the metrics of step {step}", e) from None

  def _error(self, what: str, e: OSError) -> UserError:
    return UserError(f"{what} to {self._directory} failed ({type(e).__name__}: {e}). "
                     "Free disk space (or fix the storage) and rerun the same command to "
                     "resume from the last checkpoint.")

  def close(self, quiet: bool = False):
    """Closes the files; a failed write (a full disk) is a one-line :class:`UserError`,
    or nothing with ``quiet`` (an error handler that reports the first failure)."""
    if not self._active or self._jsonl.closed:
      return
    failure = None
    try:
      self._jsonl.close()
    except OSError as e:
      failure = e
    tb, self._tb = self._tb, None
    if tb is not None:
      try:
        tb.close()
      except OSError as e:
        failure = failure or e
        _abandon(tb)
    if failure is not None and not quiet:
      raise self._error("Closing the metrics", failure) from None


def _abandon(tb):
  """Stops a tensorboardX writer whose flush failed (a full disk) without writing again:
  its background thread ends and its exit handler finds it closed (it would raise the
  same error again, with a traceback, at exit)."""
  for writer in list((getattr(tb, "all_writers", None) or {}).values()):
    events = getattr(writer, "event_writer", None)
    if events is None or getattr(events, "_closed", True):
      continue
    try:
      events._worker.stop()  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      pass
    events._closed = True  # pylint: disable=protected-access
  tb.file_writer = tb.all_writers = None


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file; a cut-off last line (a crash mid-write) is dropped.

  Any other line that does not parse as a JSON object is a :class:`UserError`.
  """
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if isinstance(record, dict) and "step" in record:
      records.append(record)
    elif i == len(lines) - 1:  # no newline after it: the write was cut off
      continue
    else:
      raise UserError(f"{path} is damaged at line {i + 1} ({line[:60]!r}); restore the "
                      "file, or delete it and rerun (the stage's log restarts).")
  return records


def rewrite_jsonl(path: str, records: list[dict]):
  """Replaces the file by ``records``, one per line (atomically)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(dumps(r) + "\n" for r in records)
  os.replace(tmp, path)


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """One line per report: step, epoch, images/s, metrics and ETA."""

  def __init__(self, name: str, total_steps: int, start_step: int, images_per_step: int,
               steps_per_epoch: int, stream=None):
    self.name, self.total = name, total_steps
    self.images_per_step, self.steps_per_epoch = images_per_step, steps_per_epoch
    self._stream = stream
    self._active = jax.process_index() == 0
    self._t, self._step = time.perf_counter(), start_step

  def rate(self, step: int) -> float:
    """Images per second since the previous call (restarts the clock)."""
    now = time.perf_counter()
    rate = (step - self._step) * self.images_per_step / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    return rate

  def line(self, step: int, metrics: Mapping[str, float], images_per_s: float):
    if not self._active:
      return
    eta = (self.total - step) * self.images_per_step / max(images_per_s, 1e-9)
    parts = [f"[{self.name}] step {step}/{self.total}",
             f"epoch {step / self.steps_per_epoch:.2f}"]
    parts += [f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)]
    parts += [f"{images_per_s:.0f} img/s", f"ETA {_duration(eta)}"]
    print(" | ".join(parts), file=self._stream or sys.stdout, flush=True)

  def message(self, text: str):
    if self._active:
      print(f"[{self.name}] {text}", file=self._stream or sys.stdout, flush=True)
