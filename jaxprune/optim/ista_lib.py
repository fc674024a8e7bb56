"""ISTA on batch-norm scales as an optax transform: the L1 prox, last in a chain.

docs/methods/ista.md §1. Knows no model: the leaves it touches are a selector or ``rho``'s keys.
"""
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from jaxprune.kernels.prox import soft_threshold
from jaxprune.optim import selection
from jaxprune.optim.selection import Selector, select

# Every leaf named ``scale``: batch-norm (and other norm) scales under Flax's naming.
DEFAULT_MASK = r"(^|/)scale$"

# Layer names (the path component before ``scale``) that say the scale belongs to a
# normalisation over the channels (LayerNorm, RMSNorm, GroupNorm): removing one
# channel changes the statistics of the others, so the channel cannot be removed.
NOT_BATCHNORM_LAYER = (r"(?i)(layer_?norm|rms_?norm|group_?norm|"
                       r"^(ln|gn)(_?\d+)?$|^(ln|gn)_|_(ln|gn)(_?\d+)?$)")

Rho = Union[float, Mapping[str, Any], Callable[[str, Any], Any]]


class IstaState(NamedTuple):
  """State of :func:`ista`.

  Attributes:
    count: steps taken so far: the schedules' argument (as in ``optax.sgd``).
    active: a tree shaped like params of scalar booleans: True where the prox acts
      (the mask's leaves, less, under the default mask, the scales that were all
      zero at ``init``).
  """
  count: jax.Array
  active: Any = None


def _value(hyper, count):
  return hyper(count) if callable(hyper) else hyper


def _rho_fn(rho: Rho) -> Callable[[str, Any], Any]:
  if rho is None:
    return lambda path, leaf: 1.0
  if isinstance(rho, Mapping):
    nested = [k for k, v in rho.items() if isinstance(v, Mapping)]
    if nested:
      raise ValueError(
          "ista(rho=...) takes a flat mapping {leaf path: penalty} (e.g. from "
          f"jaxprune.surgery.ista_rho), not a params-shaped tree; {nested[0]!r} holds "
          "a mapping.")

    def lookup(path, leaf):
      del leaf
      if path not in rho:
        raise ValueError(f"ista(rho=...) has no penalty for the selected leaf {path!r}; "
                         f"it has {sorted(rho)[:4]}... Select fewer leaves with mask=, "
                         "or add the leaf to rho.")
      return rho[path]
    return lookup
  if callable(rho):
    return rho
  return lambda path, leaf: rho


def is_default_scale(path: str, leaf: Any = None) -> bool:
  """The default mask's path rule: a ``scale`` not of a LayerNorm/RMSNorm/GroupNorm.

  The layer name is the path component before ``scale`` (Linen ``LayerNorm_0``,
  NNX attribute names such as ``ln1``, ``layer_norm``, ``norm_rms``).
  """
  del leaf
  parts = path.split("/")
  if parts[-1] != "scale":
    return False
  layer = parts[-2] if len(parts) > 1 else ""
  return re.search(NOT_BATCHNORM_LAYER, layer) is None


def _mask_fn(mask, rho) -> tuple[Callable[[Any], Any], bool]:
  """``(params -> boolean tree, is the default)``; leaves may be bools or arrays."""
  if mask is None:
    if isinstance(rho, Mapping):
      return (lambda params: select(params, lambda path, _: path in rho)), False
    return (lambda params: select(params, is_default_scale)), True
  return (lambda params: selection.as_mask(params, mask)), False


def batchnorm_scales(variables: Any) -> list[str]:
  """Paths of the scales whose layer keeps running statistics (batch-norm gammas).

  Exact where the default mask's name rule is a guess: a scale is a batch-norm
  gamma iff its layer also has a ``mean`` and a ``var`` (Linen ``batch_stats``,
  NNX ``nnx.BatchStat``). Pass the result as ``ista(mask=...)``.

  Args:
    variables: all of a Linen model's variables (``{"params": ..., "batch_stats":
      ...}``), an ``nnx.Module`` or its whole ``nnx.state(model)``.

  Returns:
    Sorted leaf paths relative to the params (``bn1/scale``), as the transform
    sees them.

  Example:
    >>> tx = optim.ista(0.1, 0.005, mask=optim.batchnorm_scales(variables))  # Linen
    >>> tx = optim.ista(0.1, 0.005, mask=optim.batchnorm_scales(model))      # NNX
  """
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    if isinstance(variables, nnx.Module):
      variables = nnx.state(variables)
  except ImportError:  # pragma: no cover
    pass
  names = selection.paths(variables)
  if isinstance(variables, Mapping) and "params" in variables:
    # Linen: drop the collection, the transform sees variables["params"].
    names = [n.split("/", 1)[1] for n in names if "/" in n]
  found = set(names)
  out = sorted(n for n in names if n.endswith("scale")
               and n[:-len("scale")] + "mean" in found and n[:-len("scale")] + "var" in found)
  if not out:
    raise ValueError("No scale with running statistics (mean, var) in these variables: "
                     "pass all collections (Linen: params and batch_stats; NNX: the "
                     "module or nnx.state(model)).")
  return out


def ista(learning_rate: optax.ScalarOrSchedule, l1: optax.ScalarOrSchedule,
         rho: Rho = 1.0, mask: Any = None) -> optax.GradientTransformation:
  """The ISTA proximal step on the selected leaves (docs/methods/ista.md §1).

  Put it last in a chain, after the transform that makes the gradient step.
  For each selected leaf ``p`` with incoming update ``u`` (the step the chain
  computed, e.g. ``-lr_t * g``) it returns the update that lands on
  ``soft_threshold(p + u, lr_t * l1_t * rho_p)``; other leaves pass through
  untouched. With ``optax.sgd(lr)`` before it this is the official
  algorithm (SGD without momentum). After a momentum transform the prox acts
  on the momentum step, which the original does not do (a deviation; it still
  produces exact zeros).

  ``learning_rate`` must be the same value or schedule the gradient step uses;
  both see the same step count when the chain is updated once per step.

  Which leaves (the rule):
    1. ``mask`` given: exactly its leaves.
    2. else ``rho`` a mapping: exactly its keys (e.g. :func:`jaxprune.surgery.ista_rho`,
       which knows the network's structure and leaves out the scales whose channel
       cannot be removed, such as those feeding a residual add).
    3. else the default: every leaf named ``scale``, except (a) scales of a layer
       whose name says LayerNorm / RMSNorm / GroupNorm (:data:`NOT_BATCHNORM_LAYER`:
       their channels share statistics and cannot be removed) and (b) scales that
       are all exactly zero at ``init`` (zero-initialised residual gammas: the prox
       would keep them at zero for ever). The default cannot see the wiring, so it
       still catches a BN scale in front of a residual add; pass ``mask`` or
       ``rho`` for those networks. :func:`batchnorm_scales` gives the exact
       batch-norm gammas from the variables.

  A selection that picks no leaf is an error that lists the paths.

  Args:
    learning_rate: float or schedule (``count -> lr``).
    l1: the penalty lambda, float or schedule (the reference stages it:
      0.001, then 0.005, then 0 for fine-tuning).
    rho: per-leaf penalty multiplier rho_l: a float for every leaf; a flat mapping
      ``{leaf path: float or array}`` (e.g. :func:`jaxprune.surgery.ista_rho`;
      arrays broadcast over the leaf, e.g. per channel); or ``fn(path, leaf)``.
    mask: which leaves get the prox: a path regex, ``fn(path, leaf) -> bool``, a
      collection of leaf paths (see :func:`jaxprune.optim.select`), or a boolean
      tree with the params' leaf paths. Default: see the rule above.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`IstaState`. Its
    ``update`` needs ``params`` and raises ``ValueError`` without them.

  Example (a Linen model; weight decay on kernels as in the reference):
    >>> rho = surgery.ista_rho(model, variables, (32, 32, 3))
    >>> tx = optax.chain(
    ...     optax.add_decayed_weights(5e-4, mask=lambda p: optim.select(p, "kernel$")),
    ...     optax.sgd(0.1),
    ...     optim.ista(0.1, l1=0.005, rho=rho))

  Example (an NNX model; paths are the attribute names, e.g. ``bn1/scale``):
    >>> tx = optax.chain(optax.sgd(0.1),
    ...                  optim.ista(0.1, 0.005, mask=optim.batchnorm_scales(model)))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> optimizer.update(model, grads)
  """
  rho_fn = _rho_fn(rho)
  mask_fn, is_default = _mask_fn(mask, rho)

  def init_fn(params):
    selected = dict(selection.named_leaves(mask_fn(params)))

    def active(path, p):
      m = selected[path]
      if isinstance(m, bool):
        if m and is_default:
          return jnp.any(p != 0)  # rule 3(b): a scale that is zero at init stays out
        return jnp.asarray(m)
      return jnp.any(m)  # a per-entry mask: the entries decide in update
    return IstaState(count=jnp.zeros([], jnp.int32),
                     active=selection.map_with_path(active, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("ista needs the current parameters: call "
                       "tx.update(updates, state, params).")
    lr = _value(learning_rate, state.count)
    lam = _value(l1, state.count)
    p_by_path = dict(selection.named_leaves(params))
    selected = dict(selection.named_leaves(mask_fn(params)))
    active = (dict(selection.named_leaves(state.active)) if state.active is not None
              else {})

    def leaf(path, u):
      m = selected.get(path, False)
      if m is False:
        return u
      p = p_by_path[path]
      r = jnp.asarray(rho_fn(path, p), jnp.float32)
      selection.check_broadcast(path, jnp.shape(r), jnp.shape(p), "rho")
      threshold = (jnp.asarray(lr, jnp.float32) * jnp.asarray(lam, jnp.float32) * r)
      # §1: the prox acts on the point the gradient step reached.
      target = p + u
      new = soft_threshold(target, threshold.astype(target.dtype)) - p
      if m is not True:
        new = jnp.where(m, new, u)
      if path in active:
        new = jnp.where(active[path], new, u)
      return new

    updates = selection.map_with_path(leaf, updates)
    return updates, IstaState(count=optax.safe_int32_increment(state.count),
                              active=state.active)

  return optax.GradientTransformation(init_fn, update_fn)


def zero_fraction(params: Any, mask: Selector = DEFAULT_MASK) -> jax.Array:
  """Fraction of exactly-zero entries over the selected leaves.

  Works on Linen params, ``nnx.state(model, nnx.Param)`` (the arrays inside the
  ``Variable``\\ s are counted), ``nnx.as_pure`` / ``nnx.to_pure_dict`` trees.

  Args:
    params: a params tree.
    mask: a selector (default every ``scale``) or a boolean tree (see
      :func:`jaxprune.optim.select`).

  Raises:
    ValueError: if the mask selects no leaf.

  Example:
    >>> optim.zero_fraction(variables["params"])          # Linen
    >>> optim.zero_fraction(nnx.state(model, nnx.Param))  # NNX: the same number
  """
  selected = dict(selection.named_leaves(selection.as_mask(params, mask)))
  leaves = [(x, selected[p]) for p, x in selection.named_leaves(params)
            if selected[p] is not False]
  zeros = sum(jnp.sum((jnp.asarray(x) == 0) & jnp.asarray(m)) for x, m in leaves)
  total = sum(jnp.sum(jnp.broadcast_to(jnp.asarray(m), jnp.shape(x))) for x, m in leaves)
  return zeros / total


__all__ = ["DEFAULT_MASK", "IstaState", "NOT_BATCHNORM_LAYER", "batchnorm_scales",
           "is_default_scale", "ista", "zero_fraction"]
