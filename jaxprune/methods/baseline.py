"""Baseline recipe: train the unpruned network, report it, keep it as a teacher
(``<workdir>/baseline/final``)."""
import time

from jaxprune.engine import report
from jaxprune.methods import common


def run(config, workdir: str) -> dict:
  started = common.start(config, workdir)
  model, train_ds = started.model, started.train_ds
  result = common.train("baseline", config.train, config.seed, workdir, started.datasets, model)
  row = common.model_row(model, result.state.variables, train_ds.image_shape,
                         result.summary["eval_accuracy"], config.report.inference_batch_size)
  rows = {"base": row}
  common.time_rows(config, rows, {"base": (model, result.state.variables)},
                   train_ds.image_shape)
  out = {"method": "baseline", "dataset": config.dataset.name, "model": config.model.name,
         "test_accuracy": row["accuracy"], "flops": row["flops"], "params": row["params"],
         "train_steps": result.summary["steps"],
         "train_time_s": result.summary["train_time_s"], "wall_time_s": time.time() - started.t0,
         "inference_ms": row["inference_ms"], "teacher_variables": f"{workdir}/baseline/final"}
  report.write_report(workdir, out, title=f"Baseline {config.model.name} on "
                      f"{config.dataset.name}", models=rows)
  return out
