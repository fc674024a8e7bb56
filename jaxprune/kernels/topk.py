"""DNW's edge selection: top-k |w| forward, every edge trained (docs/methods/dnw.md §1).

An O(numel) radix select, exactly k kept, ties to the lowest flat index (docs/design/kernels.md).
"""
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

_MAGNITUDE_BITS = 31  # |w| clears the sign bit: the bits of |w| lie in [0, 2**31).


def kept_count(numel: int, prune_rate: float) -> int:
  """Edges kept out of ``numel`` at ``prune_rate``: ``numel - int(prune_rate * numel)``."""
  if not 0.0 <= prune_rate <= 1.0:
    raise ValueError(f"prune_rate must lie in [0, 1], got {prune_rate}.")
  return int(numel) - int(prune_rate * numel)


def _magnitude_bits(w, valid):
  bits = lax.bitcast_convert_type(jnp.abs(w.astype(jnp.float32)), jnp.int32)
  if valid is not None:
    bits = jnp.where(valid, bits, -1)  # never selected: below every magnitude
  return bits


def topk_mask(w: jax.Array, k, valid: jax.Array | None = None) -> jax.Array:
  """Boolean mask of the ``k`` entries of largest ``|w|`` (ties: lowest flat index).

  Args:
    w: any-shaped float array.
    k: number of entries to keep (int or traced int32 scalar); at most the
      number of candidates.
    valid: optional bool array of ``w``'s shape; only its True entries are
      candidates (e.g. the slots of a DAG that the forward pass reads).

  Returns:
    bool array of ``w``'s shape with exactly ``k`` True entries.

  Raises:
    ValueError: a static ``k`` outside [0, candidates].
  """
  if valid is not None and valid.shape != w.shape:
    raise ValueError(f"valid has shape {valid.shape}, w has {w.shape}.")
  if isinstance(k, int):
    candidates = int(np.sum(valid)) if isinstance(valid, np.ndarray) else w.size
    if not 0 <= k <= candidates:
      raise ValueError(f"k={k} must lie in [0, {candidates}] (the candidate entries).")
  bits = _magnitude_bits(w, valid).reshape(-1)
  k = jnp.asarray(k, jnp.int32)

  # Radix select: the largest t with #(bits >= t) >= k is the k-th largest bits.
  def refine(i, t):
    candidate = t | lax.shift_left(jnp.int32(1), _MAGNITUDE_BITS - 1 - i)
    return jnp.where(jnp.sum(bits >= candidate, dtype=jnp.int32) >= k, candidate, t)

  threshold = lax.fori_loop(0, _MAGNITUDE_BITS, refine, jnp.int32(0))
  above = bits > threshold
  at = bits == threshold
  needed = k - jnp.sum(above, dtype=jnp.int32)
  # Ties at the threshold: the lowest flat indices first.
  mask = above | (at & (jnp.cumsum(at, dtype=jnp.int32) <= needed))
  return mask.reshape(w.shape)


def topk_ste(w: jax.Array, prune_rate: float | None = None, *, k=None,
             valid: jax.Array | None = None) -> jax.Array:
  """DNW's real graph: top-k |w| in the forward pass, identity in the backward pass.

  dnw.md §1: the ``int(prune_rate * numel)`` smallest |w| are zeroed in the
  forward pass; ``d out / d w`` is the identity, so hallucinated (zeroed)
  edges receive ``dL/dw_uv`` too and can swap into the graph.

  Args:
    w: float array of any shape, e.g. an edge matrix ``(num_sources, num_targets)``.
    prune_rate: fraction of ``w.size`` to zero; keeps ``w.size - int(prune_rate *
      w.size)`` entries. Exactly one of ``prune_rate`` and ``k`` is given.
    k: the number of entries to keep, instead of ``prune_rate``.
    valid: optional bool mask of candidate entries (see :func:`topk_mask`); the
      kept count is still taken from ``prune_rate`` over ``w.size`` unless ``k``
      is given.

  Returns:
    ``w`` with all but the kept entries set to 0, same shape and dtype. The kept
    entries equal ``w`` exactly.

  Example:
    >>> w = jnp.array([0.3, -2.0, 0.1, 1.0])
    >>> topk_ste(w, 0.5)
    Array([ 0., -2.,  0.,  1.], dtype=float32)
    >>> jax.grad(lambda w: topk_ste(w, 0.5).sum())(w)
    Array([1., 1., 1., 1.], dtype=float32)
  """
  if (prune_rate is None) == (k is None):
    raise ValueError("Give exactly one of prune_rate and k.")
  if k is None:
    k = kept_count(w.size, prune_rate)
  mask = lax.stop_gradient(topk_mask(w, k, valid))
  # w + sg(w * mask - w): the forward value is exactly w * mask (w - w == 0 and
  # w + 0 == w in floating point) and the derivative is the identity.
  return w + lax.stop_gradient(jnp.where(mask, w, jnp.zeros_like(w)) - w)
