"""What every recipe shares: the start-up (data, model, checks, workdir), training a
classifier stage, evaluating it and the report's rows."""
import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxprune import config_lib, data, flops, models, optim
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import loop, mesh as mesh_lib, report, steps as steps_lib
from jaxprune.engine.state import TrainState, init_from_variables, init_train_state
from jaxprune.errors import UserError

build_model = models.build_model


@dataclasses.dataclass
class Start:
  """A started recipe: its data, its checked model, the mesh, the start time and what
  the recipe's own check returned (:func:`start`)."""
  datasets: dict
  model: Any
  mesh: Any
  t0: float
  checked: Any = None

  @property
  def train_ds(self):
    return self.datasets["train"]

  @property
  def test_ds(self):
    return self.datasets["test"]

  @property
  def input_shape(self):
    return self.datasets["train"].image_shape


def start(config, workdir: str, *, sections=("train",),
          check: Callable[[Any, Any], Any] | None = None) -> Start:
  """The start-up of every recipe: loads the data, builds ``config.model``, checks the
  weight-decay selectors and runs the recipe's ``check(model, train_ds)`` (its result
  is :attr:`Start.checked`), then locks and checks the workdir
  (:func:`jaxprune.config_lib.check_workdir`, with the batch sizes of ``sections``).
  Everything that can fail on the data or the model fails before the workdir is
  touched."""
  t0 = time.time()
  mesh = mesh_lib.make_mesh()
  datasets = data.load(config.dataset)
  train_ds = datasets["train"]
  model = build_model(config.model, train_ds.num_classes, train_ds.image_shape)
  check_selectors(config, model, train_ds.image_shape)
  checked = None if check is None else check(model, train_ds)
  config_lib.check_workdir(workdir, config, datasets, tuple(sections))
  return Start(datasets, model, mesh, t0, checked)


def check_selectors(config, model, input_shape) -> None:
  """Every section's ``weight_decay_on`` must select a parameter of ``model``: a pattern
  written for jaxprune's layer names stops here, before any work, on a user's model."""
  params = None
  for section, cfg in config.items():
    pattern = cfg.get("weight_decay_on") if hasattr(cfg, "get") else None
    if pattern is None:
      continue
    if params is None:
      params = jax.eval_shape(lambda: model.init(
          jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))["params"]
    try:
      optim.select(params, pattern)
    except ValueError as e:
      names = ", ".join(optim.selection.paths(params)[:8])
      raise UserError(f"config {section}.weight_decay_on={pattern!r} selects no parameter "
                      f"of model {config.model.name!r} (its params: {names}, ...); set "
                      f"--config.{section}.weight_decay_on=<path regex>.") from e


def sum_over_split(step: Callable[[Any], dict], ds, batch_size: int, mesh) -> dict:
  """``step(global batch) -> sums`` added up over every batch of ``ds`` (each process
  feeds its rows of the global batch), on the host."""
  totals = None
  for local in data.eval_batches(ds, batch_size, process_index=jax.process_index(),
                                 process_count=jax.process_count()):
    out = step(mesh_lib.global_batch(local, mesh))
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
  return jax.device_get(totals)


def evaluate(eval_step, variables, ds, batch_size: int, mesh) -> dict:
  """Accuracy and mean loss over the whole split (padded rows masked out)."""
  totals = sum_over_split(lambda batch: eval_step(variables, batch), ds, batch_size, mesh)
  count = max(float(totals["count"]), 1.0)
  return {"accuracy": float(totals["correct"]) / count,
          "loss": float(totals["loss_sum"]) / count}


def train_classifier(name: str, workdir: str, *, model, tx: optax.GradientTransformation,
                     lr_schedule: Callable[[int], float], train_ds, eval_ds,
                     cfg: ml_collections.ConfigDict, seed: int,
                     objective: steps_lib.Objective = steps_lib.cross_entropy,
                     aux: Any = None, mesh=None,
                     on_step: Callable[[int, TrainState], None] | None = None,
                     init_variables: Any = None) -> loop.StageResult:
  """Trains ``model`` on ``train_ds`` as stage ``name`` and evaluates on ``eval_ds``.

  ``cfg`` is the ``train`` section of a config: ``epochs``, ``batch_size``,
  ``eval_batch_size``, ``eval_every_epochs``, ``log_every_steps``,
  ``checkpoint_every_steps``, ``keep_checkpoints`` and optionally ``max_steps``
  (a cap for smoke runs). ``objective(logits, batch, aux)`` is the loss (``aux``:
  e.g. a KD teacher's variables). Training starts from ``init_variables`` (e.g. a
  pruned network's) or from scratch. The final variables are also written to
  ``<stage>/final`` for later stages.
  """
  mesh = mesh or mesh_lib.make_mesh()
  batch_size = cfg.batch_size
  mesh_lib.check_batch_size(batch_size, mesh)
  mesh_lib.check_batch_size(cfg.eval_batch_size, mesh, "eval batch size")
  steps_per_epoch = data.steps_per_epoch(train_ds, batch_size)
  total = cfg.epochs * steps_per_epoch
  if cfg.get("max_steps"):
    total = min(total, cfg.max_steps)

  init = (init_train_state(model, tx, train_ds.image_shape) if init_variables is None
          else init_from_variables(init_variables, tx))
  repl = mesh_lib.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: repl, jax.eval_shape(init, jax.random.key(seed)))
  train_step = steps_lib.make_train_step(model, tx, seed=seed, mesh=mesh,
                                         state_sharding=state_sharding,
                                         objective=objective)
  eval_step = steps_lib.make_eval_step(model, mesh=mesh)
  aux = mesh_lib.replicate(aux, mesh) if aux is not None else None

  def load(step):
    return data.batch_at(train_ds, step, batch_size, seed=seed, train=True,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())

  result = loop.run_stage(
      name, workdir, init=init, seed=seed,
      step_fn=lambda state, batch: train_step(state, batch, aux), load_batch=load,
      total_steps=total, steps_per_epoch=steps_per_epoch, images_per_step=batch_size,
      cfg=cfg, mesh=mesh, lr_schedule=lr_schedule, on_step=on_step,
      evaluate=lambda state: evaluate(eval_step, state.variables, eval_ds,
                                      cfg.eval_batch_size, mesh))
  final_dir = os.path.join(workdir, name, "final")
  ckpt_lib.save_variables_once(final_dir, result.state.variables)
  return result


def train(name: str, train_cfg, seed: int, workdir: str, datasets, model,
          **kwargs) -> loop.StageResult:
  """Trains ``model`` with the SGD recipe of ``train_cfg`` as stage ``name``.

  Used by every recipe that trains a classifier (teachers, retraining, fine-tuning);
  ``kwargs`` go to :func:`train_classifier` (e.g. a KD objective).
  """
  train_ds, test_ds = datasets["train"], datasets["test"]
  steps_per_epoch = data.steps_per_epoch(train_ds, train_cfg.batch_size)
  total = train_cfg.epochs * steps_per_epoch
  if train_cfg.max_steps:
    total = min(total, train_cfg.max_steps)
  tx, schedule = optim.sgd(train_cfg, steps_per_epoch, total)
  return train_classifier(name, workdir, model=model, tx=tx, lr_schedule=schedule,
                          train_ds=train_ds, eval_ds=test_ds, cfg=train_cfg,
                          seed=seed, **kwargs)


def paired_error_difference(wrong_only_a: float, wrong_only_b: float, count: float
                            ) -> tuple[float, float]:
  """``(error_b - error_a, its standard error)`` of two networks scored on the same
  ``count`` images, from the images only one of them gets wrong: the per-image
  difference ``d = wrong_b - wrong_a`` is -1, 0 or 1; the standard error is
  ``sd(d) / sqrt(count)`` (sample sd). Raises ``ValueError`` for fewer than 2 images."""
  n = float(count)
  if n < 2:
    raise ValueError(f"A paired difference needs at least 2 images, not {n:g}.")
  mean = (wrong_only_b - wrong_only_a) / n
  var = ((wrong_only_a + wrong_only_b) / n - mean ** 2) * n / (n - 1)
  return mean, float(np.sqrt(max(var, 0.0) / n))


def paired_evaluate(model, variables_a, variables_b, ds, batch_size: int, mesh, *,
                    model_b=None) -> dict:
  """Both networks (``model_b``, default ``model``, runs ``variables_b``) on every image
  of ``ds``: the counts of :func:`jaxprune.engine.steps.make_paired_eval_step` over the
  split, and ``error_change`` (b's test error minus a's) with ``error_change_se``, its
  standard error on this test set (:func:`paired_error_difference`)."""
  step = steps_lib.make_paired_eval_step(model, model_b, mesh=mesh)
  variables_a, variables_b = (mesh_lib.replicate(jax.tree.map(jnp.asarray, v), mesh)
                              for v in (variables_a, variables_b))
  totals = sum_over_split(lambda batch: step(variables_a, variables_b, batch), ds,
                          batch_size, mesh)
  counts = {k: int(round(float(v))) for k, v in totals.items()}
  change, se = paired_error_difference(counts["wrong_only_a"], counts["wrong_only_b"],
                                       counts["count"])
  return {**counts, "error_change": change, "error_change_se": se}


def evaluate_accuracy(model, variables, test_ds, batch_size: int, mesh=None) -> float:
  """Test accuracy of ``model`` with ``variables`` (e.g. a pruned network before fine-tuning)."""
  mesh = mesh or mesh_lib.make_mesh()
  eval_step = steps_lib.make_eval_step(model, mesh=mesh)
  return evaluate(eval_step, mesh_lib.replicate(jax.tree.map(jnp.asarray, variables), mesh),
                  test_ds, batch_size, mesh)["accuracy"]


def model_row(model, variables, input_shape, accuracy: float, inference_batch: int) -> dict:
  """One report row: accuracy, FLOPs and params; its ``inference_ms`` is filled by
  :func:`time_rows` with the other rows'."""
  counts = flops.count(model, variables, input_shape)
  return {"accuracy": accuracy, "flops": counts["flops"], "params": counts["params"],
          "inference_ms": None, "inference_batch": inference_batch}


def time_rows(config, rows: dict, nets: dict, input_shape) -> dict:
  """Sets ``rows[name]["inference_ms"]`` of every network in ``nets`` (``{row name:
  (model, variables)}``) from one alternated measurement at
  ``report.inference_batch_size`` (:func:`jaxprune.engine.report.compare_inference`,
  ``report.inference_rounds`` rounds): the report's speed-ups are ratios of the same
  moments, not of two timings a loaded machine's drift apart. Returns the ms."""
  batch = config.report.inference_batch_size
  ms = report.compare_inference(nets, tuple(input_shape), batch,
                                rounds=config.report.get("inference_rounds", 20))
  for name, value in ms.items():
    rows.setdefault(name, {}).update(inference_ms=value, inference_batch=batch)
  return ms
