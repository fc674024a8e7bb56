"""AutoPrune (Xiao, Wang & Rajasekaran, NeurIPS 2019) as an optax transform.

Every pruned weight (or neuron) ``w`` has an auxiliary parameter ``m``; the
forward pass uses the effective weight ``t = w * h(m)`` with ``h`` the unit step.
The auxiliary parameters live in this transform's state (``AutoPruneState.m``),
so checkpoints and sharding cover them. A training step:

  1. ``eff = effective_params(params, opt_state)``  (``W * h(M)``);
  2. ``grads = jax.grad(loss)(eff)``  (the gradient with respect to ``T``);
  3. ``updates, opt_state = tx.update(grads, opt_state, params)``;
  4. ``params = optax.apply_updates(params, updates)``.

The transform turns ``dL/dT`` into the weight direction ``dL/dT * h(M)`` (plus
weight decay), which later transforms of an ``optax.chain`` (e.g. ``optax.sgd``)
turn into the step, and it updates ``M`` itself with its own optimizer and
learning rate (reference/autoprune.md §2, all *reconstructed*; every choice is
an argument):

  naive rule:      g_m = sum(dL/dt * w)       * s'(m)
  decoupled rule:  g_m = sum(dL/dt * sign(w)) * s'(m)     (default)
  regulariser:     + lambda_m * s'(m)  (L1 on h(M) through the same STE, default),
                   or lambda_m * sign(m) ("l1"), or lambda_m * m ("l2")

with ``s'`` the surrogate's derivative (:func:`jaxprune.kernels.step_ste`) and
the sum over the weights a neuron's ``m`` gates (one term for weight pruning).
A masked weight keeps its value (no update reaches it unless decay targets
``W``), so if its ``m`` turns positive again it returns (recoverability).

This module must not know about models or recipes; it works on any params
pytree (Flax or not).
"""
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from jaxprune.kernels.ste import SURROGATES, step_ste
from jaxprune.optim.selection import Selector, leaf_path, select

ScalarOrSchedule = Union[float, optax.Schedule]

RULES = ("decoupled", "naive")
REGULARIZERS = ("l1_step", "l1", "l2")
GRANULARITIES = ("weight", "neuron")
NEURON_AXES = ("out", "in")
DECAY_TARGETS = ("effective", "weights")
M_OPTIMIZERS = ("sgd", "adam")

# Default layers: every kernel (Flax Dense/Conv weights), not biases or BN.
DEFAULT_MASK = r"(^|/)kernel$"


class AutoPruneState(NamedTuple):
  """State of :func:`autoprune`.

  Attributes:
    count: number of updates so far (drives the schedules).
    m: auxiliary parameters, a pytree shaped like params: a pruned leaf holds
      an array of the leaf's shape (weight granularity) or of its last axis
      (neuron granularity: one ``m`` per output unit / channel); any other leaf
      holds a positive scalar placeholder (always alive).
    m_opt_state: state of the auxiliary parameters' own optimizer.
  """
  count: jax.Array
  m: Any
  m_opt_state: Any


def find_state(opt_state: Any) -> AutoPruneState:
  """The :class:`AutoPruneState` inside ``opt_state`` (e.g. of an ``optax.chain``).

  Raises:
    ValueError: if there is none.
  """
  stack = [opt_state]
  while stack:
    s = stack.pop(0)
    if isinstance(s, AutoPruneState):
      return s
    if isinstance(s, (tuple, list)):
      stack.extend(s)
    elif isinstance(s, dict):
      stack.extend(s.values())
    elif hasattr(s, "inner_state"):  # optax.masked / wrappers
      stack.append(s.inner_state)
  raise ValueError("No AutoPruneState in this optimizer state; build the optimizer "
                   "with jaxprune.optim.autoprune(...).")


def _is_neuron_gate(kernel, m) -> bool:
  return jnp.ndim(kernel) >= 2 and jnp.shape(m) == (jnp.shape(kernel)[-1],)


def _share_bias_gates(params, gates):
  """Neuron granularity gates a unit's bias with its kernel's gate (whole unit off)."""
  if not isinstance(params, dict):
    return gates
  out = {k: _share_bias_gates(params[k], gates[k]) for k in params}
  if "kernel" in params and "bias" in params and not isinstance(params["kernel"], dict):
    kg = gates["kernel"]
    if _is_neuron_gate(params["kernel"], kg) and jnp.shape(params["bias"]) == jnp.shape(kg):
      out["bias"] = kg
  return out


def gates(params: Any, state: Any, *, surrogate: str = "softplus",
          slope: float = 0.1) -> Any:
  """``h(M)`` per params leaf (broadcastable to the leaf; 1 for unpruned leaves).

  Differentiable with respect to ``M`` through the surrogate. For neuron
  granularity a unit's bias shares its kernel's gate.

  Args:
    params: the weights ``W``.
    state: an :class:`AutoPruneState` or an optimizer state holding one.
    surrogate, slope: the straight-through surrogate (see ``step_ste``).
  """
  if not isinstance(state, AutoPruneState):
    state = find_state(state)
  h = jax.tree.map(lambda m: step_ste(m, surrogate, slope), state.m)
  return _share_bias_gates(params, h)


def effective_params(params: Any, state: Any) -> Any:
  """The masked effective weights ``T = W * h(M)`` for the forward pass.

  Args:
    params: the weights ``W``.
    state: an :class:`AutoPruneState` or an optimizer state holding one.

  Returns:
    A pytree like ``params``.

  Example:
    >>> eff = effective_params(params, opt_state)
    >>> grads = jax.grad(loss_fn)(eff)          # dL/dT
    >>> updates, opt_state = tx.update(grads, opt_state, params)
  """
  h = gates(params, state)
  return jax.tree.map(lambda w, g: w * g.astype(w.dtype), params, h)


def masks(params: Any, state: Any) -> Any:
  """Boolean keep-masks shaped like each params leaf (True: weight kept)."""
  h = gates(params, state)
  return jax.tree.map(lambda w, g: jnp.broadcast_to(g > 0, jnp.shape(w)), params, h)


def kept_fractions(params: Any, state: Any, selector: Selector = DEFAULT_MASK
                   ) -> dict[str, float]:
  """``{leaf path: fraction of entries kept}`` for the leaves ``selector`` picks."""
  sel = select(params, selector)
  kept = masks(params, state)
  out = {}
  for (path, k), s in zip(jax.tree_util.tree_leaves_with_path(kept), jax.tree.leaves(sel)):
    if s:
      out[leaf_path(path)] = float(jnp.mean(k))
  return out


def _value(x, count):
  return x(count) if callable(x) else x


def _check(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"Unknown {name} {value!r}; use one of {allowed}.")


def autoprune(learning_rate: ScalarOrSchedule, *,
              regularization: ScalarOrSchedule = 1e-4,
              regularizer: str = "l1_step",
              surrogate: str = "softplus",
              slope: float = 0.1,
              rule: str = "decoupled",
              granularity: str = "weight",
              neuron_axis: str = "out",
              mask: Selector = DEFAULT_MASK,
              m_init: float = 0.2,
              m_optimizer: str = "sgd",
              m_momentum: float | None = None,
              weight_decay: ScalarOrSchedule = 0.0,
              decay_on: str = "effective") -> optax.GradientTransformation:
  """AutoPrune: auxiliary parameters ``M`` gate weights or neurons (see module doc).

  Feed it the gradient with respect to the effective weights
  (:func:`effective_params`); it returns the weight direction
  ``dL/dT * h(M) + weight_decay * (W * h(M) or W)`` for the next transforms of a
  chain and updates ``M`` in its own state with its own optimizer. Leaves the
  mask does not select pass through unchanged (plus weight decay).

  Args:
    learning_rate: learning rate of ``M`` (float or schedule of the update count);
      a schedule that drops to 0 freezes the mask for fine-tuning.
    regularization: ``lambda_m``, weight of the regulariser on ``M`` (float or
      schedule); per auxiliary parameter.
    regularizer: "l1_step" (default: L1 of ``h(M)``, i.e. the number of kept
      units, through the surrogate), "l1" (``|M|``) or "l2" (``M^2 / 2``).
    surrogate: "softplus" (default), "leaky_relu" or "linear".
    slope: leaky ReLU slope for m <= 0 (default 0.1, *reconstructed*).
    rule: "decoupled" (default: ``sign(w)`` in place of ``w``, sensitivity
      decoupled from the weight magnitude) or "naive" (the coarse gradient).
    granularity: "weight" (one ``m`` per weight) or "neuron" (one per output
      unit / channel, the last axis of a kernel; the unit's bias is gated too).
    neuron_axis: for neuron granularity, "out" (default, the reference: one ``m``
      per output unit of the layer, gating its fan-in and bias) or "in" (one ``m``
      per input unit, gating its fan-out rows, shape ``(fan_in, 1)``). With "out"
      and a ReLU after the layer, a gated unit's pre-activation is exactly 0 and
      ReLU'(0) = 0, so no gradient reaches its ``m`` and it cannot return; "in"
      keeps the unit's output alive, so the coarse gradient stays informative.
    mask: which leaves are pruned: a selector for :func:`jaxprune.optim.select`
      (path regex or predicate; default every ``kernel``), or a boolean pytree.
    m_init: initial value of every ``m`` (positive: every weight starts alive).
    m_optimizer: "sgd" (default) or "adam" for ``M``.
    m_momentum: momentum of the SGD on ``M`` (None: plain SGD).
    weight_decay: L2 coefficient added to the weight direction (float or
      schedule); 0 disables it. Chain no other decay in front of this transform:
      it would leak into the update of ``M``.
    decay_on: "effective" (default: decay ``T``, i.e. only kept weights decay, so
      masked weights keep their value) or "weights" (decay ``W``; masked weights
      shrink, which lowers recoverability as the authors note).

  Returns:
    An ``optax.GradientTransformation`` whose state holds an
    :class:`AutoPruneState`.

  Raises:
    ValueError: for unknown option values, or at update time without ``params``.

  Example:
    >>> tx = optax.chain(autoprune(0.5, regularization=1e-4, weight_decay=5e-4),
    ...                  optax.sgd(0.05, momentum=0.9))
    >>> opt_state = tx.init(params)
    >>> def step(params, opt_state, x, y):
    ...   eff = effective_params(params, opt_state)
    ...   grads = jax.grad(lambda p: loss(model.apply({"params": p}, x), y))(eff)
    ...   updates, opt_state = tx.update(grads, opt_state, params)
    ...   return optax.apply_updates(params, updates), opt_state
  """
  _check("surrogate", surrogate, SURROGATES)
  _check("rule", rule, RULES)
  _check("regularizer", regularizer, REGULARIZERS)
  _check("granularity", granularity, GRANULARITIES)
  _check("neuron_axis", neuron_axis, NEURON_AXES)
  _check("decay_on", decay_on, DECAY_TARGETS)
  _check("m_optimizer", m_optimizer, M_OPTIMIZERS)
  if m_optimizer == "adam":
    m_tx = optax.adam(learning_rate)
  else:
    m_tx = optax.sgd(learning_rate, momentum=m_momentum)

  def mask_tree(params):
    if isinstance(mask, (str, type(None))) or callable(mask):
      return select(params, mask)
    return mask

  def init_m(w, selected):
    if not selected:
      return jnp.ones((), jnp.float32)
    if granularity == "neuron":
      if jnp.ndim(w) < 2:
        raise ValueError("Neuron granularity needs kernels of rank >= 2; the mask "
                         f"selected a leaf of shape {jnp.shape(w)}.")
      if neuron_axis == "in":
        return jnp.full((jnp.shape(w)[-2], 1), m_init, jnp.float32)
      return jnp.full((jnp.shape(w)[-1],), m_init, jnp.float32)
    return jnp.full(jnp.shape(w), m_init, jnp.float32)

  def init_fn(params):
    m = jax.tree.map(init_m, params, mask_tree(params))
    return AutoPruneState(count=jnp.zeros((), jnp.int32), m=m, m_opt_state=m_tx.init(m))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("autoprune needs params: call tx.update(grads, state, params).")
    sel = mask_tree(params)
    lam = _value(regularization, state.count)
    wd = _value(weight_decay, state.count)
    h = gates(params, state, surrogate=surrogate, slope=slope)

    def weight_dir(g, w, hh):
      hh = hh.astype(g.dtype)
      d = g * hh  # dL/dW = dL/dT * h(M)
      decayed = w * hh if decay_on == "effective" else w
      return d + wd * decayed.astype(g.dtype)

    def m_grad(g, w, m, selected):
      if not selected:
        return jnp.zeros_like(m)
      # Coarse gradient through the gate (§2): sign(w) (decoupled) or w (naive).
      d = g * (jnp.sign(w) if rule == "decoupled" else w)
      if jnp.shape(m) != jnp.shape(w):  # neuron: sum over the weights the unit's m gates
        padded = (1,) * (d.ndim - jnp.ndim(m)) + tuple(jnp.shape(m))
        axes = tuple(i for i, n in enumerate(padded) if n == 1 and d.shape[i] != 1)
        d = jnp.sum(d, axis=axes).reshape(jnp.shape(m))
      d = d.astype(jnp.float32)
      if regularizer == "l1_step":
        d = d + lam  # d(lambda * sum h(m))/dh, through the same surrogate
      _, vjp = jax.vjp(lambda mm: step_ste(mm, surrogate, slope), m)
      gm = vjp(d)[0]
      if regularizer == "l1":
        gm = gm + lam * jnp.sign(m)
      elif regularizer == "l2":
        gm = gm + lam * m
      return gm

    new_updates = jax.tree.map(weight_dir, updates, params, h)
    g_m = jax.tree.map(m_grad, updates, params, state.m, sel)
    m_updates, m_opt_state = m_tx.update(g_m, state.m_opt_state, state.m)
    m = optax.apply_updates(state.m, m_updates)
    return new_updates, AutoPruneState(count=optax.safe_increment(state.count), m=m,
                                       m_opt_state=m_opt_state)

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["AutoPruneState", "autoprune", "effective_params", "find_state", "gates",
           "kept_fractions", "masks", "DEFAULT_MASK"]
