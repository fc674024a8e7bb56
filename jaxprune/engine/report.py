"""The end-of-run report (``report.json`` + ``report.md``); the inference timers it
reports are :mod:`jaxprune.latency`'s (also importable from here)."""
import functools
import glob
import os
from typing import Any, Mapping

import jax

from jaxprune import latency
from jaxprune.engine import metrics as metrics_lib
from jaxprune.engine import workdir as workdir_lib
from jaxprune.errors import UserError


def _report_batch(timer):
  """``timer`` (a :mod:`jaxprune.latency` timer) whose out-of-memory line names the
  config key that sets the report's batch."""
  @functools.wraps(timer)
  def timed(*args, **kwargs):
    try:
      return timer(*args, **kwargs)
    except latency.OutOfMemory as e:
      raise UserError(f"The inference benchmark at batch {e.batch_size} ran out of device "
                      "memory (config report.inference_batch_size); the trained stages are "
                      "kept: rerun with a smaller --config.report.inference_batch_size to "
                      "write the report.") from None
  return timed


measure_inference = _report_batch(latency.measure_inference)
compare_inference = _report_batch(latency.compare_inference)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, int) and abs(v) >= 10_000:
    return f"{v:,}"
  return str(v)


def _md_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
  cols = list(dict.fromkeys(k for r in rows.values() for k in r))
  lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name, r in rows.items():
    lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
  return "\n".join(lines)


def stage_times(workdir: str) -> dict[str, float]:
  """Training time of every finished stage in the workdir, summed over all the runs
  (interrupted and resumed) that trained it: ``{stage: seconds}``."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "*", "summary.json"))):
    try:
      summary = metrics_lib.read_json(path)
    except UserError:
      continue
    if isinstance(summary, dict) and isinstance(summary.get("train_time_s"), (int, float)):
      out[os.path.basename(os.path.dirname(path))] = float(summary["train_time_s"])
  return out


def write_report(workdir: str, report: dict, *, title: str,
                 models: Mapping[str, Mapping[str, Any]] | None = None):
  """Writes ``report.json`` (everything) and ``report.md`` (a readable summary).

  ``models`` maps a model name ("base", "pruned", ...) to its row of numbers
  (accuracy, FLOPs, params, measured time) and becomes the markdown table. A
  ``wall_time_s`` becomes the whole command's time, summed over every invocation
  that worked in ``workdir`` (interrupted, failed and resumed ones), each from its
  process start to its exit, this one up to this report
  (:func:`jaxprune.engine.workdir.run_wall_time`); ``stage_time_s`` gives each stage's
  training time, summed over the invocations that trained it.
  """
  if jax.process_index() != 0:
    return
  report = dict(report)
  times = stage_times(workdir)
  if times:
    report["stage_time_s"] = times
  if "wall_time_s" in report:
    total = workdir_lib.run_wall_time(workdir)
    if total is not None:
      report["wall_time_s"] = total
  full = dict(report)
  if models:
    full["models"] = {k: dict(v) for k, v in models.items()}
  metrics_lib.write_json(os.path.join(workdir, "report.json"), full)
  lines = [f"# {title}", ""]
  for k, v in report.items():
    if not isinstance(v, (dict, list)):
      lines.append(f"- **{k}**: {_fmt(v)}")
  if times:
    lines.append("- **stage_time_s**: " + ", ".join(f"{k} {_fmt(v)}" for k, v in times.items()))
  if models:
    lines += ["", _md_table(models)]
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
