"""Baseline recipe: train the unpruned network, report it, keep it as a teacher.

Stage ``baseline`` trains ``config.model`` on ``config.dataset`` with the SGD recipe
of ``config.train``; its final variables (``<workdir>/baseline/final``) are what
later recipes load as the teacher. The report gives test accuracy, FLOPs, params
and measured inference time.
"""
import time

import jax
import jax.numpy as jnp

from jaxprune import config_lib, data, flops, models, optim
from jaxprune.engine import loop, mesh as mesh_lib, report, steps
from jaxprune.errors import UserError
from jaxprune.models import external


def build_model(model_cfg, num_classes: int, input_shape=None):
  """The model named by a ``model`` config section.

  A jaxprune model (``name`` in :data:`jaxprune.models.MODELS`) gets the section's other
  fields (None-valued ones omitted) updated by ``kwargs``; a user's factory
  (``name="<module>:<factory>"``, :mod:`jaxprune.models.external`) gets only ``kwargs``
  and is checked on ``input_shape``.
  """
  fields = model_cfg.to_dict()
  extra = external.parse_kwargs(fields.pop("kwargs", None))
  name = fields.pop("name")
  dtype = fields.pop("dtype", None)
  if dtype not in (None, "float32"):  # compute dtype; parameters stay float32
    fields["dtype"] = jnp.dtype(dtype)
  if external.is_external(name):
    if input_shape is None:
      raise ValueError("build_model needs the input shape for a user model")
    return external.build(name, extra, num_classes, input_shape, fields.get("dtype"))
  kwargs = {k: v for k, v in fields.items() if v is not None}
  return models.get_model(name, num_classes=num_classes, **{**kwargs, **extra})


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


def train(name: str, train_cfg, seed: int, workdir: str, datasets, model,
          **kwargs) -> loop.StageResult:
  """Trains ``model`` with the SGD recipe of ``train_cfg`` as stage ``name``.

  Used by every recipe that trains a classifier (teachers, retraining, fine-tuning);
  ``kwargs`` go to :func:`jaxprune.engine.loop.train_classifier` (e.g. a KD objective).
  """
  train_ds, test_ds = datasets["train"], datasets["test"]
  steps_per_epoch = data.steps_per_epoch(train_ds, train_cfg.batch_size)
  total = train_cfg.epochs * steps_per_epoch
  if train_cfg.max_steps:
    total = min(total, train_cfg.max_steps)
  tx, schedule = optim.sgd(train_cfg, steps_per_epoch, total)
  return loop.train_classifier(name, workdir, model=model, tx=tx, lr_schedule=schedule,
                               train_ds=train_ds, eval_ds=test_ds, cfg=train_cfg,
                               seed=seed, **kwargs)


def evaluate_accuracy(model, variables, test_ds, batch_size: int, mesh=None) -> float:
  """Test accuracy of ``model`` with ``variables`` (e.g. a pruned network before fine-tuning)."""
  mesh = mesh or mesh_lib.make_mesh()
  eval_step = steps.make_eval_step(model, mesh=mesh)
  return loop.evaluate(eval_step, mesh_lib.replicate(jax.tree.map(jnp.asarray, variables),
                                                     mesh),
                       test_ds, batch_size, mesh)["accuracy"]


def model_row(model, variables, input_shape, accuracy: float, inference_batch: int) -> dict:
  """One report row: accuracy, FLOPs, params and measured inference time."""
  counts = flops.count(model, variables, input_shape)
  timing = report.measure_inference(model, variables, input_shape, inference_batch)
  return {"accuracy": accuracy, "flops": counts["flops"], "params": counts["params"],
          "inference_ms": timing["ms_per_batch"], "inference_batch": timing["batch_size"]}


def run(config, workdir: str) -> dict:
  t0 = time.time()
  datasets = data.load(config.dataset)
  train_ds = datasets["train"]
  model = build_model(config.model, train_ds.num_classes, train_ds.image_shape)
  check_selectors(config, model, train_ds.image_shape)
  # After the data and model checks: a failed start leaves the workdir untouched.
  config_lib.check_workdir(workdir, config, datasets)
  result = train("baseline", config.train, config.seed, workdir, datasets, model)
  row = model_row(model, result.state.variables, train_ds.image_shape,
                  result.summary["eval_accuracy"], config.report.inference_batch_size)
  out = {"method": "baseline", "dataset": config.dataset.name, "model": config.model.name,
         "test_accuracy": row["accuracy"], "flops": row["flops"], "params": row["params"],
         "train_steps": result.summary["steps"],
         "train_time_s": result.summary["train_time_s"], "wall_time_s": time.time() - t0,
         "inference_ms": row["inference_ms"], "teacher_variables": f"{workdir}/baseline/final"}
  report.write_report(workdir, out, title=f"Baseline {config.model.name} on "
                      f"{config.dataset.name}", models={"base": row})
  return out
