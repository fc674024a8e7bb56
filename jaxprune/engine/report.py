"""The end-of-run report (``report.json`` + ``report.md``) and measured inference time."""
import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


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
  jax.block_until_ready(forward(variables, x))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(forward(variables, x))
    times.append(time.perf_counter() - t)
  ms = float(np.median(times)) * 1e3
  return {"batch_size": batch_size, "ms_per_batch": ms,
          "images_per_s": batch_size / ms * 1e3, "device": device.device_kind}


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


def write_report(workdir: str, report: dict, *, title: str,
                 models: Mapping[str, Mapping[str, Any]] | None = None):
  """Writes ``report.json`` (everything) and ``report.md`` (a readable summary).

  ``models`` maps a model name ("base", "pruned", ...) to its row of numbers
  (accuracy, FLOPs, params, measured time) and becomes the markdown table.
  """
  if jax.process_index() != 0:
    return
  full = dict(report)
  if models:
    full["models"] = {k: dict(v) for k, v in models.items()}
  with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(full, f, indent=2)
  lines = [f"# {title}", ""]
  for k, v in report.items():
    if not isinstance(v, (dict, list)):
      lines.append(f"- **{k}**: {_fmt(v)}")
  if models:
    lines += ["", _md_table(models)]
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
