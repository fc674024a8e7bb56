"""AutoPrune recipe (Xiao et al., NeurIPS 2019): pretrain -> prune (+ fine-tune with the
mask frozen) -> report (for neuron pruning, the physically smaller network too)."""
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import numpy as np
import optax

from jaxprune import data, distill, flops, plots, surgery
from jaxprune import kernels as kernels_lib
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import loop, mesh as mesh_lib, report, steps
from jaxprune.engine.metrics import read_jsonl
from jaxprune.engine.state import TrainState, split_variables
from jaxprune.engine import metrics as metrics_lib
from jaxprune.errors import UserError
from jaxprune.graph import group as graph_lib
from jaxprune.methods import common
from jaxprune.optim import selection
from jaxprune.optim import autoprune_lib as ap
from jaxprune.optim.sgd_lib import learning_rate_schedule

def autoprune_config(**overrides) -> ml_collections.ConfigDict:
  """The ``autoprune`` section (see :func:`jaxprune.optim.autoprune` for the options)."""
  cfg = ml_collections.ConfigDict({
      "init_from": config_dict.placeholder(str),  # dense variables; skips pretraining
      "prune_epochs": 10,          # M learns this long; then the mask is frozen
      "regularization_warmup_epochs": 0.0,  # lambda_m ramps linearly from 0 over these
      "zeros_start_pruned": False,  # with init_from a pruned run: its zeros start masked
      # After prune_epochs: "continue" the weight lr schedule, or "restart" it (from
      # train.learning_rate, train.schedule over the remaining epochs).
      "finetune_schedule": "continue",
      "finetune_learning_rate": config_dict.placeholder(float),  # "restart" peak; None: train's
      "finetune_weight_decay": config_dict.placeholder(float),  # None: train.weight_decay
      # Not in the paper: after prune_epochs (mask frozen) the loss is knowledge distillation
      # from the dense start (jaxprune.distill.kd_loss, weight of the soft term, T); 0: CE.
      "finetune_distill_alpha": 0.0,
      "finetune_distill_temperature": 4.0,
      "m_learning_rate": 1.0,
      # M's lr over the pruning: "constant" (then 0: the mask freezes), or "cosine"
      # (decays to 0 at the end of pruning, so the mask settles before it freezes).
      "m_schedule": "constant",
      "regularization": 1e-4,      # lambda_m
      # Not in the paper: per-layer multipliers of lambda_m, "pattern=factor,..." (each
      # pattern a regex searched in the pruned kernels' paths, e.g. "conv=0.7,fc1=1.25").
      "regularization_scale": config_dict.placeholder(str),
      "regularizer": "l1_step",
      "surrogate": "softplus",
      "slope": 0.1,
      "rule": "decoupled",
      "granularity": "weight",
      "neuron_axis": "out",        # neuron granularity: gate a unit's fan-in ("out") or fan-out ("in")
      "mask": config_dict.placeholder(str),  # None: every kernel (weight) / unit layers
      "m_init": 0.2,
      "m_init_rule": "constant",   # not in the paper: "magnitude", m = m_init |w| / mean |w|
      "m_optimizer": "sgd",
      "m_momentum": 0.0,
      "decay_on": "effective",
  })
  cfg.update(overrides)
  return cfg


def neuron_layers(model, input_shape) -> list[tuple[str, list[str]]]:
  """Neuron pruning's units, from the model's dependency graph: per prunable channel
  group (in the graph's order), its unit layer (the kernel whose last axis produces the
  group) and the layers that read those units one input row each (``neuron_axis="in"``
  gates them there; a flatten in between reads several rows per unit and is left out).
  Paths without ``params/``; the classifier's outputs are no group."""
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
  graph = graph_lib.trace(model, abstract, input_shape)
  shapes = dict(zip(graph.traced.paths, graph.traced.shapes))
  out = []
  for g in graph.prunable():
    kernels = [m for m in g.members if m.path.startswith("params/")
               and m.path.endswith("/kernel")]
    units = [m.path for m in kernels
             if m.role == "producer" and m.axis == len(shapes[m.path]) - 1]
    rows = [m.path for m in kernels if m.role == "consumer"
            and m.axis == len(shapes[m.path]) - 2 and m.index.shape[1] == 1]
    for unit in units:
      out.append((unit[len("params/"):], [r[len("params/"):] for r in rows]))
  return out


def neuron_mask(model_name: str, neuron_axis: str, model, input_shape) -> str:
  """The default mask of neuron pruning (a leaf-path regex) for any Linen or NNX model:
  the unit layers of :func:`neuron_layers` (``neuron_axis="out"``: each unit gates its
  fan-in) or the layers that read them one row per unit (``"in"``: its fan-out)."""
  layers = neuron_layers(model, input_shape)
  kernels = sorted({k for unit, rows in layers for k in ([unit] if neuron_axis == "out"
                                                         else rows)})
  if not kernels:
    what = ("output units can be removed (no prunable channel group)" if neuron_axis == "out"
            else "input rows are one per unit of a prunable layer")
    fix = "" if neuron_axis == "out" else " or autoprune.neuron_axis='out'"
    raise UserError(f"Neuron pruning: model {model_name!r} has no layer whose {what}; "
                    f"use autoprune.granularity='weight'{fix}.")
  return r"^(" + "|".join(re.escape(k) for k in kernels) + r")$"


def kept_units(model, input_shape, keep, neuron_axis: str = "out") -> dict:
  """``{unit layer: bool[units]}`` from the keep-masks of neuron pruning (all kept for a
  unit layer that ``neuron_axis="in"`` cannot gate)."""
  units = {}
  for unit, rows in neuron_layers(model, input_shape):
    layer = unit.rsplit("/", 1)[0]
    k = np.asarray(_at(keep, unit))
    if neuron_axis == "out":
      units[layer] = k.reshape(-1, k.shape[-1])[0]
    elif rows:
      r = np.asarray(_at(keep, rows[0]))
      units[layer] = np.moveaxis(r, -2, 0).reshape(r.shape[-2], -1)[:, 0]
    else:
      units[layer] = np.ones(k.shape[-1], bool)
  return units


def _at(tree, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def transform(cfg, steps_per_epoch: int, total_steps: int, mask):
  """``optax.chain(autoprune, sgd)`` and the weight learning-rate schedule."""
  prune_steps = int(cfg.autoprune.prune_epochs * steps_per_epoch)
  freeze = lambda v: optax.piecewise_constant_schedule(v, {prune_steps: 0.0})
  a = cfg.autoprune
  if a.get("regularization_warmup_epochs", 0) > a.prune_epochs:
    raise UserError(f"autoprune.regularization_warmup_epochs="
                    f"{a.regularization_warmup_epochs} is longer than prune_epochs="
                    f"{a.prune_epochs}: lambda_m would never reach its value.")
  warmup = int(a.get("regularization_warmup_epochs", 0) * steps_per_epoch)
  lam = freeze(a.regularization)
  if warmup:
    ramp = optax.linear_schedule(0.0, a.regularization, warmup)
    lam = optax.join_schedules([ramp, optax.piecewise_constant_schedule(
        a.regularization, {prune_steps - warmup: 0.0})], [warmup])
  m_lr = freeze(a.m_learning_rate)
  m_schedule = a.get("m_schedule", "constant")
  if m_schedule not in ("constant", "cosine"):
    raise UserError(f"autoprune.m_schedule={m_schedule!r}: use 'constant' or 'cosine'.")
  if m_schedule == "cosine" and prune_steps > 0:
    m_lr = optax.cosine_decay_schedule(a.m_learning_rate, prune_steps)  # 0 from prune_steps
  decay = cfg.train.weight_decay
  if a.get("finetune_weight_decay") is not None:
    wd0, wd1 = float(decay), float(a.finetune_weight_decay)
    decay = lambda t: jnp.where(t < prune_steps, wd0, wd1)
  try:
    pruner = ap.autoprune(
        m_lr, regularization=lam,
        regularization_scale=parse_scale(a.get("regularization_scale")),
        regularizer=a.regularizer, surrogate=a.surrogate, slope=a.slope, rule=a.rule,
        granularity=a.granularity, neuron_axis=a.get("neuron_axis", "out"), mask=mask,
        m_init=a.m_init, m_init_rule=a.get("m_init_rule", "constant"),
        m_optimizer=a.m_optimizer, m_momentum=a.m_momentum or None,
        weight_decay=decay, decay_on=a.decay_on)
  except ValueError as e:
    raise UserError(f"Bad autoprune config: {e}") from None
  schedule = weight_schedule(cfg, steps_per_epoch, total_steps)
  sgd = optax.sgd(schedule, momentum=cfg.train.momentum or None,
                  nesterov=cfg.train.nesterov)
  return optax.chain(pruner, sgd), schedule


def parse_scale(text: str | None) -> dict[str, float]:
  """``"pattern=factor,..."`` (``autoprune.regularization_scale``) as a dict."""
  out = {}
  for item in (text or "").split(","):
    if not item.strip():
      continue
    pattern, eq, factor = item.rpartition("=")
    try:
      if not eq or not pattern.strip() or pattern.strip() in out:
        raise ValueError
      out[pattern.strip()] = float(factor)
    except ValueError:
      raise UserError(f"autoprune.regularization_scale={text!r}: write "
                      "'pattern=factor,...', each pattern once, e.g. "
                      "'conv=0.7,fc1=1.25'.") from None
  return out


def weight_schedule(cfg, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The weight learning rate: ``train``'s schedule over all steps ("continue"), or
  restarted at the end of pruning over the fine-tune steps ("restart")."""
  mode = cfg.autoprune.get("finetune_schedule", "continue")
  if mode not in ("continue", "restart"):
    raise UserError(f"autoprune.finetune_schedule={mode!r}: use 'continue' or 'restart'.")
  if mode == "continue" and cfg.autoprune.get("finetune_learning_rate") is not None:
    raise UserError("autoprune.finetune_learning_rate sets the peak of a restarted "
                    "schedule: add --config.autoprune.finetune_schedule=restart.")
  prune_steps = int(cfg.autoprune.prune_epochs * steps_per_epoch)
  if mode == "continue" or not 0 < prune_steps < total_steps:
    return learning_rate_schedule(cfg.train, steps_per_epoch, total_steps)
  first = learning_rate_schedule(cfg.train, steps_per_epoch, prune_steps)
  tune = ml_collections.ConfigDict(cfg.train.to_dict())
  if cfg.autoprune.get("finetune_learning_rate") is not None:
    tune.learning_rate = cfg.autoprune.finetune_learning_rate
  again = learning_rate_schedule(tune, steps_per_epoch, total_steps - prune_steps)
  return optax.join_schedules([first, again], [prune_steps])


def make_step(model, tx, *, seed: int, selector, teacher=None, distill_from: int = 0,
              alpha: float = 0.0, temperature: float = 4.0):
  """``(state, batch) -> (state, metrics)``: forward on ``W * h(M)``, one update; from
  step ``distill_from`` on, with ``teacher`` variables given, the loss is
  :func:`jaxprune.distill.kd_loss` against the teacher's eval-mode logits."""
  def step(state: TrainState, batch):
    key = steps.step_key(seed, state.step)
    eff = ap.effective_params(state.params, state.opt_state)
    if teacher is not None:  # its forward runs only from distill_from on
      def teacher_forward(x):
        return model.apply(teacher, x, train=False)
      out = jax.eval_shape(teacher_forward, batch["image"])
      teacher_logits = jax.lax.cond(state.step >= distill_from, teacher_forward,
                                    lambda x: jnp.zeros(out.shape, out.dtype), batch["image"])

    def loss_fn(p):
      logits, model_state = steps.apply_model(model, p, state.model_state,
                                              batch["image"], train=True, key=key)
      loss = steps.cross_entropy(logits, batch)
      if teacher is not None:
        kd = distill.kd_loss(logits, teacher_logits, batch["label"], alpha, temperature)
        loss = jnp.where(state.step >= distill_from, kd, loss)
      return loss, (logits, model_state)

    (loss, (logits, model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(eff)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    kept = kept_counts(params, opt_state, selector)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
               "kept_fraction": kept[0] / kept[1]}
    return state.replace(step=state.step + 1, params=params, model_state=model_state,
                         opt_state=opt_state), metrics
  return step


def kept_counts(params, opt_state, selector):
  """(kept, total) entries of the selected leaves (traceable)."""
  sel = jax.tree.leaves(selection.select(params, selector))
  ms = jax.tree.leaves(ap.masks(params, opt_state))
  kept = sum(jnp.sum(m) for m, s in zip(ms, sel) if s)
  total = sum(m.size for m, s in zip(ms, sel) if s)
  return kept.astype(jnp.float32), float(total)


def layer_table(model, params, opt_state, selector, input_shape, model_state=None) -> dict:
  """Per layer: weights, kept, fraction, dense MACs and MACs of the kept weights."""
  sel = selection.select(params, selector)
  # A kept weight is a nonzero entry of the effective network W * h(M): a gate that is
  # open on a weight that is exactly zero (an initialiser draws one now and then) keeps
  # nothing, so the count is of W * h(M), not of h(M).
  eff = ap.effective_params(params, opt_state)
  layers = {}
  for (path, t), s in zip(jax.tree_util.tree_leaves_with_path(eff), jax.tree.leaves(sel)):
    name = selection.leaf_path(path)
    if s and name.endswith("/kernel"):
      layers[name[:-len("/kernel")]] = {"weights": int(np.size(t)),
                                        "kept": int(np.count_nonzero(np.asarray(t)))}
  state = model_state or {}  # BN statistics too
  dense = flops.count_layers(model, {"params": params, **state}, input_shape)
  # Each kept (nonzero) weight of W * h(M) at every output position.
  kept = flops.count_layers(model, {"params": eff, **state}, input_shape, nonzero=True)
  for rec, kept_rec in zip(dense, kept):
    row = layers.get(rec["name"])
    if row is not None:
      row["macs"] = int(rec["macs"])
      row["kept_macs"] = int(kept_rec["macs"])
  for row in layers.values():
    row["kept_fraction"] = row["kept"] / row["weights"]
  return layers


def weight_report(model, params, opt_state, selector, input_shape, model_state=None
                  ) -> dict:
  """The numbers the report gives for weight pruning, from the kept weights.

  ``layers`` (:func:`layer_table`), ``weights`` and ``kept_weights`` (the gated
  kernels' entries and the kept ones), ``compression`` (weights / kept weights),
  ``compression_all_params`` (biases and other parameters counted as kept),
  ``dense_flops`` and ``pruned_flops`` (MACs of the kept weights plus bias adds).
  A kept weight is a nonzero entry of the effective network ``W * h(M)`` that the
  recipe saves in ``prune/final``.
  """
  layers = layer_table(model, params, opt_state, selector, input_shape, model_state)
  eff = ap.effective_params(params, opt_state)
  dense = flops.count(model, {"params": eff, **(model_state or {})}, input_shape)
  weights = sum(r["weights"] for r in layers.values())
  kept = sum(r["kept"] for r in layers.values())
  if kept == 0:  # a compression of weights / 0 is no number to report
    raise UserError("autoprune: every gated weight is pruned (h(M) = 0 everywhere), so the "
                    "network is constant; lower autoprune.regularization (lambda_m) and run "
                    "again in a new workdir.")
  other_params = dense["params"] - weights  # biases, BN: counted as kept
  pruned_flops = dense["flops"] - sum(r["macs"] - r["kept_macs"] for r in layers.values()
                                      if "macs" in r)
  return {"layers": layers, "weights": weights, "kept_weights": kept,
          "other_params": other_params, "compression": weights / kept,
          "compression_all_params": dense["params"] / max(kept + other_params, 1),
          "dense_params": dense["params"], "dense_flops": dense["flops"],
          "pruned_flops": pruned_flops}


def load_init(config, workdir, datasets, model, mesh):
  """Dense starting variables and their test accuracy (None when from scratch)."""
  input_shape = datasets["train"].image_shape
  src = config.autoprune.init_from
  if src:
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    variables = ckpt_lib.load_variables(src, abstract)
  elif config.pretrain.epochs > 0:
    result = common.train("pretrain", config.pretrain, config.seed, workdir, datasets,
                          model)
    return result.state.variables, result.summary["eval_accuracy"]
  else:
    return None, None
  acc = common.evaluate(steps.make_eval_step(model, mesh=mesh), variables, datasets["test"],
                        config.train.eval_batch_size, mesh)
  return variables, acc["accuracy"]


def validate(config):
  """Builds the pruner and its schedules once from the config (no data needed), so a bad
  option stops the run before the pretraining stage, not after it."""
  a = config.autoprune
  transform(config, 1, max(int(config.train.epochs), 1), a.mask or ap.DEFAULT_MASK)
  # (Its range and the temperature's: config_lib.RANGES.)
  if float(a.get("finetune_distill_alpha", 0.0)) and not (
      a.init_from or config.pretrain.epochs > 0):
    raise UserError("autoprune.finetune_distill_alpha distills from the dense start: it "
                    "needs pretrain.epochs > 0 or autoprune.init_from.")
  try:  # the surrogate is looked up only when the step is traced
    kernels_lib.step_ste(jnp.zeros((1,)), a.surrogate, a.slope)
  except ValueError as e:
    raise UserError(f"Bad autoprune config: {e}") from None


def make_selector(config, model, input_shape) -> str:
  """The gated leaves (a regex): ``autoprune.mask``, or every kernel (weight
  granularity), or :func:`neuron_mask` of the model (neuron granularity)."""
  a = config.autoprune
  if a.mask:
    return a.mask
  if a.granularity == "neuron":
    return neuron_mask(config.model.name, a.get("neuron_axis", "out"), model, input_shape)
  return ap.DEFAULT_MASK


def check_layers(config, model, input_shape) -> str:
  """:func:`make_selector`, and the pruner's ``init`` on the model's abstract params (a
  ``regularization_scale`` pattern that names no gated layer fails here, before any
  work); returns the selector."""
  selector = make_selector(config, model, input_shape)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))["params"]
  try:
    total = max(int(config.train.epochs), 1)  # as validate
    jax.eval_shape(transform(config, 1, total, selector)[0].init, params)
  except ValueError as e:
    raise UserError(f"Bad autoprune config: {e}") from None
  return selector


def prune(config, workdir, datasets, model, init_variables, mesh, on_step=None,
          selector=None):
  """The prune (+ frozen-mask fine-tune) stage; returns (state, summary, history)."""
  cfg = config.train
  train_ds, test_ds = datasets["train"], datasets["test"]
  input_shape = train_ds.image_shape
  steps_per_epoch = data.steps_per_epoch(train_ds, cfg.batch_size)
  total = cfg.epochs * steps_per_epoch
  if cfg.max_steps:
    total = min(total, cfg.max_steps)
  mesh_lib.check_batch_size(cfg.batch_size, mesh)
  a = config.autoprune
  selector = selector or make_selector(config, model, input_shape)
  tx, schedule = transform(config, steps_per_epoch, total, selector)

  def init(key):
    if init_variables is not None:
      variables = init_variables
    else:
      variables = model.init(key, jnp.zeros((1, *input_shape)), train=False)
    params, model_state = split_variables(variables)
    opt_state = tx.init(params)
    if a.get("zeros_start_pruned"):
      # Retraining a pruned network (init_from a finished run's prune/final): its
      # exact-zero weights start with m = -m_init, i.e. masked.
      pruner = opt_state[0]
      m = jax.tree.map(lambda mm, w: jnp.where(w == 0, -jnp.abs(mm), mm)
                       if jnp.shape(mm) == jnp.shape(w) else mm, pruner.m, params)
      opt_state = (pruner._replace(m=m),) + tuple(opt_state[1:])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state=model_state, opt_state=opt_state)

  repl = mesh_lib.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: repl, jax.eval_shape(init, jax.random.key(0)))
  alpha = float(a.get("finetune_distill_alpha", 0.0))
  if alpha and init_variables is None:
    raise UserError("autoprune.finetune_distill_alpha distills from the dense start: it "
                    "needs pretrain.epochs > 0 or autoprune.init_from.")
  distill_kw = (dict(teacher=init_variables, alpha=alpha,
                     distill_from=int(a.prune_epochs * steps_per_epoch),
                     temperature=float(a.get("finetune_distill_temperature", 4.0)))
                if alpha else {})
  step = jax.jit(make_step(model, tx, seed=config.seed, selector=selector, **distill_kw),
                 in_shardings=(state_sharding, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(state_sharding, repl), donate_argnums=(0,))
  eval_step = steps.make_eval_step(model, mesh=mesh)

  def masked_variables(state):
    return {"params": ap.effective_params(state.params, state.opt_state),
            **state.model_state}

  def load(s):
    return data.batch_at(train_ds, s, cfg.batch_size, seed=config.seed, train=True,
                         process_index=jax.process_index(),
                         process_count=jax.process_count())

  history_path = os.path.join(workdir, "prune", "kept_history.jsonl")
  previous = {}  # the last record's keep-masks (host), for the mask changes between records
  layer_name = lambda k: k[:-len("/kernel")] if k.endswith("/kernel") else k

  def record(state, epoch, done, means=None):
    fr = ap.kept_fractions(state.params, state.opt_state, selector)
    kept, tot = jax.device_get(kept_counts(state.params, state.opt_state, selector))
    keep = {layer_name(path): np.asarray(k) for path, k in selection.named_leaves(
        jax.device_get(ap.masks(state.params, state.opt_state))) if path in fr}
    # Recoverability: masked weights whose m turned positive again since the last
    # record ("returned"), and kept weights masked since ("masked"); None after a
    # resume (no earlier mask in memory). Changes undone within one epoch are not seen.
    changes = ({"returned": {l: int(np.sum(k & ~previous[l])) for l, k in keep.items()},
                "masked": {l: int(np.sum(previous[l] & ~k)) for l, k in keep.items()}}
               if previous else {"returned": None, "masked": None})
    previous.clear()
    previous.update(keep)
    return {"epoch": epoch, "step": done, "kept": {layer_name(k): v for k, v in fr.items()},
            "kept_weights": {l: int(np.sum(k)) for l, k in keep.items()},
            **changes, "total_kept_fraction": float(kept) / tot,
            "train_accuracy": (means or {}).get("accuracy")}

  def on_start(start):
    kept = [r for r in read_jsonl(history_path) if r["step"] <= start]
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(history_path), exist_ok=True)
      with open(history_path, "w", encoding="utf-8") as f:
        f.writelines(metrics_lib.dumps(r) + "\n" for r in kept)
        if start == 0:  # the dense start, epoch 0
          f.write(metrics_lib.dumps(record(init0, 0, 0)) + "\n")

  init0 = jax.jit(init)(jax.random.key(config.seed))

  def on_epoch_end(state, epoch, done, means):
    if jax.process_index() == 0:
      with open(history_path, "a", encoding="utf-8") as f:
        f.write(metrics_lib.dumps(record(state, epoch, done, means)) + "\n")

  result = loop.run_stage(
      "prune", workdir, init=init, seed=config.seed, step_fn=step, load_batch=load,
      total_steps=total, steps_per_epoch=steps_per_epoch, images_per_step=cfg.batch_size,
      cfg=cfg, mesh=mesh, lr_schedule=schedule, on_start=on_start,
      on_epoch_end=on_epoch_end, on_step=on_step,
      evaluate=lambda state: common.evaluate(eval_step, masked_variables(state), test_ds,
                                             cfg.eval_batch_size, mesh))
  history = read_jsonl(history_path)
  if not history or history[-1]["step"] != total:  # a run shorter than one epoch
    history.append(record(result.state, total / steps_per_epoch, total))
  final_dir = os.path.join(workdir, "prune", "final")
  ckpt_lib.save_variables_once(final_dir, masked_variables(result.state))
  return result.state, result.summary, history, selector


def run(config, workdir: str) -> dict:
  started = common.start(config, workdir,  # the selector and M's layers: before any work
                         check=lambda model, train_ds: check_layers(config, model,
                                                                    train_ds.image_shape))
  t0, mesh, datasets, model, selector = (started.t0, started.mesh, started.datasets,
                                         started.model, started.checked)
  input_shape = started.input_shape
  init_vars, init_acc = load_init(config, workdir, datasets, model, mesh)
  state, summary, history, selector = prune(config, workdir, datasets, model, init_vars,
                                            mesh, selector=selector)
  state = jax.device_get(state)
  params = state.params
  eff = ap.effective_params(params, state.opt_state)
  masked_vars = {"params": eff, **state.model_state}
  numbers = weight_report(model, params, state.opt_state, selector, input_shape,
                          state.model_state)
  layers = numbers["layers"]
  dense = {"params": numbers["dense_params"], "flops": numbers["dense_flops"]}
  weights, kept = numbers["weights"], numbers["kept_weights"]
  other_params = numbers["other_params"]  # biases, BN: counted as kept
  acc = summary["eval_accuracy"]
  batch = config.report.inference_batch_size
  rows, nets = {}, {}
  if init_vars is not None:
    rows["dense"] = common.model_row(model, init_vars, input_shape, init_acc, batch)
    nets["dense"] = (model, init_vars)
  masked_row = common.model_row(model, masked_vars, input_shape, acc, batch)
  nets["pruned (masked)"] = (model, masked_vars)
  if config.autoprune.granularity == "weight":
    # FLOPs of the pruned network: MACs of the kept weights plus the bias adds.
    kept_flops = numbers["pruned_flops"]
    masked_row["flops"] = kept_flops
    masked_row["params"] = kept + other_params
    rows["pruned (masked)"] = masked_row
    pruned_flops = kept_flops
    extra = {}
  else:
    # The smaller network, for any model: the graph's groups whose units the gates
    # switched off (zero fan-in and bias) are removed; the result is checked on a
    # probe against the masked network (surgery.prune_zeros).
    probe = data.batch_at(datasets["test"], 0, min(256, datasets["test"].num_examples),
                          seed=0, train=False)["image"]
    small, export = surgery.prune_zeros(model, jax.device_get(masked_vars), input_shape,
                                        probe=probe)
    small_row = common.model_row(small.model, small.variables, input_shape, acc, batch)
    nets["pruned (smaller network)"] = (small.model, small.variables)
    rows["pruned (masked)"] = masked_row
    rows["pruned (smaller network)"] = small_row
    pruned_flops = small_row["flops"]
    # Neuron pruning: the totals are those of the physically smaller network.
    kernels = lambda tree: {selection.leaf_path(path).rsplit("/", 1)[0]: np.shape(x)
                            for path, x in jax.tree_util.tree_leaves_with_path(tree)
                            if selection.leaf_path(path).endswith("kernel")}
    weights = sum(math.prod(s) for s in kernels(params).values())
    kept = sum(math.prod(s) for s in kernels(small.variables["params"]).values())
    other_params = small_row["params"] - kept
    extra = {"kept_units": {k: int(s[-1]) for k, s in kernels(small.variables["params"]).items()},
             "export_max_abs_diff": export["max_abs_diff"],
             "export_needs_fold": {str(k): v for k, v in export["needs_fold"].items()}}
    # Collective: every process holds the same smaller network.
    ckpt_lib.save_variables(os.path.join(workdir, "smaller_network"),
                            jax.device_get(small.variables))
  common.time_rows(config, rows, nets, input_shape)
  paired = {}
  if init_vars is not None:
    # The error change on this test set with its standard error (paired: both networks
    # on the same images), so a seed's difference is read against the test set's noise.
    p = common.paired_evaluate(model, init_vars, masked_vars, datasets["test"],
                               config.train.eval_batch_size, mesh)
    paired = {"error_change": p["error_change"], "error_change_se": p["error_change_se"],
              "wrong_both": p["wrong_both"], "wrong_only_dense": p["wrong_only_a"],
              "wrong_only_pruned": p["wrong_only_b"]}
  out = {"method": "autoprune", "dataset": config.dataset.name, "model": config.model.name,
         "granularity": config.autoprune.granularity,
         "surrogate": config.autoprune.surrogate, "rule": config.autoprune.rule,
         "error_before": None if init_acc is None else 1 - init_acc,
         "error_after": 1 - acc, "accuracy_after": acc, **paired,
         "weights": weights, "kept_weights": kept,
         "compression": weights / kept,
         "compression_all_params": dense["params"] / max(kept + other_params, 1),
         "dense_flops": dense["flops"], "pruned_flops": pruned_flops,
         "flops_fraction": pruned_flops / dense["flops"],
         "train_time_s": summary["train_time_s"], "wall_time_s": time.time() - t0,
         "layers": layers, **extra}
  if jax.process_index() == 0:
    out["plots"] = plots.autoprune_kept(history, os.path.join(workdir, "plots"))
  report.write_report(workdir, out, title=f"AutoPrune {config.model.name} on "
                      f"{config.dataset.name} ({config.autoprune.granularity})",
                      models=rows)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "report.md"), "a", encoding="utf-8") as f:
      f.write("\n| layer | weights | kept | kept fraction | MACs | kept MACs |\n"
              "|---|---|---|---|---|---|\n")
      for name, r in layers.items():
        f.write(f"| {name} | {r['weights']} | {r['kept']} | {r['kept_fraction']:.4f} | "
                f"{r.get('macs', '')} | {r.get('kept_macs', '')} |\n")
  return out
