"""TAS recipe (Dong & Yang, NeurIPS 2019): teacher -> search -> derive -> retrain (KD) ->
report, each stage resumable; it talks to a :class:`jaxprune.search.Space` only
(docs/design/search.md)."""
import contextlib
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import data, distill, flops, kernels, models, optim, plots
from jaxprune import latency as latency_lib
from jaxprune import search as search_lib
from jaxprune.search.resnet import released_depth, released_shape
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import distributed, loop, mesh as mesh_lib, report, steps
from jaxprune.engine.metrics import read_jsonl
from jaxprune.engine.state import TrainState
from jaxprune.engine import metrics as metrics_lib
from jaxprune.errors import UserError
from jaxprune.kernels.cost import COST_LOSS_MODES
from jaxprune.methods import common
from jaxprune.models import external

TAU_SCHEDULES = ("cosine", "linear")
SPACES = ("auto", "resnet", "graph")
# jaxprune's ResNets with a dedicated TASResNet search space, and its layout.
DEDICATED = {"cifar_resnet": "cifar", "imagenet_resnet": "imagenet"}
COSTS = ("flops", "latency")
LATENCY_TABLE = "latency_table.json"  # in <workdir>/search/


def tau_at(epoch, epochs: int, tau_max: float, tau_min: float, schedule: str):
  """Gumbel temperature of a search epoch (§6): the scripts' per-epoch cosine
  (default, 5 -> 0.1) or the paper's linear decay (10 -> 0.1). Traceable."""
  frac = epoch / max(epochs - 1, 1) if schedule == "linear" else epoch / epochs
  if schedule == "cosine":
    return tau_min + (tau_max - tau_min) * (1 + jnp.cos(math.pi * frac)) / 2
  if schedule == "linear":
    return tau_max - (tau_max - tau_min) * jnp.minimum(frac, 1.0)
  raise UserError(f"Unknown tas.tau_schedule {schedule!r}; use one of {TAU_SCHEDULES}.")


def arch_optimizer(cfg) -> optax.GradientTransformation:
  """Adam for the architecture (§6): lr 1e-3, betas (0.5, 0.999), L2 decay 1e-3."""
  return optax.chain(optax.add_decayed_weights(cfg.arch_weight_decay),
                     optax.adam(cfg.arch_learning_rate, b1=cfg.arch_beta1,
                                b2=cfg.arch_beta2))


def round_to_of(config) -> int:
  """``config.tas.round_to``, 0 (the default) being the backend's
  :func:`jaxprune.engine.runtime.default_round_to` for the configured model (8 on a CPU;
  16 for a model of dense convs on an AVX-512 CPU at XLA's stock settings)."""
  from jaxprune.engine import runtime  # pylint: disable=g-import-not-at-top
  k = int(config.tas.get("round_to", 0))
  return k or runtime.run_round_to(config)


def make_space(config, base_model, num_classes: int, input_shape) -> search_lib.Space:
  """The search space of ``config.tas.space``: "resnet" (:class:`jaxprune.search.ResNetSpace`
  over TASResNet), "graph" (:class:`jaxprune.search.SearchSpace` of any model), "auto"
  (resnet for jaxprune's cifar_resnet and imagenet_resnet with ``depth`` and the FLOPs
  cost; graph otherwise). ``round_to`` (:func:`round_to_of`): both spaces search among
  width candidates rounded up to its multiples, so the derived network is the one the
  search priced. The resnet space searches every conv: a conv the multiple would leave
  with fewer than ``num_picks`` candidates uses the largest of ``round_to // 2, ..., 1``
  that does not (said in one line when ``round_to`` was set explicitly); the graph space
  does that for the backend default and leaves such a group at full width otherwise."""
  kind = config.tas.get("space", "auto")
  round_to = round_to_of(config)
  if kind == "auto":
    kind = ("resnet" if config.model.name in DEDICATED and config.tas.get("depth", True)
            and config.tas.get("cost", "flops") == "flops" else "graph")
  if kind == "resnet":
    if config.tas.get("cost", "flops") == "latency":
      raise UserError("config tas.cost='latency' needs a per-op latency table, which the "
                      "dedicated ResNet space has not; use --config.tas.space=graph.")
    if config.model.name not in DEDICATED:
      raise UserError(f"config tas.space='resnet' searches jaxprune's cifar_resnet or "
                      f"imagenet_resnet, not "
                      f"{config.model.name!r}; use --config.tas.space=graph.")
    space = resnet_space(config.model.depth, num_classes, config.tas.num_picks, input_shape,
                         DEDICATED[config.model.name],
                         jnp.dtype(config.model.get("dtype") or "float32"), round_to,
                         None if int(config.tas.get("round_to", 0)) else config.tas.ratio)
    finer = sorted({max(c) for c in space.model.conv_candidates()
                    if any(w % round_to and w != max(c) for w in c)})
    if finer and int(config.tas.get("round_to", 0)) and distributed.is_main_process():
      print(f"[tas] round_to={round_to} leaves convs of {finer} channels fewer than "
            f"{config.tas.num_picks} width candidates: they are searched at a finer multiple")
    _say_whole(len(space.whole), "convs", round_to)
    return space
  # The backend's default (round_to 0) leaves a group not wider than it whole while the
  # FLOPs ratio is reachable so, else searches it at a finer multiple
  # (search.space.fitted_candidates); an explicit round_to is kept as given.
  abstract = jax.eval_shape(lambda: base_model.init(
      jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
  space = search_lib.SearchSpace(base_model, abstract, input_shape,
                                 num_picks=config.tas.num_picks, round_to=round_to,
                                 depth=config.tas.get("depth", True),
                                 fit_round_to=not int(config.tas.get("round_to", 0)),
                                 target_ratio=(config.tas.ratio if config.tas.get(
                                     "cost", "flops") == "flops" else None))
  _say_whole(sum("left whole" in why for why in space.excluded.values()), "channel groups",
             round_to)
  return space


def _say_whole(n: int, what: str, round_to: int):
  """One line when the backend default's rule kept narrow convs or groups whole."""
  if n and distributed.is_main_process():
    print(f"[tas] round_to={round_to}, the backend's default: {n} {what} not wider than it "
          "are kept whole (narrowing them saves FLOPs, not time)")


def resnet_space(depth: int, num_classes: int, num_picks: int, input_shape,
                 layout: str = "cifar", dtype=jnp.float32, round_to: int = 1,
                 target_ratio: float | None = None) -> search_lib.ResNetSpace:
  """The dedicated space of ResNet-``depth`` (``layout`` "cifar" or "imagenet");
  ``target_ratio`` (with the backend's default ``round_to``): its narrow convs whole
  while the ratio is reachable so (:class:`jaxprune.search.ResNetSpace`)."""
  build = models.tas_imagenet_resnet if layout == "imagenet" else models.tas_cifar_resnet
  return search_lib.ResNetSpace(build(depth, num_classes, num_picks=num_picks, dtype=dtype,
                                      round_to=round_to), input_shape,
                                target_ratio=target_ratio)


def cost_max(table, flops_max):
  """The cost loss's max (§5): the full network's latency in ms from the latency
  ``table`` (tas.cost=latency), else its FLOPs ``flops_max``."""
  return flops_max if table is None else table.full


def search_steps(space, weight_tx, arch_tx, *, cfg, seed: int, flops_max: int,
                 steps_per_epoch: int, epochs: int, table=None):
  """The two halves of a search iteration (§6), each ``(state, batch) -> (state, metrics)``.

  ``space`` is a :class:`jaxprune.search.Space`. ``weight_step``
  differentiates only ``params`` and updates only the weight optimizer state (the
  D_train batch); ``arch_step`` runs a fresh forward on the D_val batch with fresh noise
  and updates only ``arch_params`` and the architecture optimizer state. Neither
  advances ``state.step``. With a latency ``table`` (tas.cost=latency) the costs are
  the table's ms and the cost loss's max is its full latency (:func:`cost_max`).
  """
  max_cost = cost_max(table, flops_max)
  unit = "flops" if table is None else "latency_ms"

  def forward(state, params, arch, images, key):
    tau = tau_at(state.step // steps_per_epoch, epochs, cfg.tau_max, cfg.tau_min,
                 cfg.tau_schedule)
    logits, model_state = space.forward(params, state.model_state, arch, images, tau, key)
    return logits, model_state, tau

  def keys(state):
    return jax.random.split(steps.step_key(seed, state.step))

  def weight_step(state: TrainState, batch):
    def loss_fn(params):
      logits, model_state, _ = forward(state, params, state.arch_params, batch["image"],
                                       keys(state)[0])
      return steps.cross_entropy(logits, batch), (logits, model_state)

    (loss, (logits, model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = weight_tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates),
                         model_state=model_state, opt_state=opt_state), {
                             "loss": loss,
                             "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

  def arch_step(state: TrainState, batch):
    def loss_fn(arch):
      logits, model_state, tau = forward(state, state.params, arch, batch["image"],
                                         keys(state)[1])
      ce = steps.cross_entropy(logits, batch)
      if table is None:
        e_cost, f_cost = space.expected_cost(arch), space.argmax_cost(arch)
      else:
        e_cost, f_cost = table.expected(space, arch), table.argmax(space, arch)
      cost = kernels.tas_cost_loss(e_cost, f_cost, max_cost, cfg.ratio, cfg.tolerance,
                                   cfg.cost_mode)
      return ce + cfg.lambda_cost * cost, (logits, model_state, ce, cost, e_cost, f_cost,
                                           tau)

    (_, (logits, model_state, ce, cost, e_cost, f_cost, tau)), grads = (
        jax.value_and_grad(loss_fn, has_aux=True)(state.arch_params))
    updates, arch_opt_state = arch_tx.update(grads, state.arch_opt_state,
                                             state.arch_params)
    return state.replace(arch_params=optax.apply_updates(state.arch_params, updates),
                         model_state=model_state, arch_opt_state=arch_opt_state), {
                             "val_loss": ce,
                             "val_accuracy": jnp.mean(jnp.argmax(logits, -1) ==
                                                      batch["label"]),
                             "arch_cost_loss": cost, f"arch_expected_{unit}": e_cost,
                             f"arch_argmax_{unit}": f_cost, "arch_tau": tau}

  return weight_step, arch_step


def make_search_step(space, weight_tx, arch_tx, **kwargs):
  """``step(state, {"train": batch, "val": batch}) -> (state, metrics)``: one weight
  step on D_train, then one architecture step on D_val with the new weights (§6)."""
  weight_step, arch_step = search_steps(space, weight_tx, arch_tx, **kwargs)

  def step(state: TrainState, batch):
    state, weight_metrics = weight_step(state, batch["train"])
    state, arch_metrics = arch_step(state, batch["val"])
    return state.replace(step=state.step + 1), {**weight_metrics, **arch_metrics}

  return step


def init_search_state(space, weight_tx, arch_tx):
  """``init(key) -> TrainState`` of the search: weights with the SGD state, the
  architecture parameters with their own Adam state (§6)."""
  def init(key):
    params, model_state, arch = space.init(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=weight_tx.init(params), arch_params=arch,
                      arch_opt_state=arch_tx.init(arch))
  return init


def arch_record(space, arch, cfg, flops_max: int, epoch: int, step: int, epochs: int,
                table=None) -> dict:
  """One line of ``arch_history.jsonl`` (the contract of :mod:`jaxprune.plots`)."""
  arch = jax.device_get(arch)
  return {
      "epoch": epoch, "step": step,
      "tau": float(tau_at(epoch - 1, epochs, cfg.tau_max, cfg.tau_min, cfg.tau_schedule)),
      **space.record(arch),
      "flops_max": flops_max, "target_flops": flops_max * cfg.ratio,
      "tolerance_flops": flops_max * cfg.tolerance, "cost_mode": cfg.cost_mode,
      "space": space.kind, "cost": cfg.get("cost", "flops"),
      **latency_record(space, arch, cfg, table),
  }


def latency_record(space, arch, cfg, table) -> dict:
  """The latency keys of a history record (a ``table``: tas.cost=latency; {} otherwise):
  the table's expected and argmax latency, its full latency and the cost loss's band."""
  if table is None:
    return {}
  full = table.full
  return {"expected_latency_ms": float(table.expected(space, arch)),
          "argmax_latency_ms": float(table.argmax(space, arch)),
          "latency_max_ms": full, "target_latency_ms": full * cfg.ratio,
          "tolerance_latency_ms": full * cfg.tolerance,
          "latency_batch": table.batch_size}


def latency_batch(config) -> int:
  """The batch of the latency table: ``tas.latency_batch``, else the report's
  inference batch."""
  return int(config.tas.get("latency_batch", 0) or config.report.inference_batch_size)


def latency_table(space, config, workdir: str):
  """The latency table of ``space`` (tas.cost=latency), before the search starts.

  Process 0 reads ``<workdir>/search/latency_table.json`` when its fingerprint is this
  run's (a resumed run does not remeasure) or measures the table on its first device
  and writes it there; every process then uses process 0's times, so the replicated
  architecture step is the same program everywhere. A search with progress keeps the
  table it started with: a table measured for another setting (another machine) is
  refused in one line, unless ``tas.remeasure_latency`` restarts the search (and the
  retraining of what it derived) under a new measurement.
  """
  if space.kind != "graph":
    raise UserError("config tas.cost='latency' needs the graph search space (a per-op "
                    "latency table); use --config.tas.space=graph.")
  batch = latency_batch(config)
  path = os.path.join(workdir, "search", LATENCY_TABLE)
  foreign = ""
  if distributed.is_main_process() and _search_progress(workdir):
    cached, why = latency_lib.load(space, path, batch)
    foreign = why if cached is None and os.path.exists(path) else ""
  if distributed.agreed(bool(foreign)):
    if not config.tas.get("remeasure_latency", False):
      raise UserError(
          f"{foreign or 'the latency table was measured for another setting (see process 0)'}"
          ". This search has progress under that table's costs: resume it where the table "
          "was measured, or rerun with --config.tas.remeasure_latency=true to measure "
          "again and restart the search.")
    if distributed.is_main_process():
      print(f"[tas] {foreign}; tas.remeasure_latency: restarting the search "
            f"({os.path.join(workdir, 'search')} and what was derived from it removed)")
      for stage in ("search", "retrain"):
        shutil.rmtree(os.path.join(workdir, stage), ignore_errors=True)
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(workdir, "architecture.json"))
    distributed.barrier("tas_latency_restart")
  if distributed.is_main_process():
    table = latency_lib.load_or_measure(space, path, batch)
  else:
    table = latency_lib.plan(space, batch)
  table.set_program_ms(distributed.from_main(table.program_ms.astype(np.float32)))
  check_latency_times(table.program_ms, path)
  return table


def _search_progress(workdir: str) -> bool:
  """Whether the search stage has a checkpoint (it computed under the table's costs)."""
  directory = os.path.join(workdir, "search", "checkpoints")
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def check_latency_times(program_ms, path: str) -> None:
  """Every op time of a latency table is a positive finite number (a zero or negative
  time would make the cost loss's ratio NaN a few steps later)."""
  ms = np.asarray(program_ms, np.float64)
  bad = ~(np.isfinite(ms) & (ms > 0))
  if bad.any():
    raise UserError(f"The latency table {path} has {int(bad.sum())} of {ms.size} op times "
                    f"that are not positive finite ms (e.g. {ms[bad][0]!r}); delete it so "
                    "that the run measures a new one.")


def search(config, workdir: str, datasets, mesh, on_step=None, space=None
           ) -> tuple[dict, list[dict]]:
  """The search stage on ``space`` (default: :func:`make_space` of the config); returns
  ``({"space", "arch", "flops_max", "state", "latency"}, history)``: the final
  architecture parameters, the latency table (tas.cost=latency, else None) and the
  history."""
  cfg = config.tas
  train_ds = datasets["train"]
  if train_ds.labels is None:
    raise UserError("The TAS search needs a dataset with in-memory labels for its "
                    "per-class split.")
  idx_w, idx_a = data.per_class_split(train_ds.labels, 0.5, seed=cfg.split_seed)
  d_train, d_val = data.subset(train_ds, idx_w), data.subset(train_ds, idx_a)
  batch_size = cfg.batch_size
  mesh_lib.check_batch_size(batch_size, mesh, "tas.batch_size")
  steps_per_epoch = min(data.steps_per_epoch(d_train, batch_size),
                        data.steps_per_epoch(d_val, batch_size))
  total = cfg.epochs * steps_per_epoch
  if cfg.max_steps:
    total = min(total, cfg.max_steps)

  input_shape = train_ds.image_shape
  if space is None:
    space = make_space(config, common.build_model(config.model, train_ds.num_classes,
                                                  input_shape),
                       train_ds.num_classes, input_shape)
  flops_max = space.flops_max
  table = (latency_table(space, config, workdir)
           if cfg.get("cost", "flops") == "latency" else None)
  weight_tx, schedule = optim.sgd(cfg, steps_per_epoch, total)
  arch_tx = arch_optimizer(cfg)

  init = init_search_state(space, weight_tx, arch_tx)
  step = make_search_step(space, weight_tx, arch_tx, cfg=cfg, seed=config.seed,
                          flops_max=flops_max, steps_per_epoch=steps_per_epoch,
                          epochs=cfg.epochs, table=table)

  def record(arch, epoch, done):
    return arch_record(space, arch, cfg, flops_max, epoch, done, cfg.epochs, table)
  repl = mesh_lib.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: repl, jax.eval_shape(init, jax.random.key(0)))
  step = jax.jit(step, in_shardings=(state_sharding, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(state_sharding, repl), donate_argnums=(0,))

  def load(s):
    kw = dict(seed=config.seed, train=True, process_index=jax.process_index(),
              process_count=jax.process_count())
    return {"train": data.batch_at(d_train, s, batch_size, **kw),
            "val": data.batch_at(d_val, s, batch_size, **{**kw, "seed": config.seed + 1})}

  history_path = os.path.join(workdir, "search", "arch_history.jsonl")
  # Every process keeps the same history (records are computed from the replicated
  # architecture parameters); process 0 writes it.
  history = []

  def on_start(start):
    history[:] = [r for r in read_jsonl(history_path) if r["step"] <= start]
    distributed.barrier("tas_history_read")  # all have read it before it is rewritten
    if distributed.is_main_process():
      os.makedirs(os.path.dirname(history_path), exist_ok=True)
      with open(history_path, "w", encoding="utf-8") as f:
        f.writelines(metrics_lib.dumps(r) + "\n" for r in history)

  def on_epoch_end(state, epoch, done, means):
    rec = record(state.arch_params, epoch, done)
    rec["val_accuracy"] = means.get("val_accuracy")
    history.append(rec)
    if distributed.is_main_process():
      with open(history_path, "a", encoding="utf-8") as f:
        f.write(metrics_lib.dumps(rec) + "\n")

  result = loop.run_stage("search", workdir, init=init, seed=config.seed, step_fn=step,
                          load_batch=load, total_steps=total,
                          steps_per_epoch=steps_per_epoch, images_per_step=batch_size,
                          cfg=cfg, mesh=mesh, lr_schedule=schedule, on_start=on_start,
                          on_epoch_end=on_epoch_end, on_step=on_step)
  arch = jax.device_get(result.state.arch_params)
  if not history:  # the stage had finished before: nothing ran, read what it wrote
    history = read_jsonl(history_path)
  history = _complete_history(history, history_path, result, record, arch, total,
                              steps_per_epoch)
  if not history or history[-1]["step"] != total:  # a run shorter than one epoch
    history.append(record(arch, math.ceil(total / steps_per_epoch), total))
  return {"space": space, "arch": arch, "flops_max": flops_max, "state": result.state,
          "latency": table}, history


def _complete_history(history, path, result, record, arch, total,
                      steps_per_epoch) -> list[dict]:
  """The history with one record per epoch: a record lost from ``arch_history.jsonl``
  (a cut last line) is rebuilt from the final state and the loop's means of that epoch
  when it is the last epoch's; the file is rewritten (process 0) without the cut line.
  Any other lost record is a one-line error (it cannot be rebuilt)."""
  epochs = [r["epoch"] for r in history]
  want = list(range(1, total // steps_per_epoch + 1))
  last = result.summary.get("last_epoch") or {}
  if epochs != want and epochs == want[:-1] and last.get("step") == total == \
      want[-1] * steps_per_epoch:
    rec = record(arch, want[-1], total)
    rec["val_accuracy"] = last["means"].get("val_accuracy")
    history = [*history, rec]
    epochs = want
  if epochs != want:
    missing = sorted(set(want) - set(epochs)) or want
    raise UserError(f"{path} has no record of search epoch {missing[0]} (a cut or deleted "
                    "line) and it cannot be rebuilt: restore the file, or delete "
                    f"{os.path.dirname(path)} to redo the search.")
  if distributed.is_main_process() and os.path.exists(path):
    with open(path, encoding="utf-8", errors="replace") as f:
      cut = f.read() != "".join(metrics_lib.dumps(r) + "\n" for r in history)
    if cut:
      metrics_lib.rewrite_jsonl(path, history)
  return history


DERIVE_EPOCHS = ("last", "best")


def in_band(record: dict) -> bool:
  """Whether an epoch's argmax cost (FLOPs, or the table's ms with tas.cost=latency)
  satisfies the cost loss's target band (§5)."""
  unit, top = (("latency_ms", "latency_max_ms") if record.get("cost") == "latency"
               else ("flops", "flops_max"))
  f, target = record[f"argmax_{unit}"], record[f"target_{unit}"]
  tol = record[f"tolerance_{unit}"]
  if record["cost_mode"] == "paper":
    t = tol / record[top]
    return (1 - t) * target <= f <= (1 + t) * target
  return target - tol <= f <= target


def choose_epoch(history: list[dict], derive_epoch: str) -> dict:
  """The history record to derive from (§7): the last epoch (default), or the epoch
  with the best search-time D_val accuracy among those inside the cost band."""
  if derive_epoch not in DERIVE_EPOCHS:
    raise UserError(f"Unknown tas.derive_epoch {derive_epoch!r}; use one of "
                    f"{DERIVE_EPOCHS}.")
  if derive_epoch == "best":
    candidates = [r for r in history if in_band(r) and r.get("val_accuracy") is not None]
    if candidates:
      return max(candidates, key=lambda r: (r["val_accuracy"], r["epoch"]))
    print("[tas] no search epoch inside the cost band; deriving from the last epoch")
  return history[-1]


def validate(config):
  """Checks the TAS fields before any data is read or any stage runs (§5, §6).

  ``num_picks`` >= 2: with one pick the sampled width gets weight 1 and the width logits
  no gradient (the authors: the search then fails).
  """
  cfg = config.tas

  def fail(key, value, want):
    raise UserError(f"config tas.{key}={value!r}: {want}. Fix it with --config.tas.{key}=...")

  if not 0 < cfg.ratio < 1:
    fail("ratio", cfg.ratio, "the FLOPs target is a fraction of the unpruned network's, "
         "in (0, 1)")
  if int(cfg.num_picks) != cfg.num_picks or cfg.num_picks < 2:
    fail("num_picks", cfg.num_picks, "TAS samples at least 2 widths per layer (with 1 the "
         "architecture gets no gradient)")
  if not cfg.tau_min > 0:
    fail("tau_min", cfg.tau_min, "the Gumbel temperature must stay > 0")
  if not cfg.tau_max >= cfg.tau_min:
    fail("tau_max", cfg.tau_max, f"must be >= tas.tau_min ({cfg.tau_min})")
  if not 0 <= cfg.tolerance < 1:
    fail("tolerance", cfg.tolerance, "a fraction of the unpruned FLOPs, in [0, 1)")
  if not cfg.lambda_cost >= 0:
    fail("lambda_cost", cfg.lambda_cost, "must be >= 0")
  if cfg.tau_schedule not in TAU_SCHEDULES:
    fail("tau_schedule", cfg.tau_schedule, f"use one of {', '.join(TAU_SCHEDULES)}")
  if cfg.derive_epoch not in DERIVE_EPOCHS:
    fail("derive_epoch", cfg.derive_epoch, f"use one of {', '.join(DERIVE_EPOCHS)}")
  if cfg.get("space", "auto") not in SPACES:
    fail("space", cfg.space, f"use one of {', '.join(SPACES)}")
  round_to = cfg.get("round_to", 0)
  if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 0:
    fail("round_to", cfg.round_to, "widths are rounded to a multiple of this int (0: the "
         "backend's default for the model, 8 or 16 on a CPU; 1: no rounding)")
  if not isinstance(cfg.get("depth", True), bool):
    fail("depth", cfg.depth, "true or false (search the depths of the stages)")
  if not isinstance(cfg.get("remeasure_latency", False), bool):
    fail("remeasure_latency", cfg.remeasure_latency, "true or false (measure the latency "
         "table again and restart the search when it was measured for another setting)")
  if cfg.get("remeasure_latency", False) and cfg.get("cost", "flops") != "latency":
    fail("remeasure_latency", cfg.remeasure_latency, "only with --config.tas.cost=latency "
         "(the FLOPs cost has no table)")
  if not cfg.get("depth", True) and cfg.get("space", "auto") == "resnet":
    fail("depth", cfg.depth, "the dedicated ResNet space always searches depths; widths "
         "only with --config.tas.space=graph")
  if cfg.cost_mode not in COST_LOSS_MODES:
    fail("cost_mode", cfg.cost_mode, f"use one of {', '.join(COST_LOSS_MODES)}")
  if cfg.get("cost", "flops") not in COSTS:
    fail("cost", cfg.cost, f"use one of {', '.join(COSTS)}")
  if cfg.get("cost", "flops") == "latency" and cfg.get("space", "auto") == "resnet":
    fail("cost", cfg.cost, "the dedicated ResNet space has no per-op latency table; "
         "search with --config.tas.space=graph (or auto)")
  batch = cfg.get("latency_batch", 0)
  if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
    fail("latency_batch", batch, "the batch the latency table is timed at: a positive "
         "int (0: report.inference_batch_size)")
  if cfg.get("search_only", False) and cfg.released_shape:
    raise UserError("tas.search_only=True and tas.released_shape both set: a released "
                    "shape skips the search; choose one.")
  if cfg.released_shape:
    shape = released_shape(cfg.released_shapes_file, cfg.released_shape)
    layout = DEDICATED.get(config.model.name)
    if shape["dataset"] != layout:
      raise UserError(f"Released shape {cfg.released_shape} is a {shape['dataset']} ResNet; "
                      f"this config builds {config.model.name!r} (use a "
                      f"{'dataset=imagenet2012' if shape['dataset'] == 'imagenet' else 'CIFAR'}"
                      " config).")
    if released_depth(shape) != config.model.get("depth"):
      raise UserError(f"Released shape {cfg.released_shape} is a ResNet-"
                      f"{released_depth(shape)}; add depth={released_depth(shape)} to the config "
                      "args.")
  if cfg.teacher_dir and not os.path.isdir(cfg.teacher_dir):
    raise UserError(f"config tas.teacher_dir: no saved variables at {cfg.teacher_dir} "
                    "(a finished baseline run's <workdir>/baseline/final).")


def teacher(config, workdir: str, datasets, model):
  """The unpruned network's variables and test accuracy (trained or loaded)."""
  input_shape = datasets["train"].image_shape
  if config.tas.teacher_dir:
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    variables = ckpt_lib.load_variables(config.tas.teacher_dir, abstract)
    mesh = mesh_lib.make_mesh()
    acc = common.evaluate(steps.make_eval_step(model, mesh=mesh), variables,
                          datasets["test"], config.train.eval_batch_size, mesh)
    return variables, acc["accuracy"]
  result = common.train("teacher", config.teacher, config.seed, workdir, datasets, model)
  return result.state.variables, result.summary["eval_accuracy"]


def run(config, workdir: str) -> dict:
  t0 = time.time()
  validate(config)
  search_only = config.tas.get("search_only", False)

  def check(base_model, train_ds):
    shape = None
    if config.tas.released_shape:
      shape = released_shape(config.tas.released_shapes_file, config.tas.released_shape)
      if shape["class_num"] != train_ds.num_classes:
        raise UserError(f"Released shape {config.tas.released_shape} is for "
                        f"{shape['dataset']} with {shape['class_num']} classes; the dataset "
                        f"has {train_ds.num_classes}.")
    # The search space is built (the graph traced) before any work: an unsupported model
    # stops here.
    space = (None if config.tas.released_shape else
             make_space(config, base_model, train_ds.num_classes, train_ds.image_shape))
    return shape, space

  sections = ([] if search_only or config.tas.teacher_dir else ["teacher"]) + \
      ([] if config.tas.released_shape else ["tas"]) + ([] if search_only else ["train"])
  started = common.start(config, workdir, sections=sections, check=check)
  mesh, datasets, base_model, (shape, space) = (started.mesh, started.datasets,
                                                started.model, started.checked)
  train_ds, input_shape = started.train_ds, started.input_shape
  if not search_only:
    teacher_vars, teacher_acc = teacher(config, workdir, datasets, base_model)

  history = []
  if config.tas.released_shape:  # retrain a published shape: no search (§10)
    from_shape = (models.imagenet_resnet_from_shape if shape["dataset"] == "imagenet"
                  else models.cifar_resnet_from_shape)
    derived_model = from_shape(shape["xchannels"], shape["xblocks"], train_ds.num_classes,
                               dtype=jnp.dtype(config.model.get("dtype") or "float32"))
    derived = {"widths": list(shape["xchannels"][1:]), "blocks": list(shape["xblocks"])}
    source = {"released_shape": config.tas.released_shape}
  else:
    _, history = search(config, workdir, datasets, mesh, space=space)
    chosen = choose_epoch(history, config.tas.derive_epoch)
    derived_model, derived = space.derived_from(chosen)
    source = {"search_epoch": chosen["epoch"], "derive_epoch": config.tas.derive_epoch,
              "space": space.kind, "cost": config.tas.get("cost", "flops")}
    if "argmax_latency_ms" in chosen:  # the table's prediction for the derived network
      source.update(latency_ms=chosen["argmax_latency_ms"],
                    latency_max_ms=chosen["latency_max_ms"],
                    latency_batch=chosen["latency_batch"],
                    predicted_speedup=chosen["latency_max_ms"] / chosen["argmax_latency_ms"])
  derived_abstract = jax.eval_shape(
      lambda: derived_model.init(jax.random.key(0), jnp.zeros((1, *input_shape)),
                                 train=False))
  counts = flops.count(derived_model, derived_abstract, input_shape)
  base_flops = flops.count(base_model, jax.eval_shape(
      lambda: base_model.init(jax.random.key(0), jnp.zeros((1, *input_shape)),
                              train=False)), input_shape)["flops"]
  depth = None if external.is_external(config.model.name) else config.model.get("depth")
  name = f"ResNet-{depth}" if space is None or space.kind == "resnet" else config.model.name
  architecture = {"model": config.model.name, "depth": depth, "widths": derived["widths"],
                  "blocks": derived["blocks"],
                  **({"skipped_blocks": derived["skipped_blocks"]}
                     if "skipped_blocks" in derived else {}),
                  # the multiple the search's width candidates were rounded up to
                  **({"round_to": space.round_to} if space is not None else {}),
                  "flops": counts["flops"],
                  "params": counts["params"], "flops_max": base_flops,
                  "flops_ratio": counts["flops"] / base_flops,
                  "target_ratio": config.tas.ratio, **source}
  if distributed.is_main_process():
    with open(os.path.join(workdir, "architecture.json"), "w", encoding="utf-8") as f:
      f.write(metrics_lib.dumps(architecture, indent=2))

  if search_only:  # the searched architecture is the product: no teacher, no retraining
    out = {"method": "tas", "dataset": config.dataset.name, "model": config.model.name,
           "depth": depth, "target_ratio": config.tas.ratio, "search_only": True,
           "wall_time_s": time.time() - t0, "architecture": architecture}
    if distributed.is_main_process() and history:
      out["plots"] = plots.tas_search(history, os.path.join(workdir, "plots"))
    report.write_report(workdir, out, title=f"TAS search, {name} on {config.dataset.name}")
    return out

  kwargs = {}
  if config.kd.enabled:
    kwargs = {"objective": distill.kd_objective(base_model, config.kd.alpha,
                                                config.kd.temperature),
              "aux": teacher_vars}
  retrained = common.train("retrain", config.train, config.seed, workdir, datasets,
                           derived_model, **kwargs)

  batch = config.report.inference_batch_size
  rows = {"base": common.model_row(base_model, teacher_vars, input_shape, teacher_acc,
                                   batch),
          "derived": common.model_row(derived_model, retrained.state.variables,
                                      input_shape, retrained.summary["eval_accuracy"],
                                      batch)}
  common.time_rows(config, rows, {"base": (base_model, teacher_vars),
                                  "derived": (derived_model, retrained.state.variables)},
                   input_shape)
  paired = common.paired_evaluate(base_model, teacher_vars, retrained.state.variables,
                                  datasets["test"], config.train.eval_batch_size, mesh,
                                  model_b=derived_model)
  out = {"method": "tas", "dataset": config.dataset.name, "model": config.model.name,
         "depth": depth, "kd": bool(config.kd.enabled), "target_ratio": config.tas.ratio,
         "base_accuracy": teacher_acc,
         "derived_accuracy": retrained.summary["eval_accuracy"],
         # derived minus base on the same test images, with its (paired) standard error
         "accuracy_change": -paired["error_change"],
         "accuracy_change_se": paired["error_change_se"],
         "base_flops": rows["base"]["flops"], "derived_flops": rows["derived"]["flops"],
         "flops_reduction": 1 - rows["derived"]["flops"] / rows["base"]["flops"],
         "base_params": rows["base"]["params"], "derived_params": rows["derived"]["params"],
         "params_reduction": 1 - rows["derived"]["params"] / rows["base"]["params"],
         # Measured speed next to what the FLOPs promise (and the latency table's
         # prediction with tas.cost=latency), at report.inference_batch_size.
         "speedup": rows["base"]["inference_ms"] / rows["derived"]["inference_ms"],
         "flops_speedup": rows["base"]["flops"] / rows["derived"]["flops"],
         **({"predicted_speedup": architecture["predicted_speedup"]}
            if "predicted_speedup" in architecture else {}),
         "wall_time_s": time.time() - t0, "architecture": architecture}
  if distributed.is_main_process() and history:
    out["plots"] = plots.tas_search(history, os.path.join(workdir, "plots"))
  report.write_report(workdir, out, title=f"TAS {name} on {config.dataset.name}",
                      models=rows)
  return out
