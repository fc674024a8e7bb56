"""The dedicated TAS search space: :class:`ResNetSpace` over the official supernet
(:class:`jaxprune.models.TASResNet`), its FLOPs costs (tas.md §5) and the searched
shapes the authors released (§10)."""
from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
import functools
import importlib.resources
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import flops
from jaxprune.errors import UserError
from jaxprune.graph.tracing import example_shape

RELEASED_SHAPES = "resources/tas_released_shapes.json"  # in the jaxprune package


def _positions(record):
  """Output positions (H_out * W_out) of a conv record."""
  return math.prod(record["out_shape"][1:-1])


def _taps(record):
  """Kernel taps (k_h * k_w) of a conv record."""
  return math.prod(record["kernel_shape"][:-2])


@functools.lru_cache(maxsize=32)
def _geometry(model, batch_shape):
  """Layer geometry of a TASResNet, from the FLOPs counter run on its standard network.

  Returns a dict: ``in_channels``; ``stem`` = (taps, positions); ``blocks`` =
  one dict per block of the full-depth network, in order, with ``stage``,
  ``position`` (1-based within the stage), ``convs`` [(taps, positions)],
  ``shortcut`` (the search network has a shortcut conv: the standard one has)
  and ``strided`` (the block changes the spatial size); ``classifier`` = its
  (num_classes, bias_adds).
  """
  plain = model.plain_network()
  variables = jax.eval_shape(
      plain.init, jax.random.key(0),
      jax.ShapeDtypeStruct(batch_shape, jnp.float32))
  records = {r["name"]: r for r in flops.count_layers(plain, variables, batch_shape,
                                                      batched=True)}
  stem = records["stem_conv"]
  blocks = []
  letters = "abc"[:model.convs_per_block]
  for s, n in enumerate(model.full_depths):
    for b in range(n):
      name = f"stage{s}_block{b}"
      convs = [records[f"{name}/conv_{letter}"] for letter in letters]
      # From the block's own input: the ImageNet stem's max pool sits between
      # the stem conv and the first block.
      in_positions = math.prod(convs[0]["in_shape"][1:-1])
      blocks.append({
          "stage": s, "position": b + 1,
          "convs": [(_taps(r), _positions(r)) for r in convs],
          "shortcut": f"{name}/shortcut_conv" in records,
          "strided": _positions(convs[-1]) != in_positions,
      })
  classifier = records["classifier"]
  return {"in_channels": batch_shape[-1],
          "stem": (_taps(stem), _positions(stem)),
          "blocks": blocks,
          "classifier": (classifier["kernel_shape"][-1],
                         classifier["bias_adds"])}


def _stem_cost(geometry, width):
  """The stem conv's MACs at output ``width`` (a number or a traced scalar)."""
  taps, positions = geometry["stem"]
  return taps * geometry["in_channels"] * width * positions


def _convs_cost(block, c_in, widths, index):
  """``(MACs, output width, next index)`` of a block's convs in order, the first fed
  ``c_in`` channels, conv ``j`` producing ``widths[index + j]``."""
  cost = 0.0
  for taps, positions in block["convs"]:
    cost += taps * c_in * widths[index] * positions
    c_in, index = widths[index], index + 1
  return cost, c_in, index


def _reach_probabilities(probs, choices, position):
  """P(sampled depth >= position): reverse cumulative sum of `probs` (§5)."""
  reach = jnp.cumsum(probs[::-1])[::-1]
  return reach[bisect.bisect_left(list(choices), position)]


def tas_expected_cost(model, arch_params: Mapping[str, Any],
                      input_shape: Sequence[int]) -> jax.Array:
  """Expected FLOPs E_cost of a TASResNet (tas.md §5), differentiable.

  Per conv ``E[c_out] = sum_j softmax(alpha)_j * C_j`` (plain softmax, no
  Gumbel noise) and ``E[c_in]`` is the previous conv's ``E[c_out]`` in the
  full-depth order (the input channels for the stem); a conv costs
  ``k_h * k_w * E[c_in] * E[c_out] * H_out * W_out``. A block's cost is
  multiplied by the probability that the sampled depth reaches it, the reverse
  cumulative sum of ``softmax(beta)`` at the smallest depth candidate >= the
  block's position. The classifier adds ``E[c_last] * num_classes`` (no bias
  add, as in the official code). A block's shortcut conv enters where the
  search network has one (the standard network's shortcut convs), with
  ``E[c_in]`` of the block's input and ``E[c_out]`` of its last conv, inside
  the block's depth-weighted cost, as in the official ``get_flops`` of a
  searchable block. It is a product of expectations, not the exact expected
  FLOPs.

  Args:
    model: a :class:`jaxprune.models.TASResNet`.
    arch_params: its ``arch`` collection (may be traced).
    input_shape: one example's shape, e.g. (32, 32, 3).

  Returns:
    A float32 scalar (FLOPs per example); jit- and grad-safe in `arch_params`.
  """
  geometry = _geometry(model, example_shape(input_shape, None))
  e_out = [jax.nn.softmax(jnp.asarray(a, jnp.float32)) @
           jnp.asarray(c, jnp.float32)
           for a, c in zip(model.width_logits(arch_params),
                           model.conv_candidates())]
  depth_probs = [jax.nn.softmax(jnp.asarray(b, jnp.float32))
                 for b in model.depth_logits(arch_params)]
  choices = model.stage_candidates()

  cost = _stem_cost(geometry, e_out[0])
  e_in, index = e_out[0], 1
  for block in geometry["blocks"]:
    block_in = e_in
    block_cost, e_in, index = _convs_cost(block, e_in, e_out, index)
    if block["shortcut"]:
      block_cost += block_in * e_in * block["convs"][-1][1]
    s = block["stage"]
    cost += _reach_probabilities(depth_probs[s], choices[s],
                                 block["position"]) * block_cost
  num_classes, _ = geometry["classifier"]
  return cost + e_in * num_classes


@functools.lru_cache(maxsize=256)
def _cached_flops(model, batch_shape):
  variables = jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct(batch_shape, jnp.float32))
  return flops.count(model, variables, batch_shape, batched=True)["flops"]


def tas_argmax_cost(model, arch_params: Mapping[str, Any],
                    input_shape: Sequence[int]) -> int:
  """F_cost: exact FLOPs of the argmax architecture (tas.md §5), on the host.

  The :func:`jaxprune.flops.count` of ``model.derived_network(arch_params)``, the
  plain ResNet of the argmax width of every conv and argmax depth of every stage,
  with the 1x1 shortcut convs it needs (cached per shape). Not jit-safe: pass
  the number into a jitted step, or use :func:`tas_argmax_cost_traced` inside
  one. (The official code's estimate instead keeps the search network's
  shortcuts and its full-depth input widths.)

  Args:
    model: a :class:`jaxprune.models.TASResNet`.
    arch_params: its ``arch`` collection (concrete arrays).
    input_shape: one example's shape, e.g. (32, 32, 3).

  Returns:
    FLOPs per example, an int.
  """
  return _cached_flops(model.derived_network(arch_params),
                       example_shape(input_shape, None))


def tas_argmax_cost_traced(model, arch_params: Mapping[str, Any],
                           input_shape: Sequence[int]) -> jax.Array:
  """F_cost of :func:`tas_argmax_cost` as a jit-safe float32 scalar.

  The same number computed from traced argmaxes: each kept block costs its
  convs at the argmax widths, fed by the output width of the last kept block,
  plus a 1x1 shortcut conv where the derived network has one (stride 2 or an
  input width that differs from the block's output width); the classifier
  reads the last kept block's width and adds its bias. Equal to the exact count
  up to float32 rounding. Not differentiable (argmax).
  """
  geometry = _geometry(model, example_shape(input_shape, None))
  widths = [jnp.asarray(c, jnp.float32)[jnp.argmax(a)]
            for a, c in zip(model.width_logits(arch_params),
                            model.conv_candidates())]
  blocks = [jnp.asarray(c)[jnp.argmax(b)]
            for b, c in zip(model.depth_logits(arch_params),
                            model.stage_candidates())]

  cost = _stem_cost(geometry, widths[0])
  current, index = widths[0], 1
  for block in geometry["blocks"]:
    block_cost, c_in, index = _convs_cost(block, current, widths, index)
    needs_shortcut = block["strided"] or (current != c_in)
    block_cost += jnp.where(needs_shortcut,
                            current * c_in * block["convs"][-1][1], 0.0)
    kept = block["position"] <= blocks[block["stage"]]
    cost += jnp.where(kept, block_cost, 0.0)
    current = jnp.where(kept, c_in, current)
  num_classes, bias_adds = geometry["classifier"]
  return cost + current * num_classes + bias_adds


class ResNetSpace:
  """The dedicated search space (a :class:`jaxprune.search.Space`): a
  :class:`jaxprune.models.TASResNet`, the official supernet (a width per conv with
  per-candidate BN, a depth per stage).

  Args:
    model: the TASResNet (e.g. ``models.tas_cifar_resnet(20)``).
    input_shape: one example's shape, e.g. (32, 32, 3).
    round_to: the supernet's width candidates rounded up to its multiples (the model's
      ``round_to``, :class:`jaxprune.models.TASResNet`; ``None`` keeps the model's): the
      search prices and derives rounded widths, so the derived network's FLOPs are the
      searched ones.
    target_ratio: the search's FLOPs ratio, given when ``round_to`` is the backend's
      default: convs not wider than it are then kept whole (``whole``: their names) while
      some conv is wider and the others' smallest candidates at every stage's smallest
      depth still reach the ratio (the rule of the graph space and of
      :func:`jaxprune.surgery.prune_to`'s default: on the vectors that chose the default,
      a narrower such conv saves FLOPs, not time).
  """
  kind = "resnet"

  def __init__(self, model, input_shape, round_to: int | None = None,
               target_ratio: float | None = None):
    if round_to is not None and round_to != model.round_to:
      model = model.clone(round_to=round_to)
    self.input_shape = tuple(input_shape)
    plain = model.plain_network()
    self.flops_max = flops.count(plain, jax.eval_shape(
        lambda: plain.init(jax.random.key(0), jnp.zeros((1, *input_shape)))),
                                 input_shape)["flops"]
    if target_ratio is not None:
      model = model.clone(whole=self._narrow_whole(model, target_ratio))
    self.model = model
    self.round_to = model.round_to
    names = ["/".join(p) for p in model.conv_paths()]
    self.whole = [names[i] for i in model.whole]

  def _narrow_whole(self, model, ratio: float) -> tuple[int, ...]:
    """Indices of the convs not wider than ``round_to`` when some conv is wider and the
    others' smallest candidates at the smallest depths reach ``ratio`` of the FLOPs;
    else none."""
    full = model.full_widths()
    narrow = tuple(i for i, c in enumerate(full) if c <= model.round_to)
    if not narrow or len(narrow) == len(full):
      return ()
    smallest = [c if i in narrow else c_min for i, (c, c_min) in
                enumerate(zip(full, (min(c) for c in model.conv_candidates())))]
    blocks = [min(c) for c in model.stage_candidates()]
    cost = _cached_flops(model.plain_network(widths=smallest, blocks=blocks),
                         example_shape(self.input_shape, None))
    return narrow if cost <= ratio * self.flops_max * (1 + 1e-12) else ()

  def init(self, key):
    """``(params, model_state, arch)`` of a fresh search."""
    pkey, skey = jax.random.split(key)
    variables = dict(self.model.init({"params": pkey}, jnp.zeros((1, *self.input_shape)),
                                     train=False, tau=1.0, key=skey))
    params, arch = variables.pop("params"), variables.pop("arch")
    return params, variables, arch

  def forward(self, params, model_state, arch, x, tau, key):
    logits, updates = self.model.apply({"params": params, **model_state, "arch": arch},
                                       x, train=True, tau=tau, key=key,
                                       mutable=list(model_state))
    return logits, {**model_state, **updates}

  def expected_cost(self, arch):
    return tas_expected_cost(self.model, arch, self.input_shape)

  def argmax_cost(self, arch):
    return tas_argmax_cost_traced(self.model, arch, self.input_shape)

  def record(self, arch) -> dict:
    model = self.model
    derived = model.derive(arch)
    return {
        "expected_flops": float(self.expected_cost(arch)),
        "argmax_flops": int(tas_argmax_cost(model, arch, self.input_shape)),
        "width_candidates": [list(c) for c in model.conv_candidates()],
        "width_probs": [np.asarray(jax.nn.softmax(a)).tolist()
                        for a in model.width_logits(arch)],
        "depth_candidates": [list(c) for c in model.stage_candidates()],
        "depth_probs": [np.asarray(jax.nn.softmax(b)).tolist()
                        for b in model.depth_logits(arch)],
        "argmax_widths": derived["widths"], "argmax_blocks": derived["blocks"],
        "conv_names": ["/".join(p) for p in model.conv_paths()],
        "whole_convs": list(self.whole)}

  def derived_from(self, record: Mapping[str, Any]):
    """The derived plain ResNet of a history record (§7): its argmax widths and depths,
    as searched (the candidates carry the rounding)."""
    widths = [int(w) for w in record["argmax_widths"]]
    derived = {"widths": widths, "blocks": [int(b) for b in record["argmax_blocks"]]}
    model = self.model.plain_network(widths=widths, blocks=derived["blocks"],
                                     dtype=self.model.dtype)
    return model, derived


def _released_shapes_text(path: str) -> tuple[str, str]:
  """The released-shapes JSON (the package's copy when ``path`` is empty) and its name."""
  if not path:
    resource = importlib.resources.files("jaxprune").joinpath(RELEASED_SHAPES)
    return resource.read_text(encoding="utf-8"), f"jaxprune/{RELEASED_SHAPES}"
  if not os.path.exists(path):
    raise UserError(f"No released-shapes file at {path}; set "
                    "--config.tas.released_shapes_file to a tas_released_shapes.json, or "
                    "leave it empty for the copy that ships with jaxprune.")
  with open(path, encoding="utf-8") as f:
    return f.read(), path


def released_shape(path: str, name: str) -> dict:
  """One of the searched shapes the TAS authors released, from their JSON (§10);
  ``path`` "" reads the copy in the package."""
  text, where = _released_shapes_text(path)
  try:
    shapes = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
  except (json.JSONDecodeError, AttributeError) as e:
    raise UserError(f"{where} is not a released-shapes JSON ({e}).") from None
  if name not in shapes:
    raise UserError(f"Unknown released shape {name!r}; known: {', '.join(sorted(shapes))}.")
  return shapes[name]


def released_depth(shape: Mapping[str, Any]) -> int:
  """The ResNet depth of a released shape (ImageNet entries list blocks per stage)."""
  if "depth" in shape:
    return shape["depth"]
  per_block = 3 if shape.get("block_name") == "Bottleneck" else 2
  return per_block * sum(shape["layers"]) + 2


__all__ = ["RELEASED_SHAPES", "ResNetSpace", "released_depth", "released_shape",
           "tas_argmax_cost", "tas_argmax_cost_traced", "tas_expected_cost"]
