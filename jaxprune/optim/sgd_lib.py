"""The SGD recipe of every weight-training stage (PyTorch semantics: decay before momentum).
"""
import ml_collections
import optax

from jaxprune.errors import UserError
from jaxprune.optim.selection import select


def learning_rate_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """``cfg.schedule``: "cosine" (warm-up + cosine to 0), "step" (x0.1 at
  ``cfg.decay_epochs``) or "constant"."""
  warmup = int(cfg.get("warmup_epochs", 0) * steps_per_epoch)
  lr = cfg.learning_rate
  if cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
  elif cfg.schedule == "step":
    main = optax.piecewise_constant_schedule(
        lr, {int(e * steps_per_epoch) - warmup: 0.1 for e in cfg.decay_epochs})
  elif cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise UserError(f"Unknown train.schedule {cfg.schedule!r}; use 'cosine', 'step' "
                    "or 'constant'.")
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def sgd(cfg: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int,
        ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum/Nesterov and weight decay from a ``train`` config section.

  ``cfg.weight_decay_on`` selects the decayed leaves (a path regex, see
  :func:`jaxprune.optim.select`; None decays every parameter as PyTorch does).
  """
  schedule = learning_rate_schedule(cfg, steps_per_epoch, total_steps)
  decay_on = cfg.get("weight_decay_on")
  decay = optax.add_decayed_weights(
      cfg.weight_decay, mask=None if decay_on is None else lambda p: select(p, decay_on))
  tx = optax.chain(decay, optax.sgd(schedule, momentum=cfg.momentum or None,
                                    nesterov=cfg.nesterov))
  return tx, schedule
