"""Gumbel-softmax sampling for TAS width and depth search (docs/methods/tas.md §2).

The caller passes the key and ``tau``; no architecture state lives here.
"""
from typing import Tuple

import jax
import jax.numpy as jnp

__all__ = ["gumbel_softmax", "gumbel_select"]


def _float_logits(logits: jax.Array) -> jax.Array:
  """Returns ``logits`` as a float array of at least float32 precision."""
  logits = jnp.asarray(logits)
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _perturbed_logits(key: jax.Array, logits: jax.Array, tau) -> jax.Array:
  """Returns ``(log_softmax(logits) + g) / tau`` with g ~ Gumbel(0, 1), same shape."""
  logits = _float_logits(logits)
  g = jax.random.gumbel(key, logits.shape, logits.dtype)
  # Eq. 3 of the paper: Gumbel perturbation of the log-probabilities, scaled by tau.
  return (jax.nn.log_softmax(logits, axis=-1) + g) / tau


def gumbel_softmax(key: jax.Array, logits: jax.Array, tau) -> jax.Array:
  """Draws a Gumbel-softmax probability vector over the last axis.

  ``p_hat = softmax((log_softmax(logits) + g) / tau)`` with fresh
  g ~ Gumbel(0, 1) per entry. Differentiable with respect to ``logits``; the
  noise is a constant for the gradient. TAS uses the full vector for the depth
  of a stage.

  Args:
    key: a PRNG key (``jax.random.key``).
    logits: ``[..., n]`` unnormalised log-probabilities (alpha or beta).
    tau: positive temperature (Python float or traced scalar). Large ``tau``
      gives a near-uniform vector, ``tau -> 0`` a one-hot sample whose argmax is
      distributed as ``softmax(logits)``.

  Returns:
    ``[..., n]`` probabilities (float32 or wider), summing to 1 over the last
    axis.

  Example:
    >>> p = gumbel_softmax(jax.random.key(0), jnp.zeros(3), tau=1.0)
  """
  return jax.nn.softmax(_perturbed_logits(key, logits, tau), axis=-1)


def gumbel_select(key: jax.Array, logits: jax.Array, tau, k: int = 2
                  ) -> Tuple[jax.Array, jax.Array]:
  """Samples ``k`` distinct candidates and their mixing weights (TAS widths).

  Reference §2: ``perturbed = (log_softmax(logits) + g1) / tau`` and
  ``p_hat = softmax(perturbed)``; then ``k`` distinct indices are drawn from
  ``p_hat`` *without replacement* (a random draw, not a deterministic top-k),
  using the Gumbel-top-k trick on ``log p_hat`` with a second, fresh noise
  g2 (the selection is under ``stop_gradient``). The weights are the softmax
  of ``perturbed`` at the picked entries, renormalised over the ``k`` picks;
  gradients reach ``logits`` through these weights only.

  ``k`` must be static. With ``k=1`` the weight is the constant 1 and
  ``logits`` get exactly zero gradient: the TAS rebuttal reports that the
  search then fails, so keep ``k >= 2`` (the default).

  Args:
    key: a PRNG key; split internally into the two independent noises.
    logits: ``[..., n]`` width logits alpha (a leading batch of layers is
      fine), ``n >= k``.
    tau: positive temperature (Python float or traced scalar).
    k: number of candidates to pick, a static Python int, ``1 <= k <= n``.

  Returns:
    ``(indices, weights)``: ``indices`` ``[..., k]`` int32, distinct along the
    last axis, in draw order (the first is the first draw); ``weights``
    ``[..., k]`` float, positive, summing to 1 along the last axis.

  Example:
    >>> idx, w = gumbel_select(jax.random.key(0), alpha, tau=5.0)  # alpha: [8]
    >>> out = w[0] * branch(widths[idx[0]]) + w[1] * branch(widths[idx[1]])
  """
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"gumbel_select: k must be a static int >= 1, got {k!r}")
  n = jnp.shape(logits)[-1]
  if k > n:
    raise ValueError(f"gumbel_select: k={k} exceeds the number of candidates n={n}")
  key_softmax, key_draw = jax.random.split(key)
  perturbed = _perturbed_logits(key_softmax, logits, tau)
  # Gumbel-top-k on log p_hat == k sequential draws from p_hat without replacement.
  log_p_hat = jax.nn.log_softmax(jax.lax.stop_gradient(perturbed), axis=-1)
  g2 = jax.random.gumbel(key_draw, perturbed.shape, perturbed.dtype)
  _, indices = jax.lax.top_k(log_p_hat + g2, k)
  picked = jnp.take_along_axis(perturbed, indices, axis=-1)
  # softmax(perturbed) restricted to the picks and renormalised == softmax of the picks.
  weights = jax.nn.softmax(picked, axis=-1)
  return indices.astype(jnp.int32), weights
