"""A user's own Flax model in the recipes (``--config.model.name=<module>:<factory>``):
imported, wrapped into the Linen ``apply(variables, x, train=...)`` form, checked."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from jaxprune.errors import UserError
from jaxprune.graph.adapters import (BindAxis, WithTrain, axis_names, draw_of, from_nnx, mode_flag,
                                     unbound_axis_names)


def is_external(name: str) -> bool:
  """Whether a ``model.name`` names a user factory (``module.path:factory``)."""
  return ":" in name


def load_factory(spec: str) -> Callable:
  """The callable named by ``"package.module:factory"`` (imported from ``PYTHONPATH``)."""
  module_name, _, attr = spec.partition(":")
  if not module_name or not attr:
    raise UserError(f"config model.name={spec!r}: a user model is named "
                    "'<module path>:<factory>', e.g. 'my_models:make_cnn'.")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UserError(f"config model.name={spec!r}: cannot import module {module_name!r} "
                    f"({e}); is its folder on PYTHONPATH?") from None
  except Exception as e:  # the user's module failed while importing
    raise UserError(f"config model.name={spec!r}: importing {module_name!r} failed: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    ) from None
  factory = module
  for part in attr.split("."):
    if not hasattr(factory, part):
      raise UserError(f"config model.name={spec!r}: module {module_name!r} has no "
                      f"attribute {attr!r}.")
    factory = getattr(factory, part)
  if not callable(factory):
    raise UserError(f"config model.name={spec!r}: {attr!r} is a "
                    f"{type(factory).__name__}, not a factory.")
  return factory


def parse_kwargs(text: str | Mapping | None) -> dict[str, Any]:
  """``model.kwargs``: a Python dict literal, e.g. ``"{'features': (32, 64)}"``."""
  if not text:
    return {}
  if isinstance(text, Mapping):
    return dict(text)
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise UserError(f"config model.kwargs={text!r} is not a Python dict literal, e.g. "
                    "\"{'features': 64}\".") from None
  if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
    raise UserError(f"config model.kwargs={text!r} must be a dict with string keys.")
  return value


def _check_fits(model: nn.Module, spec: str, num_classes: int, input_shape) -> None:
  x = jnp.zeros((1, *input_shape), jnp.float32)
  try:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  except UserError:
    raise
  except Exception as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(f"model {spec!r} does not run on the dataset's input shape "
                    f"{tuple(input_shape)} (a batch of {x.shape}): {type(e).__name__}: "
                    f"{first}") from None
  shape = getattr(out, "shape", None)
  if shape != (1, num_classes):
    raise UserError(f"model {spec!r} returns {shape if shape is not None else type(out).__name__}"
                    f" for a batch of 1; the dataset needs logits of shape "
                    f"(batch, {num_classes}).")
  # A batch of 3 with the batch-1 variables: a model that mixes or flattens the batch
  # (x.reshape(1, -1), a mean over axis 0) passes at batch 1 only.
  x3 = jnp.zeros((3, *input_shape), jnp.float32)
  try:
    shape = getattr(jax.eval_shape(lambda v: model.apply(v, x3, train=False), variables),
                    "shape", None)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    shape = f"{type(e).__name__}: {first}"
  if shape != (3, num_classes):
    raise UserError(f"model {spec!r} runs on a batch of 1 but gives {shape} for a batch of "
                    f"3 (want (3, {num_classes})): it mixes the examples of a batch; keep "
                    "the batch axis, e.g. x.reshape(x.shape[0], -1).")


def compute_dtypes(jaxpr) -> set:
  """Operand dtypes of every conv and matmul in ``jaxpr`` (nested jaxprs included)."""
  from jaxprune.graph import interpret  # pylint: disable=g-import-not-at-top
  out = set()
  for eqn, _ in interpret.all_eqns(jaxpr):
    if eqn.primitive.name in interpret.LAYERS:
      out.update(jnp.dtype(v.aval.dtype) for v in eqn.invars)
  return out


def _check_dtype(model: nn.Module, spec: str, dtype, input_shape) -> None:
  x = jnp.zeros((1, *input_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)
  if jnp.dtype(dtype) not in compute_dtypes(jaxpr.jaxpr):
    raise UserError(f"config model.dtype={jnp.dtype(dtype).name!r}: model {spec!r} was given "
                    f"dtype={jnp.dtype(dtype).name} but runs no conv or matmul in it; pass "
                    "its dtype on to its layers (nn.Conv(..., dtype=dtype)).")


def build(spec: str, kwargs: Mapping[str, Any] | str | None, num_classes: int,
          input_shape, dtype=None) -> nn.Module:
  """The user's model as a Linen module with ``train`` (see the module docstring).

  Args:
    spec: ``"<module path>:<factory>"``.
    kwargs: the factory's arguments (a dict or a dict literal string).
      ``num_classes`` is added when the factory takes it and it is not given; an NNX
      factory that takes ``rngs`` gets ``nnx.Rngs(0)`` (and a fresh draw at ``init``).
    num_classes: the dataset's classes (the model must return that many logits).
    input_shape: one example's shape, e.g. (28, 28, 1).
    dtype: a compute dtype other than float32 (e.g. ``jnp.bfloat16``): passed as the
      factory's ``dtype`` argument, or set as the returned Linen module's ``dtype``
      field; a model with neither, or one that then computes no conv or matmul in it,
      is a :class:`UserError`.

  Returns:
    A Linen module, ``model.apply(variables, x, train=...)``.
  """
  factory = load_factory(spec)
  kwargs = parse_kwargs(kwargs)
  try:
    parameters = inspect.signature(factory).parameters
  except (TypeError, ValueError):
    parameters = {}
  if "num_classes" in parameters and "num_classes" not in kwargs:
    kwargs["num_classes"] = num_classes
  takes_rngs = "rngs" in parameters and "rngs" not in kwargs
  if dtype is not None and jnp.dtype(dtype) == jnp.float32:
    dtype = None
  if dtype is not None and "dtype" in kwargs:
    raise UserError(f"model {spec!r}: set the compute dtype once, with config model.dtype, "
                    "not also in model.kwargs.")
  dtype_arg = dtype is not None and "dtype" in parameters
  if dtype_arg:
    kwargs["dtype"] = jnp.dtype(dtype)

  def make(key=None):
    extra = {"rngs": nnx.Rngs(key if key is not None else 0)} if takes_rngs else {}
    return factory(**kwargs, **extra)

  try:
    made = make()
  except UserError:
    raise
  except Exception as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(f"model {spec!r}: calling the factory with {kwargs} failed: "
                    f"{type(e).__name__}: {first}") from None
  if isinstance(made, nnx.Module):
    if dtype is not None and not dtype_arg:
      raise UserError(f"config model.dtype={jnp.dtype(dtype).name!r}: NNX model {spec!r} has "
                      "no compute dtype to set (its factory takes no `dtype` argument); add "
                      "one and pass it to its layers (nnx.Conv(..., dtype=dtype)), or drop "
                      "--config.model.dtype.")
    if len(unbound_axis_names(made)) > 1:
      raise UserError(f"model {spec!r} uses collectives over the axis names "
                      f"{unbound_axis_names(made)}; one axis name (the batch's, as in "
                      "BatchNorm(axis_name='batch')) is supported.")
    model, _ = from_nnx(made, draw_of(make) if takes_rngs else None)
  elif isinstance(made, nn.Module):
    if dtype is not None and not dtype_arg:
      if "dtype" not in {f.name for f in dataclasses.fields(made)}:
        raise UserError(f"config model.dtype={jnp.dtype(dtype).name!r}: model {spec!r} has no "
                        "compute dtype to set (its factory takes no `dtype` argument and "
                        f"{type(made).__name__} has no `dtype` field); add one, as Flax's "
                        "layers do, or drop --config.model.dtype.")
      made = made.clone(dtype=jnp.dtype(dtype))
    flag = mode_flag(made)
    model = made if flag == "train" else WithTrain(made, flag)
  else:
    raise UserError(f"model {spec!r}: the factory returned a {type(made).__name__}, not "
                    "a Flax Linen module or an nnx.Module.")
  names = axis_names(model, input_shape) if isinstance(model, nn.Module) else ()
  if names:
    model = BindAxis(model, names[0])
    more = axis_names(model, input_shape)
    if more:
      raise UserError(f"model {spec!r} uses collectives over the axis names "
                      f"{names + more}; one axis name (the batch's, as in "
                      "BatchNorm(axis_name='batch')) is supported.")
  _check_fits(model, spec, num_classes, input_shape)
  if dtype is not None:
    _check_dtype(model, spec, dtype, input_shape)
  return model


__all__ = ["is_external", "load_factory", "parse_kwargs", "build", "compute_dtypes"]
