"""ISTA recipe (Ye et al., ICLR 2018; docs/methods/ista.md §5): warmup -> sparsify ->
shrink (zero-gamma channels removed) -> finetune (-> dense comparison) -> report."""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import data, flops, models, optim, plots, surgery
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import loop, mesh as mesh_lib, report, steps
from jaxprune.engine.metrics import read_jsonl
from jaxprune.engine.state import init_from_variables, init_train_state
from jaxprune.engine import metrics as metrics_lib
from jaxprune.errors import UserError
from jaxprune.methods import common

RHO_MODES = ("memory", "uniform")


def _abstract_variables(model, input_shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)),
                                           train=False))


def penalties(model, input_shape, mode: str) -> dict[str, float]:
  """``{bn scale path: rho_l}``: from the structure (§2) or uniform 1."""
  if mode not in RHO_MODES:
    raise UserError(f"Unknown ista.rho {mode!r}; use one of {RHO_MODES}.")
  rho = surgery.ista_rho(model, _abstract_variables(model, input_shape), input_shape)
  return rho if mode == "memory" else {k: 1.0 for k in rho}


def stage_optimizer(cfg, rho, steps_per_epoch: int, total: int):
  """The stage's SGD recipe (:func:`jaxprune.optim.sgd`), then the ISTA prox (§1)."""
  sgd_tx, schedule = optim.sgd(cfg, steps_per_epoch, total)
  if not cfg.l1:
    return sgd_tx, schedule
  return optax.chain(sgd_tx, optim.ista(schedule, cfg.l1, rho=rho)), schedule


def _gammas(params, names):
  out = {}
  for name in names:
    node = params
    for part in name.split("/"):
      node = node[part]
    out[name] = np.asarray(jax.device_get(node), np.float64)
  return out


def gamma_record(params, names, stage: str, epoch: int, step: int, l1: float) -> dict:
  """One line of ``<stage>/gamma_history.jsonl`` (the contract of the ISTA plots)."""
  gammas = _gammas(params, names)
  total = sum(g.size for g in gammas.values())
  zeros = sum(int(np.sum(g == 0)) for g in gammas.values())
  return {"stage": stage, "epoch": epoch, "step": step, "l1": l1,
          "zero_fraction": zeros / max(total, 1),
          "layer_zero_fraction": {k: float(np.mean(g == 0)) for k, g in gammas.items()},
          "gammas": {k: g.tolist() for k, g in gammas.items()}}


def pipeline_optimizer(config, boundary: int):
  """The ISTA stages' SGD without the prox: ``sparsify``'s lr, momentum and weight
  decay, dropping to ``finetune``'s lr at step ``boundary`` (the dense comparison)."""
  cfg = config.sparsify
  schedule = optax.join_schedules(
      [optax.constant_schedule(cfg.learning_rate),
       optax.constant_schedule(config.finetune.learning_rate)], [boundary])
  decay_on = cfg.get("weight_decay_on")
  decay = optax.add_decayed_weights(
      cfg.weight_decay, mask=None if decay_on is None else lambda p: optim.select(p, decay_on))
  return optax.chain(decay, optax.sgd(schedule, momentum=cfg.momentum or None,
                                      nesterov=cfg.nesterov)), schedule


def sparsity_stage(name: str, cfg, *, model, rho, datasets, mesh, workdir: str, seed: int,
                   init_variables=None, step_offset: int = 0, on_step=None,
                   optimizer=None):
  """One training stage with the ISTA prox at ``cfg.l1`` (0: plain SGD).

  Starts from ``init_variables`` (the previous stage's) or from scratch, and writes
  ``<stage>/gamma_history.jsonl`` after every epoch. ``step_offset`` places its
  records after the previous stages' on a common step axis. ``optimizer`` = (tx,
  schedule) replaces the one built from ``cfg``.
  """
  train_ds, test_ds = datasets["train"], datasets["test"]
  mesh_lib.check_batch_size(cfg.batch_size, mesh)
  steps_per_epoch = data.steps_per_epoch(train_ds, cfg.batch_size)
  total = cfg.epochs * steps_per_epoch
  if cfg.max_steps:
    total = min(total, cfg.max_steps)
  tx, schedule = optimizer or stage_optimizer(cfg, rho, steps_per_epoch, total)
  l1 = float(cfg.get("l1", 0.0)) if optimizer is None else 0.0
  if init_variables is None:
    init = init_train_state(model, tx, train_ds.image_shape)
  else:
    init = init_from_variables(init_variables, tx)
  repl = mesh_lib.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: repl, jax.eval_shape(init, jax.random.key(seed)))
  train_step = steps.make_train_step(model, tx, seed=seed, mesh=mesh,
                                     state_sharding=state_sharding)
  eval_step = steps.make_eval_step(model, mesh=mesh)
  names = list(rho)
  history_path = os.path.join(workdir, name, "gamma_history.jsonl")

  def load(step):
    return data.batch_at(train_ds, step, cfg.batch_size, seed=seed, train=True,
                         process_index=jax.process_index(),
                         process_count=jax.process_count())

  def write(records, mode):
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(history_path), exist_ok=True)
      with open(history_path, mode, encoding="utf-8") as f:
        f.writelines(metrics_lib.dumps(r) + "\n" for r in records)

  def on_start(start):
    kept = [r for r in read_jsonl(history_path) if r["step"] <= step_offset + start]
    if start == 0 and init_variables is not None:  # where the stage starts from
      kept = [gamma_record(init_variables["params"], names, name, 0, step_offset,
                           l1)]
    elif start == 0:
      kept = []
    write(kept, "w")

  def on_epoch_end(state, epoch, done, means):
    del means
    write([gamma_record(state.params, names, name, epoch, step_offset + done,
                        l1)], "a")

  result = loop.run_stage(
      name, workdir, init=init, seed=seed,
      step_fn=lambda state, batch: train_step(state, batch, None), load_batch=load,
      total_steps=total, steps_per_epoch=steps_per_epoch, images_per_step=cfg.batch_size,
      cfg=cfg, mesh=mesh, lr_schedule=schedule, on_start=on_start,
      on_epoch_end=on_epoch_end, on_step=on_step,
      evaluate=lambda state: common.evaluate(eval_step, state.variables, test_ds,
                                             cfg.eval_batch_size, mesh))
  history = read_jsonl(history_path)
  if not history or history[-1]["step"] != step_offset + total:  # ends inside an epoch
    last = gamma_record(result.state.params, names, name, -(-total // steps_per_epoch),
                        step_offset + total, l1)
    write([last], "a")
    history.append(last)
  return result, history, total


def dense_equal_params(model, target_params: int, input_shape):
  """The base architecture uniformly narrowed to about ``target_params`` parameters.

  ResNets scale every conv width (the residual stream too); ConvNets their conv and
  fc widths. Bisection on the width multiplier; returns ``(model, multiplier)``.
  """
  def build(m):
    scale = lambda w: max(1, int(round(w * m)))
    if isinstance(model, models.ResNet):
      return model.clone(widths=tuple(scale(w) for w in model.widths))
    if isinstance(model, models.ConvNet):
      return model.clone(features=tuple(scale(w) for w in model.features),
                         hidden=tuple(scale(w) for w in model.hidden))
    raise UserError(f"No dense comparison for {type(model).__name__}.")

  def params(m):
    return flops.count_params(_abstract_variables(build(m), input_shape))

  lo, hi = 0.01, 1.0
  for _ in range(30):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if params(mid) < target_params else (lo, mid)
  best = min((lo, hi), key=lambda m: abs(params(m) - target_params))
  return build(best), best


def _probe(test_ds, n: int) -> np.ndarray:
  batch = next(iter(data.eval_batches(test_ds, n)))
  return np.asarray(batch["image"])


def run(config, workdir: str) -> dict:
  cfg = config.ista
  started = common.start(
      config, workdir, sections=("warmup",),
      check=lambda model, train_ds: penalties(model, train_ds.image_shape, cfg.rho))
  t0, mesh, datasets, model, rho = (started.t0, started.mesh, started.datasets,
                                    started.model, started.checked)
  test_ds, input_shape = started.test_ds, started.input_shape
  stage_args = dict(model=model, rho=rho, datasets=datasets, mesh=mesh, workdir=workdir,
                seed=config.seed)

  warm, warm_history, warm_steps = sparsity_stage("warmup", config.warmup, **stage_args)
  sparse, sparse_history, sparse_steps = sparsity_stage(
      "sparsify", config.sparsify, init_variables=warm.state.variables,
      step_offset=warm_steps, **stage_args)
  masked = jax.device_get(sparse.state.variables)
  masked_dir = os.path.join(workdir, "sparsify", "final")
  ckpt_lib.save_variables_once(masked_dir, masked)  # the masked network, e.g. for benchmarks

  # Prune (§4).
  shrunk = surgery.shrink(model, masked, input_shape, round_to=cfg.get("round_to", 1))
  equivalence = surgery.check_equivalence(model, masked, shrunk,
                                          _probe(test_ds, cfg.probe_batch_size))
  pruned_acc = common.evaluate_accuracy(shrunk.model, shrunk.variables, test_ds,
                                        config.finetune.eval_batch_size, mesh)
  base_counts = flops.count(model, masked, input_shape)
  small_counts = flops.count(shrunk.model, shrunk.variables, input_shape)
  architecture = {
      "model": config.model.name,
      "channels_before": shrunk.widths_before, "channels_after": shrunk.widths_after,
      "removed_fraction": shrunk.removed_fraction, "surgery_rounds": shrunk.rounds,
      "flops": small_counts["flops"], "params": small_counts["params"],
      "base_flops": base_counts["flops"], "base_params": base_counts["params"]}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "architecture.json"), "w", encoding="utf-8") as f:
      f.write(metrics_lib.dumps(architecture, indent=2))

  fine, fine_history, _ = sparsity_stage(
      "finetune", config.finetune, init_variables=shrunk.variables,
      step_offset=warm_steps + sparse_steps,
      **{**stage_args, "model": shrunk.model,
         "rho": {k: 0.0 for k in surgery.ista_scales(shrunk.model, shrunk.variables,
                                                     input_shape)}})

  batch = config.report.inference_batch_size
  nets = {"base (masked)": (model, masked), "pruned": (shrunk.model, shrunk.variables),
          "pruned + fine-tuned": (shrunk.model, fine.state.variables)}
  rows = {
      "base (masked)": common.model_row(model, masked, input_shape,
                                        sparse.summary["eval_accuracy"], batch),
      "pruned": common.model_row(shrunk.model, shrunk.variables, input_shape,
                                 pruned_acc, batch),
      "pruned + fine-tuned": common.model_row(shrunk.model, fine.state.variables,
                                              input_shape,
                                              fine.summary["eval_accuracy"], batch),
  }
  # fine-tuned minus warm-up (dense) on the same test images, with its standard error
  paired = common.paired_evaluate(model, warm.state.variables, fine.state.variables,
                                  test_ds, config.finetune.eval_batch_size, mesh,
                                  model_b=shrunk.model)
  out = {"method": "ista", "dataset": config.dataset.name, "model": config.model.name,
         "rho_mode": cfg.rho,
         "warmup_accuracy": warm.summary["eval_accuracy"],
         "accuracy_before_pruning": sparse.summary["eval_accuracy"],
         "accuracy_after_pruning": pruned_acc,
         "accuracy_after_finetune": fine.summary["eval_accuracy"],
         "accuracy_change": -paired["error_change"],
         "accuracy_change_se": paired["error_change_se"],
         "zero_gamma_fraction": sparse_history[-1]["zero_fraction"],
         "channels_removed_fraction": shrunk.removed_fraction,
         "base_params": base_counts["params"], "pruned_params": small_counts["params"],
         "base_flops": base_counts["flops"], "pruned_flops": small_counts["flops"],
         "params_reduction": 1 - small_counts["params"] / base_counts["params"],
         "flops_reduction": 1 - small_counts["flops"] / base_counts["flops"],
         "flops_speedup": base_counts["flops"] / small_counts["flops"],
         "equivalence": equivalence, "rho": rho, "architecture": architecture}
  if cfg.dense_comparison:
    dense_model, multiplier = dense_equal_params(model, small_counts["params"],
                                                 input_shape)
    if cfg.dense_recipe == "pipeline":  # the same optimizer and steps, without the prox
      dense, _, _ = sparsity_stage(
          "dense", config.dense, optimizer=pipeline_optimizer(config, warm_steps +
                                                              sparse_steps),
          **{**stage_args, "model": dense_model,
             "rho": {k: 0.0 for k in surgery.ista_scales(
                 dense_model, _abstract_variables(dense_model, input_shape), input_shape)}})
    elif cfg.dense_recipe == "baseline":  # the dense section's own SGD recipe
      dense = common.train("dense", config.dense, config.seed, workdir, datasets,
                           dense_model)
    else:
      raise UserError(f"Unknown ista.dense_recipe {cfg.dense_recipe!r}; use 'pipeline' "
                      "or 'baseline'.")
    rows["dense, equal params"] = common.model_row(
        dense_model, dense.state.variables, input_shape, dense.summary["eval_accuracy"],
        batch)
    nets["dense, equal params"] = (dense_model, dense.state.variables)
    out["dense_accuracy"] = dense.summary["eval_accuracy"]
    out["dense_width_multiplier"] = multiplier
  common.time_rows(config, rows, nets, input_shape)
  # measured: the masked network's inference time over the pruned one's (one alternated run)
  out["speedup"] = rows["base (masked)"]["inference_ms"] / rows["pruned"]["inference_ms"]
  out["wall_time_s"] = time.time() - t0
  if jax.process_index() == 0:
    history = warm_history + sparse_history + fine_history
    out["plots"] = plots.ista_figures(history, os.path.join(workdir, "plots"))
  report.write_report(workdir, out, title=f"ISTA {config.model.name} on "
                      f"{config.dataset.name}", models=rows)
  return out
