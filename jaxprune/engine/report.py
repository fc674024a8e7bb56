"""The end-of-run report (``report.json`` + ``report.md``) and measured inference time
(:func:`measure_inference` for one network, :func:`compare_inference` for a speed-up)."""
import functools
import glob
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import config_lib
from jaxprune.engine import metrics as metrics_lib
from jaxprune.errors import UserError


def measure_inference(model, variables, input_shape, batch_size: int = 128,
                      repeats: int = 10) -> dict:
  """Median wall time of a jitted eval-mode forward pass on one device.

  Returns ``{"batch_size", "ms_per_batch", "images_per_s"}``; compile time excluded.
  """
  device = jax.local_devices()[0]
  # A local copy: the run's variables may be replicated over every process's devices.
  variables = jax.device_put(jax.device_get(variables), device)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (batch_size, *input_shape),
                                       jnp.float32), device)
  _first_call(functools.partial(forward, variables), x, batch_size)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(forward(variables, x))
    times.append(time.perf_counter() - t)
  ms = float(np.median(times)) * 1e3
  return {"batch_size": batch_size, "ms_per_batch": ms,
          "images_per_s": batch_size / ms * 1e3, "device": device.device_kind}


def compare_inference(nets: Mapping[str, tuple[Any, Any]], input_shape,
                      batch_size: int = 128, rounds: int = 20) -> dict[str, float]:
  """Median ms per batch of every network's jitted eval-mode forward, timed alternately.

  ``nets`` maps a name to ``(model, variables)``. Each round calls every network once,
  in turn, on the same input, so the machine's drift (other jobs, clock changes) hits
  all of them alike and their ratios (a speed-up) come from the same moments; the
  median over ``rounds`` rounds is kept, compile time excluded.
  """
  device = jax.local_devices()[0]
  x = jax.device_put(jax.random.normal(jax.random.key(0), (batch_size, *input_shape),
                                       jnp.float32), device)
  calls = {}
  for name, (model, variables) in nets.items():
    forward = jax.jit(lambda v, x_, m=model: m.apply(v, x_, train=False))
    local = jax.device_put(jax.device_get(variables), device)
    calls[name] = functools.partial(forward, local)
    _first_call(calls[name], x, batch_size)
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      t = time.perf_counter()
      jax.block_until_ready(call(x))
      times[name].append(time.perf_counter() - t)
  return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def _first_call(call, x, batch_size: int):
  """Compiles and runs ``call(x)`` once; running out of device memory is one line."""
  try:
    jax.block_until_ready(call(x))
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    raise UserError(f"The inference benchmark at batch {batch_size} ran out of device memory"
                    " (config report.inference_batch_size); the trained stages are kept: "
                    "rerun with a smaller --config.report.inference_batch_size to write the "
                    "report.") from None


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
  (:func:`jaxprune.config_lib.run_wall_time`); ``stage_time_s`` gives each stage's
  training time, summed over the invocations that trained it.
  """
  if jax.process_index() != 0:
    return
  report = dict(report)
  times = stage_times(workdir)
  if times:
    report["stage_time_s"] = times
  if "wall_time_s" in report:
    total = config_lib.run_wall_time(workdir)
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
