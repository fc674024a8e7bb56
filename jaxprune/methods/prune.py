"""Criterion pruning recipe: train (or load) a baseline, prune it by a criterion to a
FLOPs, params or latency target in ``prune.steps`` steps, fine-tune each, report."""
import json
import os
import time

import jax
import numpy as np
import optax

from jaxprune import data, graph, jsonio, surgery
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import distributed
from jaxprune.engine import report
from jaxprune.engine import runtime
from jaxprune import latency as latency_lib
from jaxprune.surgery import targets
from jaxprune.errors import UserError
from jaxprune.methods import common

TARGETS = ("flops", "params", "latency")


def validate(config):
  """One-line errors for the ``prune`` section, before any work (``methods.run`` calls it)."""
  cfg = config.prune
  if cfg.criterion not in surgery.CRITERIA:
    raise UserError(f"prune.criterion={cfg.criterion!r}; choose one of {surgery.CRITERIA}")
  if cfg.target not in TARGETS:
    raise UserError(f"prune.target={cfg.target!r}; choose one of {TARGETS}")
  if not 0 < cfg.ratio < 1:
    raise UserError(f"prune.ratio={cfg.ratio} must be in (0, 1): the kept share of the "
                    f"dense network's {cfg.target}")
  if cfg.steps < 1:
    raise UserError(f"prune.steps={cfg.steps} must be >= 1")
  if cfg.round_to < 0:
    raise UserError(f"prune.round_to={cfg.round_to} must be >= 0 (0: the backend's default)")
  if cfg.get("latency_grid", targets.DEFAULT_GRID) < 1:
    raise UserError(f"prune.latency_grid={cfg.latency_grid} must be >= 1")
  if not isinstance(cfg.get("calibrate", True), bool):
    raise UserError(f"prune.calibrate={cfg.calibrate!r} must be True or False")
  if not isinstance(cfg.get("depth", False), bool):
    raise UserError(f"prune.depth={cfg.depth!r} must be True or False")
  if cfg.get("depth", False) and cfg.target != "latency":
    raise UserError(f"prune.depth=True removes residual blocks under a latency target: "
                    f"set prune.target=latency (got {cfg.target!r})")
  rounds = cfg.get("calibration_rounds", targets.CALIBRATION_ROUNDS)
  if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
    raise UserError(f"prune.calibration_rounds={rounds!r} must be an int >= 1")
  if cfg.get("latency_batch", 0) < 0:
    raise UserError(f"prune.latency_batch={cfg.latency_batch} must be >= 0 (0: the "
                    "report's inference batch)")


def round_to(config) -> tuple[int, bool]:
  """``(multiple, fitted)``: ``prune.round_to``, or for 0 the backend's default
  (:func:`jaxprune.engine.runtime.default_round_to` for the configured model, which starts
  the backend: call it after ``runtime.apply``) fitted to narrow groups."""
  if config.prune.round_to:
    return int(config.prune.round_to), False
  return runtime.run_round_to(config), True


def latency_batch(config) -> int:
  """The batch of the latency tables: ``prune.latency_batch``, else the report's."""
  return int(config.prune.get("latency_batch", 0) or config.report.inference_batch_size)


def latency_table(config, workdir: str, model, variables, input_shape, step: int):
  """``(table, graph)``: step ``step``'s latency table for ``model``, read from
  ``<workdir>/latency/step<step>.json`` when its fingerprint is this run's, else
  measured on process 0's first device and saved there; every process uses process
  0's times."""
  cfg = config.prune
  multiple, fitted = round_to(config)
  g = graph.trace(model, variables, input_shape, ignore=tuple(cfg.ignore), round_to=multiple)
  cands = targets.latency_candidates(g, [grp.id for grp in g.prunable()], multiple,
                                     cfg.get("latency_grid", targets.DEFAULT_GRID), fitted)
  path = os.path.join(workdir, "latency", f"step{step}.json")
  batch = latency_batch(config)
  if distributed.is_main_process():
    table = latency_lib.load_or_measure(cands, path, batch)
  else:
    table = latency_lib.plan(cands, batch)
  table.set_program_ms(distributed.from_main(table.program_ms.astype(np.float32)))
  if not np.all(np.isfinite(table.program_ms)) or np.any(table.program_ms <= 0):
    raise UserError(f"{path}: a measured time is not positive; delete the file to measure "
                    "again")
  return table, g


def check_prunable(config, model, input_shape) -> None:
  """The model has a prunable group and the target is reachable, before any training:
  the graph is traced on freshly initialised variables and the channels of the final
  target selected on uniform scores (reachability depends on the wiring only)."""
  cfg = config.prune
  variables = jax.jit(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, *input_shape)),
                                         train=False))()
  multiple, fitted = round_to(config)
  try:
    g = graph.trace(model, variables, input_shape, ignore=tuple(cfg.ignore),
                    round_to=multiple)
  except UserError as e:
    raise UserError(f"prune: model {config.model.name!r} cannot be traced for pruning: "
                    f"{e}") from None
  scores = {group.id: np.ones(group.width) for group in g.prunable()}
  if not scores:
    raise UserError(f"prune: model {config.model.name!r} has no prunable group (no conv or "
                    "dense layer whose output channels can be removed"
                    f"{', with prune.ignore=' + repr(tuple(cfg.ignore)) if cfg.ignore else ''}"
                    "); nothing to prune.")
  if cfg.target == "latency":  # checked on the measured table (run, before training)
    return
  try:
    surgery.select_channels(g, scores, global_ranking=cfg.global_ranking,
                            fit_round_to=fitted, **{f"{cfg.target}_ratio": cfg.ratio})
  except UserError as e:
    raise UserError(f"prune: config prune.ratio={cfg.ratio}: {e}") from None


def check_latency_reachable(config, g, table, model, variables, input_shape) -> None:
  """The latency target is reachable on the dense network's table (uniform scores; with
  ``prune.depth`` its removable blocks removed)."""
  cfg = config.prune
  scores = {gid: np.ones(g.groups[gid].width) for gid in table.group_ids}
  try:
    if cfg.get("depth", False):
      blocks, _ = surgery.remove.removable_blocks(model, variables, input_shape, None, g,
                                                  scores)
      surgery.select_blocks_and_channels(g, scores, latency_ratio=cfg.ratio,
                                         latency_table=table, blocks=blocks)
    else:
      surgery.select_channels(g, scores, latency_ratio=cfg.ratio,
                              latency_table=table, global_ranking=cfg.global_ranking)
  except UserError as e:
    raise UserError(f"prune: config prune.ratio={cfg.ratio}: {e}") from None


def _record(info) -> dict:
  """What a step's selection is, as JSON: the kept channels per group and its figures."""
  out = {"keep": {str(gid): [int(i) for i in kept] for gid, kept in info["keep"].items()},
         "after": {k: int(v) for k, v in info["after"].items()},
         "fitted_round_to": {str(gid): int(r) for gid, r in info["fitted_round_to"].items()},
         "narrow_whole": [int(gid) for gid in info["narrow_whole"]]}
  for key in ("predicted_speedup", "measured_speedup", "calibration", "removed_blocks"):
    if key in info:
      out[key] = info[key]
  return json.loads(jsonio.dumps(out))


def taylor_grads(model, variables, ds, batch_size: int, seed: int):
  """Gradients of the cross-entropy on one training batch w.r.t. the params (eval-mode
  batch norm), for the Taylor criterion (Molchanov et al. 2019: ``|sum w * dL/dw|``)."""
  batch = data.batch_at(ds, 0, batch_size, seed=seed, train=True)
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss(params):
    logits = model.apply({"params": params, **rest}, batch["image"], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return jax.device_get(jax.jit(jax.grad(loss))(variables["params"]))


def _changed_shapes(before, after) -> dict[str, list]:
  """``{leaf path: [dense shape, pruned shape]}`` of the leaves pruning narrowed."""
  a = {k: np.shape(v) for k, v in graph.named_leaves(None, before).items()}
  b = {k: np.shape(v) for k, v in graph.named_leaves(None, after).items()}
  return {k: [list(a[k]), None if k not in b else list(b[k])]  # None: a removed block's
          for k in sorted(a) if a[k] != b.get(k)}


def run(config, workdir: str) -> dict:
  t0 = time.time()
  cfg = config.prune
  validate(config)

  def check(model, train_ds):
    check_prunable(config, model, train_ds.image_shape)
    multiple, fitted = round_to(config)
    if jax.process_index() == 0:
      why = (f"the {jax.default_backend()} backend's default (prune.round_to=0); a group "
             "not wider than it whole while the target is reachable so, else at a finer "
             "multiple" if fitted else "prune.round_to")
      print(f"[prune] kept widths are multiples of {multiple}: {why}", flush=True)
    return multiple, fitted

  started = common.start(config, workdir, sections=("train", "finetune", "scratch"),
                         check=check)
  datasets, model, (multiple, fitted) = started.datasets, started.model, started.checked
  train_ds, test_ds, input_shape = started.train_ds, started.test_ds, started.input_shape
  batch = config.report.inference_batch_size
  evaluate = lambda m, v: common.evaluate_accuracy(m, v, test_ds,
                                                   config.finetune.eval_batch_size)

  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jax.numpy.zeros((1, *input_shape)),
                                               train=False))
  tables = {}
  if cfg.target == "latency":  # the dense table, before any training (same shapes)
    fresh = jax.jit(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, *input_shape)),
                                       train=False))()
    tables[1] = latency_table(config, workdir, model, fresh, input_shape, 1)
    check_latency_reachable(config, *tables[1][::-1], model, fresh, input_shape)
  if cfg.init_from:
    dense_vars = ckpt_lib.load_variables(cfg.init_from, abstract)
    dense_acc = evaluate(model, dense_vars)
  else:
    dense = common.train("baseline", config.train, config.seed, workdir, datasets, model)
    dense_vars, dense_acc = dense.state.variables, dense.summary["eval_accuracy"]
  rows = {"dense": common.model_row(model, dense_vars, input_shape, dense_acc, batch)}
  nets = {"dense": (model, dense_vars)}

  current_model, current_vars, steps = model, jax.device_get(dense_vars), []
  calibrate = cfg.target == "latency" and cfg.get("calibrate", True)
  key = jax.random.key(config.seed)
  for k in range(1, cfg.steps + 1):
    ratio = 1 - (1 - cfg.ratio) * k / cfg.steps
    if cfg.target == "latency":  # each step's network timed by its own table
      if k not in tables:
        tables[k] = latency_table(config, workdir, current_model, current_vars,
                                  input_shape, k)
      table = tables[k][0]
      # the step's input latency over the dense network's: measured where calibrated
      now = (1 / float(np.prod([st["measured_speedup"] for st in steps]))
             if calibrate else table.full / tables[1][0].full)
      target = {"latency_ratio": min(1.0, ratio / now), "latency_table": table,
                "batch_size": latency_batch(config), "calibrate": calibrate,
                "depth": bool(cfg.get("depth", False)),
                "calibration_rounds": cfg.get("calibration_rounds",
                                              targets.CALIBRATION_ROUNDS)}
    else:
      dense_count = rows["dense"][cfg.target]
      now = rows[f"step {k - 1}"][cfg.target] if k > 1 else dense_count
      target = {f"{cfg.target}_ratio": min(1.0, ratio * dense_count / now)}
    # A step's selection is made once and recorded before its fine-tuning: a rerun
    # fine-tunes the recorded network (a latency selection is timed: selecting again could
    # choose another), and every process takes process 0's.
    record_path = os.path.join(workdir, f"finetune{k}", "pruned.json")
    main = distributed.is_main_process()
    small = None
    if bool(distributed.from_main(np.asarray(main and os.path.exists(record_path)))):
      record = distributed.json_from_main(jsonio.read_json(record_path) if main else None)
    else:
      small, info = surgery.prune_to(
          current_model, current_vars, input_shape, criterion=cfg.criterion,
          global_ranking=cfg.global_ranking, round_to=None if fitted else multiple,
          ignore=tuple(cfg.ignore), key=jax.random.fold_in(key, k),
          grads=(taylor_grads(current_model, current_vars, train_ds, config.train.batch_size,
                              config.seed + k) if cfg.criterion == "taylor" else None),
          **target)
      mine = _record(info)
      record = distributed.json_from_main(mine)
      if main:
        os.makedirs(os.path.dirname(record_path), exist_ok=True)
        jsonio.write_json(record_path, record)
      if (record["keep"], record.get("removed_blocks")) != (mine["keep"],
                                                             mine.get("removed_blocks")):
        small = None
    keep = {int(gid): np.asarray(kept, np.int64) for gid, kept in record["keep"].items()}
    if small is None:
      small = surgery.remove_blocks(
          surgery.prune(current_model, current_vars, input_shape, keep),
          record.get("removed_blocks", []))
    info = dict(record, keep=keep)
    pruned_acc = evaluate(small.model, small.variables)
    fine = common.train(f"finetune{k}", config.finetune, config.seed, workdir, datasets,
                        small.model, init_variables=small.variables)
    current_model, current_vars = small.model, jax.device_get(fine.state.variables)
    rows[f"step {k}"] = common.model_row(current_model, current_vars, input_shape,
                                         fine.summary["eval_accuracy"], batch)
    nets[f"step {k}"] = (current_model, current_vars)
    steps.append({"step": k, "target_ratio": ratio, "accuracy_pruned": pruned_acc,
                  "accuracy_finetuned": fine.summary["eval_accuracy"],
                  "flops": info["after"]["flops"], "params": info["after"]["params"],
                  "widths": {str(gid): int(kept.size) for gid, kept in info["keep"].items()},
                  "fitted_round_to": {str(gid): r for gid, r in info["fitted_round_to"].items()},
                  "narrow_whole": info.get("narrow_whole", [])})
    if "predicted_speedup" in info:
      steps[-1]["predicted_speedup"] = info["predicted_speedup"]
    if "removed_blocks" in info:
      steps[-1]["removed_blocks"] = list(info["removed_blocks"])
    if "calibration" in info:
      steps[-1]["measured_speedup"] = info["measured_speedup"]
      steps[-1]["calibration"] = {k: v for k, v in info["calibration"].items()}

  # the last step's network minus the dense one on the same test images, with its
  # standard error
  paired = common.paired_evaluate(model, dense_vars, current_vars, test_ds,
                                  config.finetune.eval_batch_size, started.mesh,
                                  model_b=current_model)
  out = {"method": "prune", "dataset": config.dataset.name, "model": config.model.name,
         "criterion": cfg.criterion, "target": cfg.target, "ratio": cfg.ratio,
         "round_to": multiple, "round_to_source": "backend default" if fitted else "config",
         "global_ranking": cfg.global_ranking,
         "dense_accuracy": dense_acc, "steps": steps,
         "pruned_accuracy": rows[f"step {cfg.steps}"]["accuracy"],
         "accuracy_change": -paired["error_change"],
         "accuracy_change_se": paired["error_change_se"],
         "dense_flops": rows["dense"]["flops"], "pruned_flops": rows[f"step {cfg.steps}"]["flops"],
         "dense_params": rows["dense"]["params"],
         "pruned_params": rows[f"step {cfg.steps}"]["params"],
         "shapes": _changed_shapes(dense_vars, current_vars)}
  out["flops_ratio"] = out["pruned_flops"] / out["dense_flops"]
  out["params_ratio"] = out["pruned_params"] / out["dense_params"]
  if cfg.scratch_comparison:
    scratch = common.train("scratch", config.scratch, config.seed, workdir, datasets,
                           current_model)
    rows["same size, from scratch"] = common.model_row(
        current_model, scratch.state.variables, input_shape,
        scratch.summary["eval_accuracy"], batch)
    nets["same size, from scratch"] = (current_model, scratch.state.variables)
    out["scratch_accuracy"] = scratch.summary["eval_accuracy"]
  common.time_rows(config, rows, nets, input_shape)  # one alternated measurement
  final = rows[f"step {cfg.steps}"]
  out["flops_speedup"] = out["dense_flops"] / out["pruned_flops"]
  out["speedup"] = rows["dense"]["inference_ms"] / final["inference_ms"]  # measured
  if cfg.target == "latency":
    # the tables' prediction: each step's full latency over its pruned widths', chained
    out["predicted_speedup"] = float(np.prod([st["predicted_speedup"] for st in steps]))
    out["requested_speedup"] = 1 / cfg.ratio
    if calibrate:  # the calibration's own timings (the latency batch), chained
      out["calibrated_speedup"] = float(np.prod([st["measured_speedup"] for st in steps]))
      out["calibration_rounds"] = int(sum(st["calibration"]["rounds"] for st in steps))
      out["calibration_met"] = all(st["calibration"]["met"] for st in steps)
    out["latency_batch"] = latency_batch(config)
    out["inference_batch"] = final["inference_batch"]
  rows = {("pruned + fine-tuned" if name == f"step {cfg.steps}" else name): row
          for name, row in rows.items()}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "architecture.json"), "w", encoding="utf-8") as f:
      json.dump({"model": config.model.name, "shapes": out["shapes"],
                 "flops": out["pruned_flops"], "params": out["pruned_params"],
                 "base_flops": out["dense_flops"], "base_params": out["dense_params"]},
                f, indent=2)
  out["wall_time_s"] = time.time() - t0
  report.write_report(workdir, out, title=f"{cfg.criterion} pruning of {config.model.name} on "
                      f"{config.dataset.name}", models=rows)
  return out
