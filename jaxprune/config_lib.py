"""Shared pieces of the config files in ``configs/``.

A config file's ``get_config(arg)`` starts from :func:`base_config`, parses its
``:key=value,...`` argument with :func:`parse_arg` and overrides a few fields.
:func:`validate` checks the values every recipe shares (before any work);
:func:`check_workdir` locks the workdir and guards it against a run with an
incompatible config.
"""
import datetime
import fcntl
import json
import math
import os
import socket
import sys
from typing import Any

import ml_collections
from ml_collections import config_dict

from jaxprune.engine import distributed
from jaxprune.engine import metrics as metrics_lib
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
  config.report = ml_collections.ConfigDict({"inference_batch_size": 128})
  # How the program runs on this backend, not what it computes (float rounding aside):
  # the layer implementation and the XLA:CPU flag and allocator settings, each chosen
  # from the backend under "auto" (jaxprune.engine.runtime, jaxprune.models.layers).
  config.runtime = ml_collections.ConfigDict(
      {"layers": "auto", "xla_cpu_flags": "auto", "malloc_tuning": "auto"})
  return config


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# Compute dtypes of ``model.dtype`` (every jaxprune model takes one; a user's model
# through its factory's ``dtype`` argument or its module's ``dtype`` field).
COMPUTE_DTYPES = ("float32", "bfloat16")

# Sections whose training may be skipped with epochs=0 (AutoPrune's optional pretraining).
OPTIONAL_STAGES = ("pretrain",)


def validate(config: ml_collections.ConfigDict):
  """Checks the values every recipe shares; raises one :class:`UserError` naming the key.

  Every float must be finite; learning rates in (0, 100]; epochs >= 1 (0 for
  :data:`OPTIONAL_STAGES`); batch sizes and loop frequencies >= 1; momentum in [0, 1);
  weight decay >= 0. Methods check their own fields on top (``methods/<m>.validate``).
  """
  def fail(key, value, want):
    raise UserError(f"config {key}={value!r}: {want}. Fix it with --config.{key}=...")

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
  for key, value in _flatten(config.to_dict()).items():
    name, section = key.split(".")[-1], key.split(".")[0]
    if isinstance(value, bool) or value is None:
      continue
    if isinstance(value, float) and not math.isfinite(value):
      fail(key, value, "must be a finite number")
    if not isinstance(value, (int, float)):
      continue
    if name == "learning_rate" or name.endswith("_learning_rate"):
      if not 0 < value <= 100:
        fail(key, value, "a learning rate must be in (0, 100]")
    elif name == "epochs":
      if value < (0 if section in OPTIONAL_STAGES else 1):
        fail(key, value, "must be at least 1" + (" (0 skips the stage)"
                                                 if section in OPTIONAL_STAGES else ""))
    elif name in ("batch_size", "eval_batch_size", "log_every_steps",
                  "checkpoint_every_steps", "keep_checkpoints", "eval_every_epochs",
                  "inference_batch_size"):
      if value < 1 or value != int(value):
        fail(key, value, "must be an integer >= 1")
    elif name in ("warmup_epochs", "max_steps", "weight_decay"):
      if value < 0:
        fail(key, value, "must be >= 0")
    elif name == "momentum":
      if not 0 <= value < 1:
        fail(key, value, "momentum must be in [0, 1)")


# The lock file of each workdir this process holds (see check_workdir).
_LOCKS: dict[str, Any] = {}


def _meta_dir(workdir: str) -> str:
  return os.path.join(workdir, ".jaxprune")


def _lock(workdir: str) -> str | None:
  """Takes ``<workdir>/.jaxprune/lock`` (process 0 only); the holder's line, or None."""
  key = os.path.realpath(workdir)
  if key in _LOCKS:
    return None
  path = os.path.join(_meta_dir(workdir), "lock")
  f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    return holder
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(sys.argv)}\n")
  f.flush()
  _LOCKS[key] = f
  return None


def release_workdir(workdir: str):
  """Releases the lock :func:`check_workdir` took (process exit releases it too)."""
  f = _LOCKS.pop(os.path.realpath(workdir), None)
  if f is not None:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


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


def check_workdir(workdir: str, config: ml_collections.ConfigDict, datasets=None,
                  sections=("train",)):
  """Locks the workdir, then writes ``<workdir>/config.json`` or checks it on a rerun.

  Call it after everything that can be validated without the workdir has been (a
  failed start must not leave a config behind). A workdir that holds progress
  (:func:`has_progress`) accepts only its stored config up to
  :data:`RESUMABLE_FIELDS`; the config is also kept in ``.jaxprune/config.json``, so a
  deleted ``config.json`` is no way around it. A workdir without progress takes the
  new config. A second run on a locked workdir raises :class:`UserError`. With
  ``datasets``, the batch sizes of ``sections`` are checked first (:func:`check_batches`).
  """
  if datasets is not None:
    check_batches(config, datasets, sections)
  new = json.loads(config.to_json_best_effort())
  holder = None
  if distributed.is_main_process():
    try:
      os.makedirs(_meta_dir(workdir), exist_ok=True)
      holder = _lock(workdir)
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
    a, b = _flatten(old), _flatten(new)
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
      metrics_lib.write_json(os.path.join(_meta_dir(workdir), "config.json"), new)
    except OSError as e:
      raise UserError(f"Cannot write to the workdir {workdir} ({e.strerror or e}); use a "
                      "writable --workdir.") from None
