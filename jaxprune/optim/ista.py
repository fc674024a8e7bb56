"""ISTA on batch-norm scales as an optax transform (Ye et al., ICLR 2018).

The method minimises ``L(theta) + l1 * sum_l rho_l * ||gamma_l||_1`` over the
batch-norm scales ``gamma_l`` of the prunable layers with a proximal gradient
step (reference ista.md §1): a plain gradient step on every variable, then on
gamma only ``gamma <- sign(gamma) * max(|gamma| - lr_t * l1 * rho_l, 0)``. The
prox produces exact zeros, which an L1 subgradient (Network Slimming and the
PyTorch pruning libraries) never does; channels with a zero gamma output a
constant and :mod:`jaxprune.surgery` removes them.

:func:`ista` is the prox alone, written to sit *last* in an ``optax.chain``: it
turns the update the chain has produced into the proximal one. The per-layer
penalties ``rho_l`` come from the network's structure
(:func:`jaxprune.surgery.ista_rho`, reference §2), not from a table.

This module holds no model knowledge: which leaves it touches is a selector
(:func:`jaxprune.optim.select`) or the keys of a ``rho`` mapping.
"""
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from jaxprune.kernels.prox import soft_threshold
from jaxprune.optim.selection import leaf_path, select

# Batch-norm (and layer-norm) scales under Flax's naming.
DEFAULT_MASK = r"(^|/)scale$"

Rho = Union[float, Mapping[str, Any], Callable[[str, Any], Any]]


class IstaState(NamedTuple):
  """Steps taken so far: the schedules' argument (as in ``optax.sgd``)."""
  count: jax.Array


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


def _mask_fn(mask, rho) -> Callable[[Any], Any]:
  """``params -> boolean tree``; leaves may be Python bools or arrays."""
  if mask is None:
    if isinstance(rho, Mapping):
      return lambda params: select(params, lambda path, _: path in rho)
    return lambda params: select(params, DEFAULT_MASK)
  if isinstance(mask, str):
    return lambda params: select(params, mask)
  if callable(mask):
    # A predicate (path, leaf) -> bool, the selection helper's convention.
    return lambda params: select(params, mask)
  return lambda params: mask


def ista(learning_rate: optax.ScalarOrSchedule, l1: optax.ScalarOrSchedule,
         rho: Rho = 1.0, mask: Any = None) -> optax.GradientTransformation:
  """The ISTA proximal step on the selected leaves (reference ista.md §1).

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

  Args:
    learning_rate: float or schedule (``count -> lr``).
    l1: the penalty lambda, float or schedule (the reference stages it:
      0.001, then 0.005, then 0 for fine-tuning).
    rho: per-leaf penalty multiplier rho_l: a float for every leaf; a flat mapping
      ``{leaf path: float or array}`` (e.g. :func:`jaxprune.surgery.ista_rho`;
      arrays broadcast over the leaf, e.g. per channel); or ``fn(path, leaf)``.
    mask: which leaves get the prox: a path regex or ``fn(path, leaf) -> bool``
      (see :func:`jaxprune.optim.select`), or a boolean tree shaped like params.
      Default: the keys of ``rho`` when it is a mapping, else every leaf named
      ``scale`` (batch-norm gammas).

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
    >>> tx = optax.chain(optax.sgd(0.1), optim.ista(0.1, 0.005, mask=r"bn\\d/scale$"))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> optimizer.update(model, grads)
  """
  rho_fn = _rho_fn(rho)
  mask_fn = _mask_fn(mask, rho)

  def init_fn(params):
    del params
    return IstaState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("ista needs the current parameters: call "
                       "tx.update(updates, state, params).")
    lr = _value(learning_rate, state.count)
    lam = _value(l1, state.count)
    selected = mask_fn(params)

    def leaf(path, u, p, m):
      if m is False:
        return u
      r = jnp.asarray(rho_fn(leaf_path(path), p), jnp.float32)
      threshold = (jnp.asarray(lr, jnp.float32) * jnp.asarray(lam, jnp.float32) * r)
      # §1: the prox acts on the point the gradient step reached.
      target = p + u
      new = soft_threshold(target, threshold.astype(target.dtype)) - p
      return new if m is True else jnp.where(m, new, u)

    updates = jax.tree_util.tree_map_with_path(leaf, updates, params, selected)
    return updates, IstaState(count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def zero_fraction(params: Any, mask: Any = DEFAULT_MASK) -> jax.Array:
  """Fraction of exactly-zero entries over the selected leaves (0 if none)."""
  selected = select(params, mask) if isinstance(mask, str) or callable(mask) else mask
  leaves = [x for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(selected)) if m]
  if not leaves:
    return jnp.zeros([])
  zeros = sum(jnp.sum(x == 0) for x in leaves)
  return zeros / sum(x.size for x in leaves)
