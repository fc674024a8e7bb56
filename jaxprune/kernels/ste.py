"""AutoPrune's gate: the unit step with a surrogate gradient (docs/methods/autoprune.md §1-§2).

Knows no weights, layers or optimizers; :mod:`jaxprune.optim.autoprune_lib` builds on it.
"""
import functools

import jax
import jax.numpy as jnp

__all__ = ["SURROGATES", "step_ste", "surrogate_grad"]

# The three surrogates the authors compare (docs/methods/autoprune.md §1).
SURROGATES = ("softplus", "leaky_relu", "linear")


def surrogate_grad(m: jax.Array, surrogate: str = "softplus",
                   slope: float = 0.1) -> jax.Array:
  """``s'(m)`` of a surrogate, elementwise, same shape and dtype as ``m``.

  softplus: ``sigmoid(m)``; leaky ReLU: 1 for m > 0 else ``slope``; linear: 1.

  Args:
    m: auxiliary parameters, any shape.
    surrogate: one of :data:`SURROGATES`.
    slope: the leaky ReLU's slope for m <= 0 (ignored by the other surrogates).

  Raises:
    ValueError: for an unknown surrogate.
  """
  m = jnp.asarray(m)
  if surrogate == "softplus":
    return jax.nn.sigmoid(m)
  if surrogate == "leaky_relu":
    return jnp.where(m > 0, jnp.ones_like(m), jnp.full_like(m, slope))
  if surrogate == "linear":
    return jnp.ones_like(m)
  raise ValueError(f"Unknown surrogate {surrogate!r}; use one of {SURROGATES}.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _step(m, surrogate, slope):
  return (m > 0).astype(m.dtype)


def _step_fwd(m, surrogate, slope):
  return _step(m, surrogate, slope), m


def _step_bwd(surrogate, slope, m, g):
  return (g * surrogate_grad(m, surrogate, slope),)


_step.defvjp(_step_fwd, _step_bwd)


def step_ste(m: jax.Array, surrogate: str = "softplus", slope: float = 0.1) -> jax.Array:
  """Unit step forward, surrogate derivative backward (the AutoPrune gate).

  Forward ``h(m) = (m > 0)`` as ``m``'s dtype; backward ``dL/dm = dL/dh * s'(m)``
  with ``s'`` from :func:`surrogate_grad`.

  Args:
    m: ``[...]`` float auxiliary parameters.
    surrogate: "softplus" (default, the authors' best compression),
      "leaky_relu" or "linear".
    slope: leaky ReLU slope for m <= 0; default 0.1 (*reconstructed*, the paper
      gives no value).

  Returns:
    ``[...]`` gates in {0, 1}, same shape and dtype as ``m``.

  Raises:
    ValueError: for an unknown surrogate.

  Example:
    >>> m = jnp.array([-1.0, 0.5])
    >>> step_ste(m)                                   # [0., 1.]
    >>> jax.grad(lambda m: step_ste(m).sum())(m)      # sigmoid(m)
  """
  if surrogate not in SURROGATES:
    raise ValueError(f"Unknown surrogate {surrogate!r}; use one of {SURROGATES}.")
  m = jnp.asarray(m)
  if not jnp.issubdtype(m.dtype, jnp.floating):
    m = m.astype(jnp.float32)
  return _step(m, surrogate, float(slope))
