"""Knowledge-distillation loss (Hinton et al.; docs/methods/tas.md §7); the teacher's logits
carry no gradient."""
import jax
import jax.numpy as jnp
import optax


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
            alpha: float = 0.9, temperature: float = 4.0) -> jax.Array:
  """Distillation loss, a scalar.

  Args:
    student_logits: [batch, classes].
    teacher_logits: [batch, classes]; treated as constants.
    labels: [batch] integer labels.
    alpha: weight of the soft (teacher) term; 0 gives plain cross-entropy.
    temperature: softening temperature T.
  """
  student_logits = student_logits.astype(jnp.float32)
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels).mean()
  log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1).mean()
  return (1.0 - alpha) * ce + alpha * temperature ** 2 * kl


def kd_objective(teacher_model, alpha: float = 0.9, temperature: float = 4.0):
  """An engine objective ``(logits, batch, teacher_variables) -> loss``."""
  def objective(logits, batch, teacher_variables):
    teacher_logits = teacher_model.apply(teacher_variables, batch["image"], train=False)
    return kd_loss(logits, teacher_logits, batch["label"], alpha, temperature)
  return objective
