"""The TAS FLOPs cost loss (docs/methods/tas.md §5); computes neither cost, holds no state.
"""
import jax
import jax.numpy as jnp

__all__ = ["COST_LOSS_MODES", "tas_cost_loss"]

COST_LOSS_MODES = ("code", "paper")


def tas_cost_loss(e_cost, f_cost, flops_max, ratio, tol, mode: str = "code"
                  ) -> jax.Array:
  """TAS cost loss L_cost: ``+-log(E_cost)`` or 0 by where F_cost lies (§5).

  With the target ``R = flops_max * ratio``:

  * ``mode="code"`` (the official scripts, default; asymmetric band below R):
    ``-log E_cost`` if ``F_cost < R - tol * flops_max``, ``+log E_cost`` if
    ``F_cost > R``, else 0.
  * ``mode="paper"`` (symmetric band around R): ``+log E_cost`` if
    ``F_cost > (1 + tol) * R``, ``-log E_cost`` if ``F_cost < (1 - tol) * R``,
    else 0.

  Args:
    e_cost: expected FLOPs, a positive scalar (carries the gradient).
    f_cost: FLOPs of the argmax architecture, a scalar (may be traced; gets no
      gradient).
    flops_max: FLOPs of the unpruned network.
    ratio: target fraction of `flops_max` to keep, e.g. 0.47.
    tol: the tolerance t, a fraction (0.05 in the official scripts): of
      `flops_max` in "code" mode, of R in "paper" mode.
    mode: "code" or "paper" (static).

  Returns:
    A float32 scalar; multiply by lambda_cost (2 in the paper) and add to the
    validation cross-entropy.

  Example:
    >>> loss = tas_cost_loss(e_cost, f_cost, 40.81e6, 0.55, 0.05)
  """
  if mode not in COST_LOSS_MODES:
    raise ValueError(f"tas_cost_loss: mode must be one of {COST_LOSS_MODES}, "
                     f"got {mode!r}")
  e_cost = jnp.asarray(e_cost, jnp.float32)
  f_cost = jax.lax.stop_gradient(jnp.asarray(f_cost, jnp.float32))
  target = jnp.asarray(flops_max, jnp.float32) * ratio
  if mode == "code":
    too_cheap = f_cost < target - tol * jnp.asarray(flops_max, jnp.float32)
    too_costly = f_cost > target
  else:
    too_cheap = f_cost < (1 - tol) * target
    too_costly = f_cost > (1 + tol) * target
  sign = jnp.where(too_costly, 1.0, jnp.where(too_cheap, -1.0, 0.0))
  return sign * jnp.log(e_cost)
