"""Jitted train and eval steps of a classifier over the global batch (an objective
``(logits, batch, aux) -> loss`` makes them reusable)."""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxprune.engine import mesh as mesh_lib
from jaxprune.engine.state import TrainState

Objective = Callable[[jax.Array, dict, Any], jax.Array]


def cross_entropy(logits, batch, aux=None):
  del aux
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch["label"]).mean()


def step_key(seed: int, step) -> jax.Array:
  """The RNG key of training step ``step``: a pure function of seed and step."""
  return jax.random.fold_in(jax.random.key(seed), step)


def apply_model(model, params, model_state, images, *, train: bool, key=None):
  """Runs ``model``; in train mode also returns the updated non-param collections."""
  variables = {"params": params, **model_state}
  if not train:
    return model.apply(variables, images, train=False), model_state
  rngs = {"dropout": key} if key is not None else {}
  logits, updates = model.apply(variables, images, train=True,
                                mutable=list(model_state), rngs=rngs)
  return logits, {**model_state, **updates}


def make_train_step(model, tx: optax.GradientTransformation, *, seed: int, mesh,
                    state_sharding, objective: Objective = cross_entropy,
                    donate: bool = True):
  """Returns ``step(state, batch, aux) -> (state, metrics)``, compiled for ``mesh``.

  ``aux`` is any replicated pytree the objective needs (a teacher's variables),
  or None. Metrics are global-batch means: ``loss`` and ``accuracy``.
  """
  def step(state: TrainState, batch, aux):
    key = step_key(seed, state.step)

    def loss_fn(params):
      logits, model_state = apply_model(model, params, state.model_state,
                                        batch["image"], train=True, key=key)
      return objective(logits, batch, aux), (logits, model_state)

    (loss, (logits, model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    new_state = state.replace(step=state.step + 1, params=params,
                              model_state=model_state, opt_state=opt_state)
    return new_state, metrics

  repl = mesh_lib.replicated(mesh)
  return jax.jit(step,
                 in_shardings=(state_sharding, mesh_lib.batch_sharding(mesh), repl),
                 out_shardings=(state_sharding, repl),
                 donate_argnums=(0,) if donate else ())


def eval_logits(model, variables, images):
  """The model's inference logits (float32) for ``variables`` (params + other state)."""
  params, model_state = variables["params"], {k: v for k, v in variables.items()
                                              if k != "params"}
  logits, _ = apply_model(model, params, model_state, images, train=False)
  return logits.astype(jnp.float32)


def make_eval_step(model, *, mesh):
  """Returns ``eval(variables, batch) -> sums``; ``batch['mask']`` marks real rows."""
  def evaluate(variables, batch):
    logits = eval_logits(model, variables, batch["image"])
    mask = batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}

  repl = mesh_lib.replicated(mesh)
  return jax.jit(evaluate, in_shardings=(repl, mesh_lib.batch_sharding(mesh)),
                 out_shardings=repl)


def make_paired_eval_step(model_a, model_b=None, *, mesh):
  """Returns ``eval(variables_a, variables_b, batch) -> counts`` of the images that two
  networks (``model_b`` defaults to ``model_a``: e.g. dense and masked; or a base and
  its pruned derivative) get wrong: ``wrong_both``, ``wrong_only_a``, ``wrong_only_b``
  and ``count`` (real rows, ``batch['mask']``)."""
  model_b = model_a if model_b is None else model_b

  def wrong(model, variables, batch):
    return jnp.argmax(eval_logits(model, variables, batch["image"]), -1) != batch["label"]

  def evaluate(variables_a, variables_b, batch):
    mask = batch["mask"].astype(jnp.float32)
    a, b = wrong(model_a, variables_a, batch), wrong(model_b, variables_b, batch)
    count = lambda x: jnp.sum(x.astype(jnp.float32) * mask)
    return {"wrong_both": count(a & b), "wrong_only_a": count(a & ~b),
            "wrong_only_b": count(b & ~a), "count": jnp.sum(mask)}

  repl = mesh_lib.replicated(mesh)
  return jax.jit(evaluate, in_shardings=(repl, repl, mesh_lib.batch_sharding(mesh)),
                 out_shardings=repl)
