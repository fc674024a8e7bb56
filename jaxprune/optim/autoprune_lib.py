"""AutoPrune as an optax transform: gates ``W * h(M)``, ``M`` in the optimizer state.

The update rule is reconstructed (docs/methods/autoprune.md §2; docs/design/kernels.md); knows
no models or recipes.
"""
import re
from typing import Any, Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from jaxprune.kernels.ste import SURROGATES, step_ste
from jaxprune.optim import selection
from jaxprune.optim.selection import Selector

ScalarOrSchedule = Union[float, optax.Schedule]

RULES = ("decoupled", "naive")
REGULARIZERS = ("l1_step", "l1", "l2")
GRANULARITIES = ("weight", "neuron")
NEURON_AXES = ("out", "in")
DECAY_TARGETS = ("effective", "weights")
M_OPTIMIZERS = ("sgd", "adam")
M_INIT_RULES = ("constant", "magnitude")

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
  """The :class:`AutoPruneState` inside ``opt_state``.

  ``opt_state`` is an optimizer state (e.g. of an ``optax.chain``), an
  ``nnx.Optimizer`` or its ``opt_state``.

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
    elif hasattr(s, "opt_state") and hasattr(s, "tx"):  # nnx.Optimizer
      stack.append(s.opt_state)
  raise ValueError("No AutoPruneState in this optimizer state; build the optimizer "
                   "with jaxprune.optim.autoprune(...).")


def _is_neuron_gate(kernel, m) -> bool:
  return jnp.ndim(kernel) >= 2 and jnp.shape(m) == (jnp.shape(kernel)[-1],)


def _gate_fn(params: Any, state: Any, surrogate: str, slope: float
             ) -> Callable[[str, Any], jax.Array]:
  """``(leaf path, leaf) -> h(M)`` for the leaves of ``params``, matched by path."""
  if not isinstance(state, AutoPruneState):
    state = find_state(state)
  m_by_path = dict(selection.named_leaves(state.m))
  p_by_path = dict(selection.named_leaves(params))

  def gate(path, w):
    if path not in m_by_path:
      raise ValueError(
          f"The AutoPrune state has no auxiliary parameter for the leaf {path!r}; it has "
          f"{selection.listing(m_by_path)}. Build it with tx.init on the same "
          "parameters.")
    m = m_by_path[path]
    # Neuron granularity: a unit's bias shares its kernel's gate (whole unit off).
    if path == "bias" or path.endswith("/bias"):
      kernel_path = path[:-len("bias")] + "kernel"
      km, kernel = m_by_path.get(kernel_path), p_by_path.get(kernel_path)
      if (km is not None and kernel is not None and _is_neuron_gate(kernel, km)
          and jnp.shape(w) == jnp.shape(km)):
        m = km
    selection.check_broadcast(path, jnp.shape(m), jnp.shape(w))
    return step_ste(m, surrogate, slope)
  return gate


def gates(params: Any, state: Any, *, surrogate: str = "softplus",
          slope: float = 0.1) -> Any:
  """``h(M)`` per params leaf (broadcastable to the leaf; 1 for unpruned leaves).

  Differentiable with respect to ``M`` through the surrogate. For neuron
  granularity a unit's bias shares its kernel's gate.

  Args:
    params: the weights ``W`` (Linen params, NNX state or a pure tree).
    state: an :class:`AutoPruneState`, an optimizer state holding one or an
      ``nnx.Optimizer``.
    surrogate, slope: the straight-through surrogate (see ``step_ste``).

  Raises:
    ValueError: if a leaf has no auxiliary parameter or its gate does not
      broadcast to it.
  """
  return selection.map_with_path(_gate_fn(params, state, surrogate, slope), params)


def effective_params(params: Any, state: Any) -> Any:
  """The masked effective weights ``T = W * h(M)`` for the forward pass.

  Args:
    params: the weights ``W``: Linen params, ``nnx.state(model, nnx.Param)`` or a
      pure tree (leaves are matched to ``M`` by path).
    state: an :class:`AutoPruneState`, an optimizer state holding one, or an
      ``nnx.Optimizer``.

  Returns:
    A pytree like ``params`` (NNX ``Variable`` boxes included).

  Example (Linen):
    >>> eff = effective_params(params, opt_state)
    >>> grads = jax.grad(loss_fn)(eff)          # dL/dT
    >>> updates, opt_state = tx.update(grads, opt_state, params)

  Example (NNX; see also :func:`autoprune_value_and_grad`):
    >>> eff = effective_params(nnx.state(model, nnx.Param), optimizer)
  """
  gate = _gate_fn(params, state, "softplus", 0.1)
  return selection.map_with_path(lambda p, w: w * gate(p, w).astype(w.dtype), params)


def masks(params: Any, state: Any) -> Any:
  """Boolean keep-masks shaped like each params leaf (True: weight kept)."""
  gate = _gate_fn(params, state, "softplus", 0.1)
  return selection.map_with_path(
      lambda p, w: jnp.broadcast_to(gate(p, w) > 0, jnp.shape(w)), params)


def kept_fractions(params: Any, state: Any, selector: Selector = DEFAULT_MASK
                   ) -> dict[str, float]:
  """``{leaf path: fraction of entries kept}`` for the leaves ``selector`` picks.

  Raises:
    ValueError: if the selector picks no leaf.
  """
  sel = dict(selection.named_leaves(selection.as_mask(params, selector)))
  return {path: float(jnp.mean(k)) for path, k in selection.named_leaves(masks(params, state))
          if sel[path] is not False}


def effective_model(model: Any, optimizer: Any, wrt: Any = None) -> Any:
  """NNX: a copy of ``model`` whose parameters are ``W * h(M)`` (the pruned network).

  Args:
    model: an ``nnx.Module`` holding the dense weights ``W``.
    optimizer: the ``nnx.Optimizer`` (or its state) holding the AutoPrune state.
    wrt: the optimizer's parameter filter (default: ``optimizer.wrt``, else
      ``nnx.Param``).

  Example:
    >>> pruned = optim.effective_model(model, optimizer)
    >>> pruned.eval(); logits = pruned(x)
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  wrt = wrt if wrt is not None else getattr(optimizer, "wrt", nnx.Param)
  graphdef, params, rest = nnx.split(model, wrt, ...)
  return nnx.merge(graphdef, effective_params(params, optimizer), rest, copy=True)


def autoprune_value_and_grad(loss_fn: Callable[..., Any], *, has_aux: bool = False,
                             wrt: Any = None) -> Callable[..., Any]:
  """``nnx.value_and_grad`` for AutoPrune: the loss on ``W * h(M)``, its gradient ``dL/dT``.

  Returns ``fn(model, optimizer, *args, **kwargs) -> (value, grads)``: it runs
  ``loss_fn(model_T, *args, **kwargs)`` on a copy ``model_T`` of ``model`` whose
  parameters are the effective weights, writes ``model_T``'s other state (batch
  statistics, RNG counts) back into ``model``, and returns the value (``(loss,
  aux)`` with ``has_aux``) and ``grads``, an ``nnx.State`` of ``dL/dT`` shaped
  like ``nnx.state(model, wrt)`` for ``optimizer.update(model, grads)``. Use it
  inside ``nnx.jit``.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs) -> loss`` (or ``(loss, aux)``).
    has_aux: as in ``nnx.value_and_grad``.
    wrt: the parameter filter of the optimizer (default: ``optimizer.wrt``, else
      ``nnx.Param``).

  Example:
    >>> tx = optax.chain(optim.autoprune(0.5, regularization=1e-4), optax.sgd(0.05))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   loss_fn = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(
    ...       m(x), y).mean()
    ...   loss, grads = optim.autoprune_value_and_grad(loss_fn)(model, optimizer, x, y)
    ...   optimizer.update(model, grads)
    ...   return loss
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def fn(model, optimizer, *args, **kwargs):
    flt = wrt if wrt is not None else getattr(optimizer, "wrt", nnx.Param)
    graphdef, params, rest = nnx.split(model, flt, ...)
    eff = effective_params(params, optimizer)

    def pure(eff, rest):
      copy = nnx.merge(graphdef, eff, rest, copy=True)
      out = loss_fn(copy, *args, **kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, nnx.state(copy, nnx.Not(flt)))

    (loss, (aux, new_rest)), grads = jax.value_and_grad(pure, has_aux=True)(eff, rest)
    nnx.update(model, new_rest)
    return ((loss, aux) if has_aux else loss), grads
  return fn


def _value(x, count):
  return x(count) if callable(x) else x


def _check(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"Unknown {name} {value!r}; use one of {allowed}.")


def autoprune(learning_rate: ScalarOrSchedule, *,
              regularization: ScalarOrSchedule = 1e-4,
              regularization_scale: Mapping[str, float] | None = None,
              regularizer: str = "l1_step",
              surrogate: str = "softplus",
              slope: float = 0.1,
              rule: str = "decoupled",
              granularity: str = "weight",
              neuron_axis: str = "out",
              mask: Selector = DEFAULT_MASK,
              m_init: float = 0.2,
              m_init_rule: str = "constant",
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
    regularization_scale: per-layer multipliers of ``lambda_m`` (*not in the
      paper*): ``{pattern: factor}``, each pattern a regular expression searched in
      the pruned leaves' paths (as ``mask``); a leaf no pattern matches keeps
      factor 1. A pattern that matches no pruned leaf, a leaf matched by two
      patterns or a negative factor is an error.
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
      (path regex, predicate or collection of leaf paths; default every
      ``kernel``), or a boolean tree with the params' leaf paths. Paths are the
      same for Linen params and NNX state (``conv1/kernel``); a mask that selects
      nothing is an error listing the paths.
    m_init: initial value of every ``m`` (positive: every weight starts alive).
    m_init_rule: "constant" (default, the reference: every ``m`` starts at
      ``m_init``) or "magnitude" (*not in the paper*; weight granularity only):
      ``m = m_init * |w| / mean(|w|)`` over the leaf, so the gates of small weights
      start near zero and a weight that is exactly 0 starts masked.
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

  Example (Linen):
    >>> tx = optax.chain(autoprune(0.5, regularization=1e-4, weight_decay=5e-4),
    ...                  optax.sgd(0.05, momentum=0.9))
    >>> opt_state = tx.init(params)
    >>> def step(params, opt_state, x, y):
    ...   eff = effective_params(params, opt_state)
    ...   grads = jax.grad(lambda p: loss(model.apply({"params": p}, x), y))(eff)
    ...   updates, opt_state = tx.update(grads, opt_state, params)
    ...   return optax.apply_updates(params, updates), opt_state

  Example (NNX; the same transform, the forward on ``W * h(M)`` through
  :func:`autoprune_value_and_grad`):
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> @nnx.jit
    ... def step(model, optimizer, x, y):
    ...   value_and_grad = autoprune_value_and_grad(lambda m, x, y: loss(m(x), y))
    ...   loss_value, grads = value_and_grad(model, optimizer, x, y)   # dL/dT
    ...   optimizer.update(model, grads)
    ...   return loss_value
    >>> kept_fractions(nnx.state(model, nnx.Param), optimizer)  # {"fc1/kernel": 0.4, ...}
  """
  _check("surrogate", surrogate, SURROGATES)
  _check("rule", rule, RULES)
  _check("regularizer", regularizer, REGULARIZERS)
  _check("granularity", granularity, GRANULARITIES)
  _check("neuron_axis", neuron_axis, NEURON_AXES)
  _check("decay_on", decay_on, DECAY_TARGETS)
  _check("m_optimizer", m_optimizer, M_OPTIMIZERS)
  _check("m_init_rule", m_init_rule, M_INIT_RULES)
  if m_init_rule == "magnitude" and granularity != "weight":
    raise ValueError("m_init_rule='magnitude' scales one m per weight: it needs "
                     "granularity='weight'.")
  if m_optimizer == "adam":
    m_tx = optax.adam(learning_rate)
  else:
    m_tx = optax.sgd(learning_rate, momentum=m_momentum)

  scale = dict(regularization_scale or {})
  for pattern, factor in scale.items():
    if not factor >= 0:
      raise ValueError(f"regularization_scale[{pattern!r}] = {factor}: must be >= 0.")

  def mask_by_path(params):
    return dict(selection.named_leaves(selection.as_mask(params, mask)))

  def scale_by_path(sel) -> dict[str, float]:
    """``{pruned leaf path: multiplier of lambda_m}`` from ``regularization_scale``."""
    pruned = [p for p, s in sel.items() if s is not False]
    out, by = {p: 1.0 for p in pruned}, {}
    for pattern, factor in scale.items():
      hits = [p for p in pruned if re.search(pattern, p)]
      if not hits:
        raise ValueError(f"regularization_scale pattern {pattern!r} matches no pruned "
                         f"leaf; they are {selection.listing(pruned)}.")
      for p in hits:
        if p in by:
          raise ValueError(f"The leaf {p!r} is matched by two regularization_scale "
                           f"patterns, {by[p]!r} and {pattern!r}; give each leaf one.")
        out[p], by[p] = float(factor), pattern
    return out

  def init_m(w, selected):
    if selected is False:
      return jnp.ones((), jnp.float32)
    if granularity == "neuron":
      if jnp.ndim(w) < 2:
        raise ValueError("Neuron granularity needs kernels of rank >= 2; the mask "
                         f"selected a leaf of shape {jnp.shape(w)}.")
      if neuron_axis == "in":
        return jnp.full((jnp.shape(w)[-2], 1), m_init, jnp.float32)
      return jnp.full((jnp.shape(w)[-1],), m_init, jnp.float32)
    if m_init_rule == "magnitude":
      a = jnp.abs(jnp.asarray(w, jnp.float32))
      return m_init * a / jnp.maximum(jnp.mean(a), jnp.finfo(jnp.float32).tiny)
    return jnp.full(jnp.shape(w), m_init, jnp.float32)

  def init_fn(params):
    sel = mask_by_path(params)
    scale_by_path(sel)  # a bad pattern fails at init, before any training
    m = selection.map_with_path(lambda p, w: init_m(w, sel[p]), params)
    return AutoPruneState(count=jnp.zeros((), jnp.int32), m=m, m_opt_state=m_tx.init(m))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("autoprune needs params: call tx.update(grads, state, params).")
    sel = mask_by_path(params)
    lam_scale = scale_by_path(sel)
    lam = _value(regularization, state.count)
    wd = _value(weight_decay, state.count)
    w_by_path = dict(selection.named_leaves(params))
    g_by_path = dict(selection.named_leaves(updates))
    gate = _gate_fn(params, state, surrogate, slope)

    def weight_dir(g, w, hh):
      hh = hh.astype(g.dtype)
      d = g * hh  # dL/dW = dL/dT * h(M)
      decayed = w * hh if decay_on == "effective" else w
      return d + wd * decayed.astype(g.dtype)

    def m_grad(path, g, w, m, selected):
      if selected is False:
        return jnp.zeros_like(m)
      lam_leaf = lam * lam_scale[path]
      # Coarse gradient through the gate (§2): sign(w) (decoupled) or w (naive).
      d = g * (jnp.sign(w) if rule == "decoupled" else w)
      if jnp.shape(m) != jnp.shape(w):  # neuron: sum over the weights the unit's m gates
        padded = (1,) * (d.ndim - jnp.ndim(m)) + tuple(jnp.shape(m))
        axes = tuple(i for i, n in enumerate(padded) if n == 1 and d.shape[i] != 1)
        d = jnp.sum(d, axis=axes).reshape(jnp.shape(m))
      d = d.astype(jnp.float32)
      if regularizer == "l1_step":
        d = d + lam_leaf  # d(lambda * sum h(m))/dh, through the same surrogate
      _, vjp = jax.vjp(lambda mm: step_ste(mm, surrogate, slope), m)
      gm = vjp(d)[0]
      if regularizer == "l1":
        gm = gm + lam_leaf * jnp.sign(m)
      elif regularizer == "l2":
        gm = gm + lam_leaf * m
      return gm

    def leaf_dir(path, g):
      w = w_by_path[path]
      return weight_dir(g, w, gate(path, w))

    new_updates = selection.map_with_path(leaf_dir, updates)
    g_m = selection.map_with_path(
        lambda p, m: m_grad(p, g_by_path[p], w_by_path[p], m, sel[p]), state.m)
    m_updates, m_opt_state = m_tx.update(g_m, state.m_opt_state, state.m)
    m = optax.apply_updates(state.m, m_updates)
    return new_updates, AutoPruneState(count=optax.safe_increment(state.count), m=m,
                                       m_opt_state=m_opt_state)

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["AutoPruneState", "DEFAULT_MASK", "autoprune", "autoprune_value_and_grad",
           "effective_model", "effective_params", "find_state", "gates", "kept_fractions",
           "masks"]
