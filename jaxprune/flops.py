"""Analytic FLOPs and parameter counts of any model, from the jaxpr of its forward pass
(the official TAS counter's convention, tas.md §5). No per-architecture tables here.
"""

from collections.abc import Callable, Mapping, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import UserError
from jaxprune.graph import group as graph_group
from jaxprune.graph.propagate import LoopCountWarning
from jaxprune.graph.tracing import trace_jaxpr


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


__all__ = ["LoopCountWarning", "count", "count_layers", "count_params", "graph_macs",
           "count_graph"]
