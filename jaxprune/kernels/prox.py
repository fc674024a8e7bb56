"""Proximal operators: the L1 prox that gives ISTA its exact zeros (docs/methods/ista.md §1).
"""
import jax
import jax.numpy as jnp


def soft_threshold(x: jax.Array, threshold) -> jax.Array:
  """``sign(x) * max(|x| - threshold, 0)``: the prox of ``threshold * ||x||_1``.

  Args:
    x: any shape.
    threshold: a non-negative scalar or an array broadcastable to ``x`` (e.g.
      one threshold per channel).

  Returns:
    An array shaped like ``x`` (dtype of ``x``): entries with
    ``|x| <= threshold`` are exactly 0, the others move ``threshold`` towards 0.

  Example:
    >>> soft_threshold(jnp.array([-1.0, 0.05, 0.3]), 0.1)
    Array([-0.9,  0. ,  0.2], dtype=float32)
  """
  x = jnp.asarray(x)
  threshold = jnp.asarray(threshold, x.dtype)
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0).astype(x.dtype)
