"""DNW recipe (docs/methods/dnw.md): train a neural graph whose wiring is learned, export
the wiring (``wiring.json``) and report executed next to dense-masked FLOPs."""
import os
import time

import jax
import numpy as np

from jaxprune import plots
from jaxprune.engine import metrics as metrics_lib, report
from jaxprune.methods import common
from jaxprune.errors import UserError
from jaxprune.models import dnw as dnw_models
from jaxprune.models import external


def fixed_mask_network(model, variables, input_shape):
  """The dense masked network: the learned graph baked into a fixed ``wiring`` mask.

  This is the forward pass a deployment without sparse kernels runs: every
  slot the DAG reads is multiplied densely, no per-call top-k.
  """
  fixed = model.clone(graph="random")
  wiring = {}
  for block in model.graph_blocks(input_shape):
    edges = dnw_models.edge_values(model, variables, block)
    node = wiring
    for p in block["path"][:-1]:
      node = node.setdefault(p, {})
    node["mask"] = jax.numpy.asarray((edges != 0).astype(np.float32))
  new = {k: v for k, v in variables.items() if k != "wiring"}
  new["wiring"] = wiring
  return fixed, new


BASELINES = ("none", "random")


def baseline(config) -> str:
  """``config.dnw.baseline``: ``"random"`` also trains the random graph of the same edge
  budget (the paper's comparison), same recipe and seed, and scores both on the same test
  images; ``"none"`` (default) trains the configured graph only."""
  choice = config.get("dnw", {}).get("baseline", "none")
  if choice not in BASELINES:
    raise UserError(f"dnw.baseline={choice!r}: choose one of {', '.join(BASELINES)}.")
  if choice == "random" and config.model.get("graph", "dnw") != "dnw":
    raise UserError(f"dnw.baseline='random' compares a learned wiring with a random graph: "
                    f"it needs model.graph='dnw', not {config.model.graph!r}.")
  return choice


def validate(config):
  baseline(config)


def run(config, workdir: str) -> dict:
  t0 = time.time()
  if external.is_external(config.model.name):
    raise UserError(f"config model.name={config.model.name!r}: DNW learns the wiring of its "
                    "own graph networks (dnw_static, dnw_discrete, dnw_continuous, "
                    "dnw_mobilenet); a user model is not one.")
  compare = baseline(config)  # a bad choice stops here
  started = common.start(  # an impossible edge count stops here
      config, workdir, check=lambda model, train_ds: model.graph_blocks(train_ds.image_shape))
  model, shape = started.model, started.input_shape
  result = common.train("train", config.train, config.seed, workdir, started.datasets, model)
  variables = jax.device_get(result.state.variables)
  accuracy = result.summary["eval_accuracy"]

  export = dnw_models.export_wiring(model, variables, shape)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "wiring.json"), "w", encoding="utf-8") as f:
      f.write(metrics_lib.dumps(export))
    plots.dnw_wiring(export, os.path.join(workdir, "plots", "dnw_wiring.png"))

  dense_model, dense_vars = fixed_mask_network(model, variables, shape)
  nets = {"dense_masked": (dense_model, dense_vars)}
  rows = {"dense_masked": {
      "accuracy": accuracy, "flops": export["flops_dense_masked"],
      "params_stored": export["params"], "edges": export["edges"]}}
  executed = {"accuracy": accuracy, "flops": export["flops_executed"],
              "params": export["params_executed"], "edges": export["executed_edges"]}
  if isinstance(model, dnw_models.StaticGraphNet):
    compact_model, compact_vars = dnw_models.compact_static(model, variables)
    nets["executed"] = (compact_model, compact_vars)
    executed["nodes"] = int(sum(compact_model.block_sizes))
  rows["executed"] = executed
  compared = {}
  if compare == "random":  # the same edge budget, recipe and seed, random wiring
    random_model = model.clone(graph="random")
    random_run = common.train("random_graph", config.train, config.seed, workdir,
                              started.datasets, random_model)
    random_vars = jax.device_get(random_run.state.variables)
    random_export = dnw_models.export_wiring(random_model, random_vars, shape)
    rows["random_graph"] = {"accuracy": random_run.summary["eval_accuracy"],
                            "flops": random_export["flops_dense_masked"],
                            "flops_executed": random_export["flops_executed"],
                            "params_stored": random_export["params"],
                            "edges": random_export["edges"]}
    nets["random_graph"] = (random_model, random_vars)
    paired = common.paired_evaluate(random_model, random_vars, variables,
                                    started.datasets["test"], config.train.eval_batch_size,
                                    started.mesh, model_b=model)
    compared = {"random_graph_accuracy": random_run.summary["eval_accuracy"],
                # DNW minus the random graph on the same test images, with its standard error
                "accuracy_change": -paired["error_change"],
                "accuracy_change_se": paired["error_change_se"]}
  common.time_rows(config, rows, nets, shape)

  out = {"method": "dnw", "dataset": config.dataset.name, "model": config.model.name,
         "graph": config.model.graph, "test_accuracy": accuracy,
         "edges": export["edges"], "executed_edges": export["executed_edges"],
         "live_nodes": int(sum(b["live_nodes"] for b in export["blocks"])),
         "nodes": int(sum(b["nodes"] for b in export["blocks"])),
         "flops_executed": export["flops_executed"],
         "flops_dense_masked": export["flops_dense_masked"],
         "params_executed": export["params_executed"],
         "train_steps": result.summary["steps"],
         "train_time_s": result.summary["train_time_s"],
         **compared,
         "wall_time_s": time.time() - t0, "wiring": f"{workdir}/wiring.json"}
  report.write_report(workdir, out, title=f"DNW {config.model.name} ({config.model.graph}) "
                      f"on {config.dataset.name}", models=rows)
  return out
