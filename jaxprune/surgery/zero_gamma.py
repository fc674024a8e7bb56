"""Physical channel removal on a params pytree, and the masked == shrunk check.

After ISTA (reference ista.md §4) a channel whose batch-norm gamma is exactly 0
outputs the constant ``relu(beta_c)``. :func:`shrink` removes such channels,
folds their constant into the consumer layer (subtracted from the running mean
of its BN, or added to its bias), removes the channels that became dead because
of that (a filter reading only removed inputs outputs a constant; a channel no
surviving filter reads is useless), repeats until nothing changes, and returns a
physically smaller network (the same module with explicit smaller widths) with
its gathered variables.

The fold is exact on interior pixels only: zero padding of the consumer conv pads
with 0 where the removed channel held ``relu(beta_c)``, so border pixels deviate
(the original code ignores this). :func:`check_equivalence` measures both.

Which channels may go is a property of the network, described by
:func:`structure`: the conv units whose output feeds exactly one chain of
consumers. In a ResNet the channels on the residual stream are tied across every
block of a stage by the additions, so (as the original does) only the units
*inside* a residual block are prunable: ``bn_a`` of a basic block, ``bn_a`` and
``bn_b`` of a bottleneck. In a plain conv stack (:class:`jaxprune.models.ConvNet`)
every conv unit is.

A layer whose channels all go keeps one *placeholder* channel (zero filter, BN
output 0, read with zero weights): a conv of width 0 is not a module, and the
placeholder computes exactly what the empty layer would.

The per-layer ISTA penalties (reference §2) and the gamma-W rescaling trick (§3)
live here as well because both read the same structure.
"""
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import flops
from jaxprune.errors import UserError
from jaxprune.models import layers
from jaxprune.models.convnet import ConvNet
from jaxprune.models.resnet import ResNet

_CONVS_PER_BLOCK = {"basic": 2, "bottleneck": 3}
_NORMS = (nn.BatchNorm, layers.BatchNorm)


@dataclasses.dataclass(frozen=True)
class Unit:
  """One conv/dense layer with its batch norm, as surgery sees it.

  Attributes:
    conv: module path of the conv or dense layer, e.g. ``stage0_block0/conv_a``.
    bn: module path of the batch norm after it, or None (a dense layer with bias).
    source: ``conv`` path of the prunable unit whose (activated, possibly pooled)
      output this layer reads, or None when it reads a tensor surgery never
      narrows (the image, a residual sum, a global pool of one).
    prunable: whether this unit's output channels may be removed.
    flatten: the layer is a dense layer reading ``source``'s output flattened
      (NHWC order).
    width_index: where this unit's width lives in the model's width list.
  """
  conv: str
  bn: str | None
  source: str | None = None
  prunable: bool = False
  flatten: bool = False
  width_index: int | None = None


def _resnet_structure(model: ResNet) -> list[Unit]:
  per_block = _CONVS_PER_BLOCK[model.block]
  units, offset = [], 1
  for s, (full, kept) in enumerate(zip(model.full_depths, model.blocks)):
    for b in range(kept):
      name = f"stage{s}_block{b}"
      first = offset + b * per_block
      letters = "abc"[:per_block]
      for i, letter in enumerate(letters):
        last = i == per_block - 1
        units.append(Unit(
            conv=f"{name}/conv_{letter}", bn=f"{name}/bn_{letter}",
            source=None if i == 0 else f"{name}/conv_{letters[i - 1]}",
            prunable=not last, width_index=first + i))
    offset += full * per_block
  return units


def _convnet_structure(model: ConvNet) -> list[Unit]:
  units, previous = [], None
  for i in range(len(model.features)):
    conv = f"conv{i + 1}"
    units.append(Unit(conv=conv, bn=f"bn{i + 1}", source=previous, prunable=True,
                      width_index=i))
    previous = conv
  dense = [f"fc{i + 1}" for i in range(len(model.hidden))] + ["classifier"]
  units.append(Unit(conv=dense[0], bn=None, source=previous, flatten=True))
  return units


def structure(model: nn.Module) -> list[Unit]:
  """The layers surgery reasons about: every prunable unit and its consumers.

  Args:
    model: a :class:`jaxprune.models.ResNet` (CIFAR or ImageNet layout, basic or
      bottleneck blocks) or a :class:`jaxprune.models.ConvNet` (plain conv stack).

  Returns:
    A list of :class:`Unit` in call order; layers that neither are prunable nor read
    a prunable unit are left out.

  Raises:
    UserError: for another kind of model.
  """
  if isinstance(model, ResNet):
    return _resnet_structure(model)
  if isinstance(model, ConvNet):
    return _convnet_structure(model)
  raise UserError(f"jaxprune.surgery understands ResNet and ConvNet models, not "
                  f"{type(model).__name__}; build the network with "
                  "jaxprune.models.cifar_resnet or jaxprune.models.convnet.")


def prunable_scales(model: nn.Module) -> list[str]:
  """Param paths of the BN scales ISTA sparsifies, e.g. ``stage0_block0/bn_a/scale``."""
  return [f"{u.bn}/scale" for u in structure(model) if u.prunable]


def _consumers(units: Sequence[Unit]) -> dict[str, list[Unit]]:
  out = {u.conv: [] for u in units if u.prunable}
  for u in units:
    if u.source is not None:
      out[u.source].append(u)
  return out


# ---------------------------------------------------------------------------------
# Per-layer penalty (reference §2) and the gamma-W rescaling trick (§3).


def ista_rho(model: nn.Module, variables: Mapping[str, Any],
             input_shape: Sequence[int]) -> dict[str, float]:
  """Per-layer ISTA penalties rho_l from the network's structure (memory priority, §2).

  ``rho_l = (H_out * W_out + k_h * k_w * C_in + sum_{l' reads l} k'_h * k'_w * C_out(l'))
  / (H_img * W_img)``, with layer geometry from :func:`jaxprune.flops.count_layers`.
  A dense consumer reading a flattened conv output counts its spatial positions
  as its kernel taps (each channel meets ``positions * C_out`` weights).

  Args:
    model: a model :func:`structure` understands.
    variables: its variables (concrete or abstract).
    input_shape: one example's shape, e.g. (32, 32, 3).

  Returns:
    ``{bn scale path: rho_l}`` for every prunable unit, ready for
    ``optim.ista(..., rho=...)``. For the CIFAR ResNet-20 the values are 1.28125
    (stage 1), 0.671875 / 0.8125 (stage 2 first / other blocks) and 0.90625 / 1.1875
    (stage 3).
  """
  records = {r["name"]: r for r in flops.count_layers(model, variables, input_shape)}
  units = structure(model)
  consumers = _consumers(units)
  image_area = math.prod(input_shape[:2])
  rho = {}
  for u in units:
    if not u.prunable:
      continue
    r = records[u.conv]
    positions = math.prod(r["out_shape"][1:-1])
    total = positions + math.prod(r["kernel_shape"][:-1])
    for v in consumers[u.conv]:
      rv = records[v.conv]
      if v.flatten:
        taps = rv["kernel_shape"][0] // r["out_shape"][-1]
      else:
        taps = math.prod(rv["kernel_shape"][:-2])
      total += taps * rv["kernel_shape"][-1]
    rho[f"{u.bn}/scale"] = total / image_area
  return rho


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _set(tree, path, value):
  parts = path.split("/")
  for part in parts[:-1]:
    tree = tree[part]
  tree[parts[-1]] = value


def _to_numpy(tree):
  """A mutable nested-dict copy of ``tree`` with float64 numpy leaves."""
  if isinstance(tree, Mapping):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.array(jax.device_get(tree), dtype=np.float64)


def _input_axis_view(kernel, unit: Unit, source_width: int):
  """``kernel`` viewed as (taps, C_in, C_out) over its source's channels."""
  if unit.flatten:
    return kernel.reshape(-1, source_width, kernel.shape[-1])
  return kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1])


def rescale_gamma(model: nn.Module, variables: Mapping[str, Any],
                  alpha: float | Mapping[str, float]) -> dict:
  """The gamma-W rescaling trick (§3): gamma, beta * alpha, consumer weights / alpha.

  With a ReLU (and max pooling) between a prunable BN and its consumers,
  ``relu(alpha * x) = alpha * relu(x)`` for alpha > 0, so the network function is
  unchanged. alpha < 1 speeds up the sparsification of a pre-trained network;
  :func:`rescale_gamma` with ``1 / alpha`` undoes it after pruning.

  Args:
    model: a model :func:`structure` understands.
    variables: its variables.
    alpha: one positive factor, or ``{bn scale path: factor}`` per prunable unit.

  Returns:
    New variables (numpy float32 leaves) with the same tree structure.
  """
  units = structure(model)
  consumers = _consumers(units)
  params = _to_numpy(variables["params"])
  for u in units:
    if not u.prunable:
      continue
    a = alpha.get(f"{u.bn}/scale", 1.0) if isinstance(alpha, Mapping) else alpha
    if not a > 0:
      raise UserError(f"rescale_gamma needs alpha > 0 (ReLU is only positively "
                      f"homogeneous); got {a} for {u.bn}.")
    bn = _get(params, u.bn)
    bn["scale"] = bn["scale"] * a
    bn["bias"] = bn["bias"] * a
    width = bn["scale"].shape[0]
    for v in consumers[u.conv]:
      layer = _get(params, v.conv)
      view = _input_axis_view(layer["kernel"], v, width) / a
      layer["kernel"] = view.reshape(layer["kernel"].shape)
  out = dict(variables)
  out["params"] = jax.tree.map(lambda x: x.astype(np.float32), params)
  return out


# ---------------------------------------------------------------------------------
# Channel removal (§4).


@dataclasses.dataclass
class Shrunk:
  """The result of :func:`shrink`.

  Attributes:
    model: the physically smaller module (same class, explicit widths).
    variables: its variables (numpy float32 leaves).
    kept: ``{unit conv path: original indices of the surviving channels}`` for
      every prunable unit (empty when only the placeholder is left).
    units: the :func:`structure` of the original model.
    widths_before, widths_after: channels of each prunable unit (a placeholder
      counts as 0 after).
    rounds: passes of the recursive dead-channel removal until nothing changed.
    cascaded: units with channels that became constant only because all their
      inputs were removed; their constant is exact on the interior of their own
      conv, so their consumers inherit a wider border deviation.
  """
  model: nn.Module
  variables: dict
  kept: dict[str, np.ndarray]
  units: list[Unit]
  widths_before: dict[str, int]
  widths_after: dict[str, int]
  rounds: int
  cascaded: list[str] = dataclasses.field(default_factory=list)

  @property
  def removed_fraction(self) -> float:
    """Removed channels / prunable channels."""
    before = sum(self.widths_before.values())
    return 1 - sum(self.widths_after.values()) / max(before, 1)


def shrink(model: nn.Module, variables: Mapping[str, Any],
           input_shape: Sequence[int] | None = None, *,
           fold_constants: bool = True) -> Shrunk:
  """Removes exactly-zero-gamma channels and the channels they make dead (§4).

  A channel of a prunable unit goes when (repeated until nothing changes):
  its gamma is exactly 0 (the channel outputs ``relu(beta_c)``); or its filter
  reads only removed inputs (it outputs a constant too); or no surviving
  filter of any consumer reads it. A constant channel's value ``v_c`` is folded
  into each consumer: ``sum_{kh,kw} W[kh, kw, c, :] * v_c`` (per spatial position
  for a dense layer reading a flattened map) is subtracted from the running mean
  of the consumer's BN, or added to its bias.

  Args:
    model: a model :func:`structure` understands.
    variables: its variables with ``params`` and ``batch_stats``.
    input_shape: one example's shape, e.g. (32, 32, 3); when given, the smaller
      module is initialised abstractly to check the gathered shapes.
    fold_constants: False drops constant channels without folding (to measure
      what the fold buys).

  Returns:
    A :class:`Shrunk`. ``shrunk.model.apply(shrunk.variables, x, train=False)``
    equals the original on interior pixels (see :func:`check_equivalence`).

  Example:
    >>> small = surgery.shrink(model, variables)
    >>> small.model.widths, small.removed_fraction
  """
  units = structure(model)
  consumers = _consumers(units)
  params = _to_numpy(variables["params"])
  stats = _to_numpy(variables.get("batch_stats", {}))
  prunable = [u for u in units if u.prunable]
  width = {u.conv: _get(params, u.bn)["scale"].shape[0] for u in prunable}
  alive = {u.conv: np.ones(width[u.conv], bool) for u in prunable}

  def bn_out_at_zero_input(u, eps=1e-5):
    """relu(BN(x0)) per channel where the conv output x0 is a constant."""
    bn, st = _get(params, u.bn), _get(stats, u.bn)
    layer = _get(params, u.conv)
    x0 = layer["bias"] if "bias" in layer else 0.0
    mul = bn["scale"] / np.sqrt(st["var"] + eps)
    return np.maximum(bn["bias"] + mul * (x0 - st["mean"]), 0.0)

  def live_inputs(u):
    """Boolean mask over u's kernel input channels that still exist."""
    kernel = _get(params, u.conv)["kernel"]
    if u.source is None:
      return np.ones(kernel.shape[-2], bool)
    return alive[u.source]

  cascaded = set()
  rounds = 0
  while True:
    rounds += 1
    changed = False
    for u in prunable:
      kernel = _get(params, u.conv)["kernel"]
      view = _input_axis_view(kernel, u, live_inputs(u).size)
      gamma = _get(params, u.bn)["scale"]
      empty_filter = ~np.any(view[:, live_inputs(u), :] != 0, axis=(0, 1))
      constant = (gamma == 0) | empty_filter
      unread = np.ones(width[u.conv], bool)
      for v in consumers[u.conv]:
        vview = _input_axis_view(_get(params, v.conv)["kernel"], v, width[u.conv])
        outs = alive[v.conv] if v.prunable else np.ones(vview.shape[-1], bool)
        unread &= ~np.any(vview[:, :, outs] != 0, axis=(0, 2))
      dead = alive[u.conv] & (constant | unread)
      if not dead.any():
        continue
      changed = True
      value = np.where(constant & dead, bn_out_at_zero_input(u), 0.0)
      if np.any(dead & constant & (gamma != 0) & (value != 0)):
        cascaded.add(u.conv)
      for v in consumers[u.conv]:
        layer = _get(params, v.conv)
        vview = _input_axis_view(layer["kernel"], v, width[u.conv])
        if fold_constants:
          contribution = np.einsum("tco,c->o", vview, value)
          if v.bn is not None:
            _get(stats, v.bn)["mean"] -= contribution
          else:
            layer["bias"] = layer["bias"] + contribution
        vview = vview.copy()
        vview[:, dead, :] = 0.0
        layer["kernel"] = vview.reshape(layer["kernel"].shape)
      alive[u.conv] &= ~dead
    if not changed:
      break

  kept = {c: np.flatnonzero(a) for c, a in alive.items()}
  new_params = _gather(params, units, consumers, kept, width)
  new_stats = _gather_stats(stats, units, kept)
  small = _smaller_model(model, units, kept)
  out_vars = dict(variables)
  out_vars["params"] = jax.tree.map(lambda x: np.asarray(x, np.float32), new_params)
  if "batch_stats" in variables:
    out_vars["batch_stats"] = jax.tree.map(lambda x: np.asarray(x, np.float32), new_stats)
  if input_shape is not None:
    _check_shapes(small, out_vars, input_shape)
  return Shrunk(model=small, variables=out_vars, kept=kept, units=units,
                widths_before=dict(width),
                widths_after={c: int(k.size) for c, k in kept.items()}, rounds=rounds,
                cascaded=sorted(cascaded))


def _take(x, idx, axis):
  """Gathers ``idx`` on ``axis``; an empty ``idx`` gives the zero placeholder."""
  if idx.size:
    return np.take(x, idx, axis=axis)
  shape = list(x.shape)
  shape[axis] = 1
  return np.zeros(shape, x.dtype)


def _gather(params, units, consumers, kept, width):
  params = jax.tree.map(lambda x: x, params)  # a structural copy
  for u in units:
    if not u.prunable:
      continue
    idx = kept[u.conv]
    layer = _get(params, u.conv)
    layer["kernel"] = _take(layer["kernel"], idx, -1)
    if "bias" in layer:
      layer["bias"] = _take(layer["bias"], idx, 0)
    bn = _get(params, u.bn)
    bn["scale"] = _take(bn["scale"], idx, 0)
    bn["bias"] = _take(bn["bias"], idx, 0)
    for v in consumers[u.conv]:
      vlayer = _get(params, v.conv)
      k = vlayer["kernel"]
      if v.flatten:
        view = k.reshape(-1, width[u.conv], k.shape[-1])
        vlayer["kernel"] = _take(view, idx, 1).reshape(-1, k.shape[-1])
      else:
        vlayer["kernel"] = _take(k, idx, -2)
  return params


def _gather_stats(stats, units, kept):
  stats = jax.tree.map(lambda x: x, stats)
  for u in units:
    if u.prunable and u.bn is not None:
      st = _get(stats, u.bn)
      idx = kept[u.conv]
      st["mean"] = _take(st["mean"], idx, 0)
      st["var"] = _take(st["var"], idx, 0) if idx.size else np.ones((1,))
  return stats


def _smaller_model(model, units, kept):
  if isinstance(model, ResNet):
    widths = list(model.widths)
    for u in units:
      if u.prunable:
        widths[u.width_index] = max(int(kept[u.conv].size), 1)
    return model.clone(widths=tuple(widths))
  features = list(model.features)
  for u in units:
    if u.prunable:
      features[u.width_index] = max(int(kept[u.conv].size), 1)
  return model.clone(features=tuple(features))


def _check_shapes(model, variables, input_shape):
  """Guards against a gather bug: the smaller module must accept the variables."""
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
  want = jax.tree.map(lambda x: x.shape, {k: abstract[k] for k in variables})
  got = jax.tree.map(lambda x: np.shape(x), dict(variables))
  if want != got:
    raise AssertionError(f"surgery produced variables that do not fit {model}: "
                         f"{got} vs {want}")


# ---------------------------------------------------------------------------------
# masked == shrunk check.


def _conv_interior(module, in_shape, out_shape):
  """Boolean (H_out, W_out) mask of outputs whose window avoids the zero padding."""
  k = module.kernel_size
  strides = module.strides or (1, 1)
  strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
  padding = module.padding
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(in_shape[1:3], k, strides, padding)
  masks = []
  for axis in range(2):
    i = np.arange(out_shape[1 + axis])
    start = i * strides[axis] - padding[axis][0]
    masks.append((start >= 0) & (start + k[axis] - 1 <= in_shape[1 + axis] - 1))
  return masks[0][:, None] & masks[1][None, :]


def check_equivalence(model: nn.Module, variables: Mapping[str, Any], shrunk: Shrunk,
                      probe: jax.Array) -> dict[str, float]:
  """Compares the masked (original, zero gammas) and the shrunk network on ``probe``.

  Two comparisons:
  - layer by layer: every conv/dense of the shrunk network is fed the masked
    network's input to that layer (restricted to the surviving channels) and its
    BN (or dense) output is compared with the masked one on the surviving channels,
    separately on interior pixels (the conv window avoids the zero padding: the
    fold is exact there) and border pixels (padding meets a folded constant;
    every pixel of a layer reading a ``shrunk.cascaded`` unit counts as border);
  - end to end: the logits of both networks run freely.

  Args:
    model: the original model.
    variables: its variables (the masked network: zero gammas, full widths).
    shrunk: the result of :func:`shrink` on them.
    probe: a batch of images (N, H, W, C).

  Returns:
    ``interior_max_abs_diff`` and ``border_max_abs_diff`` (over every layer),
    ``activation_max_abs`` (scale of those outputs), ``logits_max_abs_diff``,
    ``logits_max_abs`` and ``argmax_agreement`` (fraction of probe images with
    the same predicted class).
  """
  units = structure(model)
  by_conv = {u.conv: u for u in units}
  conv_of_bn = {u.bn: u.conv for u in units if u.bn is not None}
  kept = shrunk.kept
  width = shrunk.widths_before
  conv_inputs, outputs, geometry = {}, {}, {}

  def path_of(module):
    return "/".join(str(p) for p in module.path)

  def record(next_fun, args, kwargs, context):
    module = context.module
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      name = path_of(module)
      if isinstance(module, (nn.Conv, nn.Dense)):
        conv_inputs[name] = args[0]
        if isinstance(module, nn.Conv):
          geometry[name] = _conv_interior(module, args[0].shape, out.shape)
        if isinstance(module, nn.Dense):
          outputs[name] = out
      elif isinstance(module, _NORMS):
        outputs[name] = out
    return out

  with nn.intercept_methods(record):
    logits = model.apply(variables, probe, train=False)

  fed_outputs = {}

  def feed(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    name = path_of(module)
    if isinstance(module, (nn.Conv, nn.Dense)) and name in conv_inputs:
      x = conv_inputs[name]
      u = by_conv.get(name)
      if u is not None and u.source is not None:
        idx = kept[u.source]
        c = width[u.source]
        if u.flatten:
          x = x.reshape(x.shape[0], -1, c)
          x = (x[..., idx] if idx.size else jnp.zeros(x.shape[:2] + (1,), x.dtype))
          x = x.reshape(x.shape[0], -1)
        else:
          x = x[..., idx] if idx.size else jnp.zeros(x.shape[:-1] + (1,), x.dtype)
      args = (x,) + tuple(args[1:])
    out = next_fun(*args, **kwargs)
    if isinstance(module, (nn.Dense,) + _NORMS):
      fed_outputs[name] = out
    return out

  with nn.intercept_methods(feed):
    shrunk.model.apply(shrunk.variables, probe, train=False)
  small_logits = shrunk.model.apply(shrunk.variables, probe, train=False)

  interior, border, scale = 0.0, 0.0, 0.0
  for name, masked in outputs.items():
    if name not in fed_outputs:
      continue
    # A norm's numbers are its conv's: stem_bn -> stem_conv, bn_a -> conv_a.
    owner = name.rsplit("/", 1)
    conv = name if name in conv_inputs else conv_of_bn.get(name, "/".join(
        owner[:-1] + [owner[-1].replace("bn", "conv")]))
    u = by_conv.get(conv)
    if u is not None and u.prunable:
      idx = kept[conv]
      if not idx.size:
        continue
      masked = masked[..., idx]
    fed = fed_outputs[name]
    near_cascade = u is not None and u.source in shrunk.cascaded
    diff = np.abs(np.asarray(masked, np.float64) - np.asarray(fed, np.float64))
    scale = max(scale, float(np.abs(np.asarray(masked)).max()))
    if near_cascade:
      border = max(border, float(diff.max()))
    elif diff.ndim == 4 and conv in geometry:
      inner = geometry[conv]
      interior = max(interior, float(diff[:, inner].max()) if inner.any() else 0.0)
      if (~inner).any():
        border = max(border, float(diff[:, ~inner].max()))
    else:
      interior = max(interior, float(diff.max()))
  logits, small_logits = np.asarray(logits), np.asarray(small_logits)
  return {"interior_max_abs_diff": interior, "border_max_abs_diff": border,
          "activation_max_abs": scale,
          "logits_max_abs_diff": float(np.abs(logits - small_logits).max()),
          "logits_max_abs": float(np.abs(logits).max()),
          "argmax_agreement": float(np.mean(logits.argmax(-1) ==
                                            small_logits.argmax(-1)))}


__all__ = ["Unit", "structure", "prunable_scales", "ista_rho", "rescale_gamma",
           "Shrunk", "shrink", "check_equivalence"]


def ista_scales(model, variables, input_shape: Sequence[int], call=None) -> list[str]:
  """Norm scales ISTA may sparsify in any model, by the dependency graph.

  The rule: a norm scale (a 1-D ``.../scale`` parameter of a channel group) is
  selected when its group is prunable and has exactly one producer, i.e. the
  normalised channels are not tied to another layer's by a residual add or a
  shared consumer (a zero gamma there would not make a channel removable), and
  when it is not zero everywhere already (zero-initialised residual gammas).
  For jaxprune's ResNets this gives :func:`prunable_scales`.

  Returns:
    Param-tree paths (no collection), e.g. ``stage0_block0/bn_a/scale``, for
    ``optim.ista(..., mask=...)`` or ``rho``.
  """
  from jaxprune import graph as graph_lib  # surgery builds on the graph
  g = graph_lib.trace(model, variables, input_shape, call)
  values = graph_lib.named_leaves(model, variables)
  is_param = dict(zip(g.traced.paths, g.traced.is_param))
  out = []
  for group in g.prunable():
    if len(group.producers) != 1:
      continue
    for m in group.members:
      if (is_param[m.path] and m.path.endswith("/scale") and np.ndim(values[m.path]) == 1
          and np.any(np.asarray(values[m.path]) != 0)):
        out.append(m.path.split("/", 1)[1] if m.path.startswith("params/") else m.path)
  return sorted(out)
