"""Analytic FLOPs and parameter counts of any model, from the jaxpr of its forward pass.

One counter serves every model in jaxprune and any model a user brings, Linen,
NNX or a pure function: the forward pass on one example is traced once
(:func:`jaxprune.graph.trace_jaxpr`, no arithmetic is run) and the same walk that
builds the channel dependency graph records every ``conv_general_dilated`` and
``dot_general`` with its multiply-accumulates, and every add of a parameter to
one's result (a bias add). The convention is the official TAS counter's (tas.md
§5): FLOPs are multiply-accumulates of convolutions and matrix products plus one
add per output element of a bias add (dead code -- values the outputs do not
depend on -- left out); batch norm, activations, pooling and
residual adds are not counted. Products between activations (attention's q.k and
attn.v) are matrix products and count. Numbers are per example.

This module must not hold per-architecture tables: a pruned or searched network
is counted by building it and tracing it like any other. The TAS costs (tas.md
§5) read their layer geometry (kernel sizes, output positions) from this counter
run on the standard network, and their widths from the architecture parameters.
"""

import bisect
from collections.abc import Callable, Mapping, Sequence
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UserError
from jaxprune.graph import group as graph_group
from jaxprune.graph.propagate import LoopCountWarning
from jaxprune.graph.tracing import example_shape, trace_jaxpr


def _example_batch(input_shape: Sequence[int], batched: bool | None):
  return example_shape(input_shape, batched)


def count_layers(model, variables, input_shape: Any, call: Callable | None = None,
                 *, batched: bool | None = None,
                 dtype: Any = jnp.float32) -> list[dict[str, Any]]:
  """Per-op FLOPs of every conv and matrix product, in call order.

  Args:
    model: a Linen module (called as ``model.apply(variables, x)`` plus
      ``train=False`` when its ``__call__`` takes ``train``), an ``nnx.Module``
      (called in eval mode) or a function ``f(params, x)``.
    variables: Linen variables (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
      ``jax.eval_shape(model.init, ...)``), None for NNX, a function's params.
    input_shape: shape of one example without the batch axis, e.g. (32, 32, 3);
      a leading batch of 1 is accepted; a ``jax.ShapeDtypeStruct`` (integer token
      ids) or a pytree of those and shapes for several inputs
      (:func:`jaxprune.graph.tracing.example_inputs`).
    call: NNX ``call(module, x)``, Linen ``call(variables, x)``, for a forward
      that needs more than x (several inputs, or to select the result among the
      outputs: only what the outputs depend on is counted).
    batched: whether `input_shape` starts with the batch axis; None guesses
      (a leading 1 on a shape of two or more axes is a batch).
    dtype: dtype of the dummy input.

  Returns:
    One dict per op: ``name`` (the kernel's module path, e.g. ``stage0_block0/conv_a``),
    ``kind`` ("conv", "dense": a product with a parameter, "dot": between
    activations), ``kernel`` (leaf path or None), ``in_shape``, ``out_shape``
    (with the batch axis of 1), ``kernel_shape`` (HWIO for a conv, (in, out) for
    a product), ``macs``, ``bias_adds``, ``flops`` = macs + bias_adds and ``note``:
    "" when the count is exact, else why not (an op inside a ``while_loop`` whose trip
    count is unknown before running is counted for one iteration; a
    :class:`LoopCountWarning` names the loop). Loops with a
    known trip count (``scan``, ``nn.scan``, ``fori_loop`` with constant bounds)
    count every iteration.

  Raises:
    UserError: when the forward pass has no conv or matrix product to count.
  """
  traced = trace_jaxpr(model, variables, input_shape, call, batched=batched, dtype=dtype)
  w = graph_group.walk(traced)[0]
  if not w.ops:
    raise UserError(f"{_name(model)} has no convolution or matrix product in its forward "
                    "pass: nothing to count (its FLOPs would read 0)")
  return [{"name": op.name, "kind": op.kind, "kernel": op.kernel,
           "in_shape": tuple(op.in_shape), "out_shape": tuple(op.out_shape),
           "kernel_shape": tuple(op.kernel_shape), "macs": int(op.macs),
           "bias_adds": int(op.bias_adds), "flops": int(op.flops), "note": op.note}
          for op in w.ops]


def _name(model) -> str:
  return getattr(model, "__name__", None) or type(model).__name__


def count_params(variables: Mapping[str, Any] | Any) -> int:
  """Trainable parameter entries.

  ``variables`` is a Linen variables dict (its ``params`` collection is counted,
  BN statistics excluded), an ``nnx.Module`` (its ``nnx.Param`` leaves) or a
  params pytree (every leaf).
  """
  from flax import nnx
  if isinstance(variables, nnx.Module):
    tree = nnx.state(variables, nnx.Param)
  elif isinstance(variables, Mapping) and "params" in variables:
    tree = variables["params"]
  else:
    tree = variables
  return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


def count(model, variables, input_shape: Any, call: Callable | None = None, *,
          batched: bool | None = None) -> dict[str, int]:
  """FLOPs (multiply-accumulates + bias adds) per example and trainable parameters.

  Convention of the official TAS counter (tas.md §5): CIFAR-10 ResNet-20 gives
  40.81M FLOPs.

  Args:
    model: a Linen module, an ``nnx.Module`` (variables None) or a function
      ``f(params, x)``; any layers, including a user's own written with
      ``lax``/``jnp`` (grouped and depthwise convs included).
    variables: Linen variables (concrete or abstract), None for NNX, a
      function's params.
    input_shape: shape of one example, e.g. (32, 32, 3); a leading batch of 1
      is accepted.
    call: see :func:`count_layers`.
    batched: see :func:`count_layers`.

  Returns:
    ``{"flops": int, "params": int}``; when the FLOPs are only a lower bound (a
    ``while_loop`` with a trip count unknown before running, counted for one
    iteration) also ``"exact": False`` and ``"note"``, the first such loop's line
    (every one is in :func:`count_layers`' ``note`` and warned about).

  Example:
    >>> model = models.cifar_resnet(20)
    >>> variables = jax.eval_shape(model.init, jax.random.key(0),
    ...                            jnp.zeros((1, 32, 32, 3)))
    >>> flops.count(model, variables, (32, 32, 3))["flops"]
    40813194
    >>> flops.count(nnx_model, None, (28, 28, 1))       # an nnx.Module
  """
  layers = count_layers(model, variables, input_shape, call, batched=batched)
  out = {"flops": int(sum(layer["flops"] for layer in layers)),
         "params": count_params(model if variables is None else variables)}
  notes = [layer["note"] for layer in layers if layer["note"]]
  if notes:
    out.update(exact=False, note=notes[0])
  return out


def _positions(record):
  """Output positions (H_out * W_out) of a conv record."""
  return math.prod(record["out_shape"][1:-1])


def _taps(record):
  """Kernel taps (k_h * k_w) of a conv record."""
  return math.prod(record["kernel_shape"][:-2])


@functools.lru_cache(maxsize=32)
def _tas_geometry(model, batch_shape):
  """Layer geometry of a TAS search space, from the standard network's layers.

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
  records = {r["name"]: r for r in count_layers(plain, variables, batch_shape,
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


def _reach_probabilities(probs, choices, position):
  """P(sampled depth >= position): reverse cumulative sum of `probs` (§5)."""
  reach = jnp.cumsum(probs[::-1])[::-1]
  return reach[bisect.bisect_left(list(choices), position)]


def tas_expected_cost(model, arch_params: Mapping[str, Any],
                      input_shape: Sequence[int]) -> jax.Array:
  """Expected FLOPs E_cost of a TAS search space (tas.md §5), differentiable.

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
  geometry = _tas_geometry(model, _example_batch(input_shape, None))
  e_out = [jax.nn.softmax(jnp.asarray(a, jnp.float32)) @
           jnp.asarray(c, jnp.float32)
           for a, c in zip(model.width_logits(arch_params),
                           model.conv_candidates())]
  depth_probs = [jax.nn.softmax(jnp.asarray(b, jnp.float32))
                 for b in model.depth_logits(arch_params)]
  choices = model.stage_candidates()

  taps, positions = geometry["stem"]
  cost = taps * geometry["in_channels"] * e_out[0] * positions
  e_in, index = e_out[0], 1
  for block in geometry["blocks"]:
    block_in, block_cost = e_in, 0.0
    for taps, positions in block["convs"]:
      block_cost += taps * e_in * e_out[index] * positions
      e_in, index = e_out[index], index + 1
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
  return count(model, variables, batch_shape, batched=True)["flops"]


def tas_argmax_cost(model, arch_params: Mapping[str, Any],
                    input_shape: Sequence[int]) -> int:
  """F_cost: exact FLOPs of the argmax architecture (tas.md §5), on the host.

  The :func:`count` of ``model.derived_network(arch_params)``, the plain
  ResNet of the argmax width of every conv and argmax depth of every stage,
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
                       _example_batch(input_shape, None))


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
  geometry = _tas_geometry(model, _example_batch(input_shape, None))
  widths = [jnp.asarray(c, jnp.float32)[jnp.argmax(a)]
            for a, c in zip(model.width_logits(arch_params),
                            model.conv_candidates())]
  blocks = [jnp.asarray(c)[jnp.argmax(b)]
            for b, c in zip(model.depth_logits(arch_params),
                            model.stage_candidates())]

  taps, positions = geometry["stem"]
  cost = taps * geometry["in_channels"] * widths[0] * positions
  current, index = widths[0], 1
  for block in geometry["blocks"]:
    c_in, block_cost = current, 0.0
    for taps, positions in block["convs"]:
      block_cost += taps * c_in * widths[index] * positions
      c_in, index = widths[index], index + 1
    needs_shortcut = block["strided"] or (current != c_in)
    block_cost += jnp.where(needs_shortcut,
                            current * c_in * block["convs"][-1][1], 0.0)
    kept = block["position"] <= blocks[block["stage"]]
    cost += jnp.where(kept, block_cost, 0.0)
    current = jnp.where(kept, c_in, current)
  num_classes, bias_adds = geometry["classifier"]
  return cost + current * num_classes + bias_adds


def graph_macs(edges: int, nodes: int, spatial: int, steps: int = 1,
               taps: int = 9) -> int:
  """MACs of a DNW graph block (dnw.md §2): ``(edges + taps * nodes) * spatial^2``.

  ``nodes`` are the nodes whose depthwise ``taps``-tap op runs, ``steps`` the
  times the graph is applied (5 for the discrete-time net).
  """
  return int((edges + taps * nodes) * spatial * spatial * steps)


def count_graph(model, variables: Mapping[str, Any],
                input_shape: Sequence[int], blocks: Sequence[Mapping[str, int]],
                *, taps: int = 9) -> dict[str, int]:
  """FLOPs of a neural-graph model: its conv/dense layers plus its graph blocks.

  The conv and dense calls (stem, classifier) are counted as by :func:`count`;
  each graph block, whose 1x1 graph convolution and node ops are not layer
  calls, adds :func:`graph_macs`. Called with the executed edges and live nodes
  it gives the FLOPs of the network actually executed; with every slot the
  dense forward reads, the dense-masked FLOPs.

  Args:
    model, variables, input_shape: as for :func:`count`.
    blocks: per graph block ``{"edges", "nodes", "spatial", "steps"}``.
    taps: kernel taps of a node op.

  Returns:
    ``{"flops", "layer_flops", "graph_flops", "layer_params", "graph_params",
    "params"}``: ``graph_params`` = edges + taps * nodes, ``layer_params`` the
    counted layers' kernels and biases, ``params`` every parameter stored.
  """
  # The graph's own products (edges, node convs) are counted by graph_macs.
  layers = [r for r in count_layers(model, variables, input_shape)
            if r["kernel"] is not None and r["kernel"].endswith("/kernel")]
  layer_flops = int(sum(layer["flops"] for layer in layers))
  layer_params = int(sum(math.prod(layer["kernel_shape"]) +
                         (layer["kernel_shape"][-1] if layer["bias_adds"] else 0)
                         for layer in layers))
  graph_flops = sum(graph_macs(b["edges"], b["nodes"], b["spatial"], b.get("steps", 1),
                               taps) for b in blocks)
  graph_params = int(sum(b["edges"] + taps * b["nodes"] for b in blocks))
  return {"flops": layer_flops + graph_flops, "layer_flops": layer_flops,
          "graph_flops": graph_flops, "layer_params": layer_params,
          "graph_params": graph_params, "params": count_params(variables)}


__all__ = ["LoopCountWarning", "count", "count_layers", "count_params", "tas_expected_cost",
           "tas_argmax_cost", "tas_argmax_cost_traced", "graph_macs", "count_graph"]
