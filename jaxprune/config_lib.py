"""Shared pieces of the config files in ``configs/``.

A config file's ``get_config(arg)`` starts from :func:`base_config`, parses its
``:key=value,...`` argument with :func:`parse_arg` and overrides a few fields.
:func:`check_workdir` guards a workdir against a run with an incompatible config.
"""
import json
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from jaxprune.engine import distributed
from jaxprune.errors import UserError

# Fields (in any section) that may change between the runs of one workdir: they
# change how often a run logs or saves, never what it computes.
RESUMABLE_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                    "eval_every_epochs", "inference_batch_size")


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
      "augment": "auto",
      "synthetic": {"num_train": 2048, "num_test": 512, "image_shape": (32, 32, 3),
                    "num_classes": 10, "seed": 0},
  })
  if name == "cifar10_subset":
    cfg.name, cfg.path = "npz", CIFAR10_SUBSET_NPZ
  return cfg


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
  return config


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_workdir(workdir: str, config: ml_collections.ConfigDict):
  """Writes ``<workdir>/config.json``, or checks it against ``config`` on a rerun.

  A rerun may change only :data:`RESUMABLE_FIELDS`; anything else would mix two
  different runs in one directory, so it raises :class:`UserError`.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    a, b = _flatten(old), _flatten(new)
    diff = sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and k.split(".")[-1] not in RESUMABLE_FIELDS)
    if diff:
      shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
      raise UserError(
          f"The workdir {workdir} holds a run with a different config ({shown}). "
          "Use a new --workdir, or rerun with the config stored in "
          f"{path} to resume it.")
  distributed.barrier("check_workdir")  # every process has read it before it is rewritten
  if distributed.is_main_process():
    with open(path, "w", encoding="utf-8") as f:
      json.dump(new, f, indent=2)
