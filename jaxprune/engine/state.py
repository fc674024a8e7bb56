"""The train state: one pytree holding everything a resumed run needs (no RNG: the
key of step ``s`` is ``fold_in(key(seed), s)``)."""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Weights, non-trainable model collections (BN statistics) and optimizer state.

  Methods with learnable structure keep it in ``params`` (or, when it has its own
  optimizer, in ``arch_params`` with ``arch_opt_state``) so that sharding,
  checkpoints and resume cover it without special cases.
  """
  step: jax.Array
  params: Any
  model_state: Any  # every variable collection other than "params"
  opt_state: Any
  arch_params: Any = None
  arch_opt_state: Any = None

  @property
  def variables(self) -> dict:
    return {"params": self.params, **self.model_state}


def split_variables(variables) -> tuple[Any, dict]:
  variables = dict(variables)
  params = variables.pop("params")
  return params, variables


def init_train_state(model, tx: optax.GradientTransformation, input_shape,
                     ) -> Callable[[jax.Array], TrainState]:
  """Returns ``init(key) -> TrainState`` for ``model`` on inputs of ``input_shape``.

  Meant to be traced: ``jax.eval_shape(init, key)`` gives the abstract state used
  for checkpoint restores, ``jax.jit(init, out_shardings=...)`` creates it sharded.
  """
  def init(key):
    variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    params, model_state = split_variables(variables)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state=model_state, opt_state=tx.init(params))
  return init


def init_from_variables(variables, tx: optax.GradientTransformation
                        ) -> Callable[[jax.Array], TrainState]:
  """``init(key) -> TrainState`` that starts from given variables (a previous stage's)."""
  # Device arrays, not numpy: jit passes closed-over arrays as arguments instead of
  # baking them into the program as literals.
  params, model_state = split_variables(jax.tree.map(jnp.asarray, jax.device_get(variables)))

  def init(key):
    del key
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state=model_state, opt_state=tx.init(params))
  return init
