"""Shared pieces of the config files in ``configs/`` (:func:`base_config`,
:func:`parse_arg`), the checks every recipe shares (:func:`validate`) and the workdir's
config guard (:func:`check_workdir`)."""
import json
import math
import os
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

from jaxprune.engine import distributed
from jaxprune.engine import metrics as metrics_lib
from jaxprune.engine import workdir as workdir_lib
from jaxprune.errors import UserError

# Fields (in any section) that may change between the runs of one workdir: they
# change how often a run logs or saves, never what it computes. So may the whole
# ``runtime`` section (how it runs on the backend).
RESUMABLE_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                    "eval_every_epochs", "inference_batch_size",
                    "remeasure_latency")  # an action: restart the search (methods/tas.py)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"smoke,depth=56,dataset=cifar100"`` against typed ``defaults``.

  A bare word sets a boolean to True. Unknown keys and values that do not parse as
  the default's type raise :class:`UserError`.
  """
  out = dict(defaults)
  for token in filter(None, (arg or "").split(",")):
    key, eq, value = token.partition("=")
    key = key.strip()
    if key not in defaults:
      raise UserError(f"Unknown config argument {key!r}; this config takes "
                      f"{', '.join(sorted(defaults))}.")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise UserError(f"Config argument {key!r} needs a value: {key}=...")
      out[key] = True
      continue
    try:
      if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        out[key] = value.lower() in ("true", "1")
      elif default is None:
        out[key] = value
      else:
        out[key] = type(default)(value)
    except ValueError:
      raise UserError(f"Config argument {key}={value!r} is not a "
                      f"{type(default).__name__}.") from None
  return ml_collections.ConfigDict(out)


# The CIFAR-10 subset beside the repository (../shared/data; 4000 train / 1000 test images),
# relative to the repository root the commands run from.
CIFAR10_SUBSET_NPZ = "../shared/data/cifar10-subset/cifar10_exact_train0-3999_test0-999.npz"


def dataset_config(name: str) -> ml_collections.ConfigDict:
  """The ``dataset`` section; see :func:`jaxprune.data.load` for the fields.

  ``"cifar10_subset"`` is a config-level alias: the ``npz`` dataset at
  :data:`CIFAR10_SUBSET_NPZ`.
  """
  cfg = ml_collections.ConfigDict({
      "name": name,
      "data_dir": config_dict.placeholder(str),
      "manual_dir": config_dict.placeholder(str),
      "path": config_dict.placeholder(str),
      "num_classes": config_dict.placeholder(int),  # npz: else class_names, else inferred
      "augment": "auto",
      "synthetic": {"num_train": 2048, "num_test": 512, "image_shape": (32, 32, 3),
                    "num_classes": 10, "seed": 0},
  })
  if name == "cifar10_subset":
    cfg.name, cfg.path = "npz", CIFAR10_SUBSET_NPZ
  return cfg


def model_config(name: str, **fields: Any) -> ml_collections.ConfigDict:
  """The ``model`` section: a jaxprune model's name and arguments, or a user's factory.

  ``name`` is a key of :data:`jaxprune.models.MODELS` or ``"<module path>:<factory>"``
  (a Linen or NNX model from the user's ``PYTHONPATH``, see
  :mod:`jaxprune.models.external`). ``kwargs`` is a Python dict literal of extra
  arguments, e.g. ``--config.model.kwargs="{'features': 64}"``; a user factory gets
  only these (the section's other fields are for jaxprune's models).
  """
  # dtype: the compute dtype of convs and matmuls, "float32" (unset) or "bfloat16"
  # (parameters, optimizer states, batch-norm statistics and losses stay float32).
  return ml_collections.ConfigDict({"name": name, **fields, "kwargs": "",
                                    "dtype": config_dict.placeholder(str)})


def train_config(**overrides) -> ml_collections.ConfigDict:
  """The ``train`` section: SGD recipe, schedule and loop frequencies."""
  cfg = ml_collections.ConfigDict({
      "epochs": 300,
      "warmup_epochs": 5,
      "batch_size": 256,
      "eval_batch_size": 500,
      "learning_rate": 0.1,
      "schedule": "cosine",
      "decay_epochs": (),
      "momentum": 0.9,
      "nesterov": True,
      "weight_decay": 5e-4,
      "weight_decay_on": config_dict.placeholder(str),
      "max_steps": 0,  # 0: no cap; otherwise stop after this many steps (smoke runs)
      "eval_every_epochs": 1,
      "log_every_steps": 50,
      "checkpoint_every_steps": 500,
      "keep_checkpoints": 2,
  })
  cfg.update(overrides)
  return cfg


def base_config(method: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.method = method
  config.seed = 0
  # The report times its networks at inference_batch_size, alternated for
  # inference_rounds rounds (the median kept): a speed-up compares the same moments.
  config.report = ml_collections.ConfigDict({"inference_batch_size": 128,
                                             "inference_rounds": 20})
  # How the program runs on this backend, not what it computes (float rounding aside):
  # the layer implementation and the XLA:CPU flag and allocator settings, each chosen
  # from the backend under "auto" (jaxprune.engine.runtime, jaxprune.models.layers).
  config.runtime = ml_collections.ConfigDict(
      {"layers": "auto", "xla_cpu_flags": "auto", "malloc_tuning": "auto"})
  return config


def flatten(d: dict, prefix: str = "") -> dict:
  """``{"a.b": value}`` of a nested dict (a config's ``to_dict()``)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# Compute dtypes of ``model.dtype`` (every jaxprune model takes one; a user's model
# through its factory's ``dtype`` argument or its module's ``dtype`` field).
COMPUTE_DTYPES = ("float32", "bfloat16")



# The range of every number a recipe reads, by the key's last part or ``section.name``
# (the more specific wins): ``(check, requirement)``. One table for every recipe, listed
# in docs/config_checks.md; methods check their string choices and cross-field rules on
# top (``methods/<m>.validate``). A number under no rule must still be finite.
def _int_at_least(low):
  return lambda v: v == int(v) and v >= low


def _interval(lo, hi, lo_open=False, hi_open=False):
  return lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


RANGES: dict[str, tuple[Any, str]] = {
    "learning_rate": (_interval(0, 100, lo_open=True), "a learning rate must be in (0, 100]"),
    "epochs": (_int_at_least(1), "must be an integer, at least 1"),
    # AutoPrune's optional pretraining may be skipped.
    "pretrain.epochs": (_int_at_least(0), "must be an integer >= 0 (0 skips the stage)"),
    "batch_size": (_int_at_least(1), "must be an integer >= 1"),
    "warmup_epochs": (lambda v: v >= 0, "must be >= 0"),
    "max_steps": (_int_at_least(0), "must be an integer >= 0 (0: no cap)"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "momentum": (_interval(0, 1, hi_open=True), "momentum must be in [0, 1)"),
    "l1": (lambda v: v >= 0, "the L1 strength must be >= 0"),
    "seed": (_int_at_least(0), "must be an integer >= 0"),
    "round_to": (_int_at_least(1), "widths are rounded to a multiple of this: an integer >= 1"),
    "tas.round_to": (_int_at_least(0), "widths are rounded to a multiple of this: an integer "
                     ">= 0 (0: the backend's default for the model, 8 or 16 on a CPU; 1: no rounding)"),
    "ratio": (_interval(0, 1, lo_open=True, hi_open=True),
              "the kept share of the dense network, in (0, 1)"),
    "steps": (_int_at_least(1), "must be an integer >= 1"),
    "report.inference_batch_size": (_int_at_least(1), "must be an integer >= 1 (it is also "
                                    "bounded by the device memory once the data is known)"),
    "report.inference_rounds": (_int_at_least(1), "alternated timing rounds of the report's "
                                "networks (the median is kept): an integer >= 1"),
    "kd.alpha": (_interval(0, 1), "the weight of the distillation term, in [0, 1]"),
    "kd.temperature": (lambda v: v > 0, "the softmax temperature must be > 0"),
    "tas.num_picks": (_int_at_least(2), "TAS samples at least 2 widths per layer (with 1 "
                      "the architecture gets no gradient)"),
    "tas.tau_min": (lambda v: v > 0, "the Gumbel temperature must stay > 0"),
    "tas.tau_max": (lambda v: v > 0, "the Gumbel temperature must stay > 0"),
    "tas.tolerance": (_interval(0, 1, hi_open=True), "a fraction of the unpruned FLOPs, in "
                      "[0, 1)"),
    "tas.lambda_cost": (lambda v: v >= 0, "must be >= 0"),
    "tas.arch_beta1": (_interval(0, 1, hi_open=True), "an Adam beta, in [0, 1)"),
    "tas.arch_beta2": (_interval(0, 1, hi_open=True), "an Adam beta, in [0, 1)"),
    "tas.latency_batch": (_int_at_least(0), "an integer >= 0 (0: report.inference_batch_size;"
                          " bounded by the device memory once the data is known)"),
    "prune.round_to": (_int_at_least(0), "widths are rounded to a multiple of this: an "
                       "integer >= 0 (0: the backend's default for the model, 8 or 16 on a CPU; 1: no rounding)"),
    "prune.latency_batch": (_int_at_least(0), "an integer >= 0 (0: "
                            "report.inference_batch_size)"),
    "prune.latency_grid": (_int_at_least(1), "latency-table candidate widths per group: an "
                           "integer >= 1"),
    "prune.calibration_rounds": (_int_at_least(1), "whole-network timings of the latency "
                                 "calibration: an integer >= 1"),
    "autoprune.prune_epochs": (lambda v: v >= 0, "the mask learns this many epochs: >= 0 "
                               "(0: fixed-mask retraining, with zeros_start_pruned)"),
    "autoprune.regularization": (lambda v: v >= 0, "must be >= 0"),
    "autoprune.regularization_warmup_epochs": (lambda v: v >= 0, "must be >= 0"),
    "autoprune.slope": (lambda v: v > 0, "the surrogate's slope must be > 0"),
    "autoprune.m_init": (lambda v: v > 0, "gates start open at m = m_init: must be > 0"),
    "autoprune.finetune_distill_alpha": (_interval(0, 1), "the soft term's weight in the "
                                         "fine-tuning's distillation: in [0, 1] (0: off)"),
    "autoprune.finetune_distill_temperature": (lambda v: v > 0, "the distillation's "
                                               "temperature must be > 0"),
    "dataset.num_classes": (_int_at_least(2), "a classifier needs at least 2 classes"),
    "dataset.synthetic.num_classes": (_int_at_least(2), "a classifier needs at least 2 "
                                      "classes"),
    "dataset.synthetic.num_train": (_int_at_least(1), "must be an integer >= 1"),
    "dataset.synthetic.num_test": (_int_at_least(1), "must be an integer >= 1"),
}
for _name in ("eval_batch_size", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints", "eval_every_epochs", "probe_batch_size"):
  RANGES[_name] = RANGES["batch_size"]
RANGES["split_seed"] = RANGES["seed"]


# Methods with no FLOPs, params or latency target by design (the papers): their own
# sparsity decides the widths. A ``<method>.target`` key is refused in one line saying
# why (by ``validate``, and by the CLI, where the key does not exist).
NO_TARGET = {
    "ista": ("ISTA has no target: the zero BN gammas decide the widths (lambda and rho_l "
             "set how many; docs/methods/ista.md)"),
    "autoprune": ("AutoPrune has no target: the gates h(M) decide what is kept "
                  "(autoprune.regularization, lambda_m, sets how much; "
                  "docs/methods/autoprune.md)"),
}


def no_target(key: str) -> str | None:
  """The one line refusing ``key`` when it is ``<method>.target`` of a method in
  :data:`NO_TARGET`, else None."""
  method, _, rest = key.partition(".")
  if rest != "target" or method not in NO_TARGET:
    return None
  return (f"config {key}: {NO_TARGET[method]}. For a FLOPs, params or latency target "
          "prune with the prune recipe: configs/prune_resnet.py, "
          "--config.prune.target=latency (or flops, params)")


def range_rule(key: str) -> tuple[str, tuple[Any, str]] | None:
  """The :data:`RANGES` entry of a dotted config key as ``(rule name, rule)``, or None;
  ``model.*`` keys have none (the model's builder checks its own fields)."""
  parts = key.split(".")
  if parts[0] == "model":
    return None
  for n in range(len(parts), 0, -1):  # "dataset.synthetic.num_classes", ..., "num_classes"
    name = ".".join(parts[-n:])
    if name in RANGES:
      return name, RANGES[name]
  for suffix in ("learning_rate", "weight_decay", "momentum"):  # arch_learning_rate, ...
    if parts[-1].endswith("_" + suffix):
      return suffix, RANGES[suffix]
  return None


def validate(config: ml_collections.ConfigDict):
  """Checks the values every recipe shares; raises one :class:`UserError` naming the key.

  Every float must be finite, and every number under a :data:`RANGES` rule in its
  range (learning rates in (0, 100], batch sizes and loop frequencies integers >= 1,
  momentum in [0, 1), kd.alpha in [0, 1], ...). Methods check their own fields on
  top (``methods/<m>.validate``).
  """
  def fail(key, value, want):
    raise UserError(f"config {key}={value!r}: {want}. Fix it with --config.{key}=...")

  for method in NO_TARGET:
    section = config.get(method)
    if hasattr(section, "get") and section.get("target") is not None:
      raise UserError(no_target(f"{method}.target"))
  model = config.get("model") or {}
  dtype = model.get("dtype") if hasattr(model, "get") else None
  if dtype not in (None, *COMPUTE_DTYPES):
    fail("model.dtype", dtype, f"use one of {', '.join(COMPUTE_DTYPES)}")
  runtime = config.get("runtime") or {}
  from jaxprune.engine import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  from jaxprune.models import layers  # pylint: disable=g-import-not-at-top
  if runtime.get("layers", "auto") not in layers.CHOICES:
    fail("runtime.layers", runtime.get("layers"),
         f"use one of {', '.join(layers.CHOICES)}")
  for key in ("xla_cpu_flags", "malloc_tuning"):
    if runtime.get(key, "auto") not in runtime_lib.SWITCHES:
      fail(f"runtime.{key}", runtime.get(key), f"use one of {', '.join(runtime_lib.SWITCHES)}")
  for key, value in flatten(config.to_dict()).items():
    if key.split(".")[-1] == "decay_epochs" and isinstance(value, (tuple, list)):
      if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and
                 math.isfinite(v) and v >= 0 for v in value):
        fail(key, value, "epochs at which the learning rate decays: numbers >= 0")
      continue
    if isinstance(value, bool) or value is None:
      continue
    if isinstance(value, float) and not math.isfinite(value):
      fail(key, value, "must be a finite number")
    if not isinstance(value, (int, float)):
      continue
    rule = range_rule(key)
    if rule is not None and not rule[1][0](value):
      fail(key, value, rule[1][1])


# The workdir's lock and invocation log (engine/workdir.py), under this module's names too.
INVOCATIONS = workdir_lib.INVOCATIONS
start_invocation = workdir_lib.start_invocation
run_wall_time = workdir_lib.run_wall_time
release_workdir = workdir_lib.release_workdir


def has_progress(workdir: str) -> bool:
  """Whether the workdir holds work a new config would mix with: a checkpoint, a stage's
  final variables or a report."""
  if os.path.exists(os.path.join(workdir, "report.json")):
    return True
  try:
    stages = [e for e in os.scandir(workdir) if e.is_dir() and not e.name.startswith(".")]
  except OSError:
    return False
  for stage in stages:
    if os.path.isdir(os.path.join(stage.path, "final")):
      return True
    ckpts = os.path.join(stage.path, "checkpoints")
    if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
      return True
  return False


def _stored_config(workdir: str) -> tuple[dict | None, str | None]:
  """The config a workdir remembers: ``config.json``, else the copy in ``.jaxprune/``;
  or ``(None, what is wrong)``."""
  problems = []
  for name in ("config.json", os.path.join(".jaxprune", "config.json")):
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      problems.append(f"{name} is damaged: {e}")
      continue
    if isinstance(stored, dict):
      return stored, path
    problems.append(f"{name} does not hold a config")
  return None, "; ".join(problems) or None


def check_batches(config: ml_collections.ConfigDict, datasets, sections) -> None:
  """The ``batch_size`` of each training section in ``sections`` fits the training set
  and divides over the devices (``tas``: the search trains on half the set)."""
  from jaxprune.engine import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh()
  train = datasets["train"]
  for section in sections:
    value = config[section].batch_size
    key = f"{section}.batch_size"
    mesh_lib.check_batch_size(value, mesh, f"config {key}")
    n = train.num_examples
    if section == "tas":  # the smaller half of the search's per-class 50/50 split
      n //= 2
      if getattr(train, "labels", None) is not None:
        from jaxprune import data  # pylint: disable=g-import-not-at-top
        halves = data.per_class_split(train.labels, 0.5,
                                      seed=config.tas.get("split_seed", 0))
        n = min(len(h) for h in halves)
    if value > n:
      raise UserError(f"config {key}={value} exceeds the {n} training examples "
                      f"{'of the smaller search half ' if section == 'tas' else ''}of "
                      f"{train.name!r}; lower it with --config.{key}=..."
                      + (" (or use more examples per class: the split is per class)"
                         if section == "tas" else ""))


def check_classes(datasets) -> None:
  """A classifier needs two classes: a training set with fewer (``num_classes=1``, or
  in-memory labels that are all one class) would report accuracy 1.0 for anything."""
  train = datasets["train"]
  if train.num_classes < 2:
    raise UserError(f"The dataset {train.name!r} has {train.num_classes} class; a classifier "
                    "needs at least 2 (set config.dataset.num_classes, or use other data).")
  labels = getattr(train, "labels", None)
  if labels is not None and len(labels):
    present = np.unique(np.asarray(labels))
    if present.size < 2:
      raise UserError(f"Every training label of the dataset {train.name!r} is {present[0]}: "
                      "one class, so any network scores accuracy 1.0; use data with at "
                      "least 2 classes.")


def device_memory_bytes() -> int:
  """The memory of this process's first device: its allocator's limit on an accelerator,
  the machine's physical memory on the CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # not every backend has statistics
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_inference_batches(config: ml_collections.ConfigDict, datasets) -> None:
  """``report.inference_batch_size`` (and ``tas.latency_batch``) are timed as one batch on
  one device: its float32 input alone must fit in the device's memory."""
  image_bytes = 4 * math.prod(datasets["train"].image_shape)
  memory = device_memory_bytes()
  keys = [("report.inference_batch_size", config.report.inference_batch_size)]
  if config.get("method") == "tas" and config.tas.get("latency_batch"):
    keys.append(("tas.latency_batch", config.tas.latency_batch))
  for key, batch in keys:
    need = int(batch) * image_bytes
    if need > memory:
      raise UserError(
          f"config {key}={batch!r}: one batch of {batch} inputs of shape "
          f"{tuple(datasets['train'].image_shape)} is {need / 2**30:.3g} GiB in float32 "
          f"alone, more than the device's {memory / 2**30:.3g} GiB; lower it with "
          f"--config.{key}=... (e.g. 128)")


def check_workdir(workdir: str, config: ml_collections.ConfigDict, datasets=None,
                  sections=("train",)):
  """Locks the workdir, then writes ``<workdir>/config.json`` or checks it on a rerun.

  Call it after everything that can be validated without the workdir has been (a
  failed start must not leave a config behind). A workdir that holds progress
  (:func:`has_progress`) accepts only its stored config up to
  :data:`RESUMABLE_FIELDS`; the config is also kept in ``.jaxprune/config.json``, so a
  deleted ``config.json`` is no way around it. A workdir without progress takes the
  new config. A second run on a locked workdir raises :class:`UserError`. With
  ``datasets``, the data's classes (:func:`check_classes`), the batch sizes of
  ``sections`` (:func:`check_batches`) and the inference batches
  (:func:`check_inference_batches`) are checked first. Taking the lock starts this
  invocation's entry in the workdir's invocation log (:func:`run_wall_time`).
  """
  if datasets is not None:
    check_classes(datasets)
    check_batches(config, datasets, sections)
    check_inference_batches(config, datasets)
  new = json.loads(config.to_json_best_effort())
  holder = None
  if distributed.is_main_process():
    try:
      os.makedirs(workdir_lib.meta_dir(workdir), exist_ok=True)
      holder = workdir_lib.lock(workdir)
    except OSError as e:
      holder = f"!{e.strerror or e}"
  holder_ok = distributed.agreed(holder is None)
  if not holder_ok:
    if holder and holder.startswith("!"):
      raise UserError(f"Cannot write to the workdir {workdir} ({holder[1:]}); use a "
                      "writable --workdir.")
    holder = holder or "process 0 of another job"
    raise UserError(f"The workdir {workdir} is in use by another run ({holder}). Wait for it "
                    "to finish, or use another --workdir.")
  path = os.path.join(workdir, "config.json")
  if has_progress(workdir):
    old, problem = _stored_config(workdir)
    if old is None:
      raise UserError(
          f"The workdir {workdir} holds checkpoints but no readable config "
          f"({problem or 'config.json is missing'}); restore config.json there, or use a "
          "new --workdir.")
    a, b = flatten(old), flatten(new)
    diff = sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and k.split(".")[-1] not in RESUMABLE_FIELDS
                  and not k.startswith("runtime."))
    if diff:
      shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
      raise UserError(
          f"The workdir {workdir} holds a run with a different config ({shown}). "
          "Use a new --workdir, or rerun with the config stored in "
          f"{path} to resume it.")
  distributed.barrier("check_workdir")  # every process has read it before it is rewritten
  if distributed.is_main_process():
    try:
      metrics_lib.write_json(path, new)
      metrics_lib.write_json(os.path.join(workdir_lib.meta_dir(workdir), "config.json"), new)
    except OSError as e:
      raise UserError(f"Cannot write to the workdir {workdir} ({e.strerror or e}); use a "
                      "writable --workdir.") from None
