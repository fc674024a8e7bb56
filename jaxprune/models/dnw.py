"""DNW neural graphs (docs/methods/dnw.md §2): tiny CIFAR-10 graph nets and a
MobileNetV1-like net; the learned wiring's export and its executed FLOPs."""
import math
from typing import Any, Sequence

import diffrax
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxprune import flops as flops_lib
from jaxprune.errors import UserError
from jaxprune.kernels.topk import kept_count
from jaxprune.kernels.topk import topk_mask
from jaxprune.kernels.topk import topk_ste
from jaxprune.models import layers

GRAPHS = ("dnw", "random", "complete")
# (in, out, stride, layers) of the MobileNetV1-like blocks (dnw.md §2).
MOBILENET_BLOCKS = ((32, 64, 1, 1), (64, 128, 2, 2), (128, 256, 2, 2), (256, 512, 2, 6),
                    (512, 1024, 2, 2))
NODE_TAPS = 9  # a node's depthwise 3x3

# PyTorch's default conv init, U(+-1/sqrt(fan_in)), as in the reference release.
_torch_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _check_graph(graph: str):
  if graph not in GRAPHS:
    raise UserError(f"Unknown graph {graph!r}; use one of {', '.join(GRAPHS)}.")


def _kept_edges(model: str, numel: int, prune_rate: float) -> int:
  """Edges kept of ``numel`` at a config's ``prune_rate``: one line if none or it is off."""
  if not 0.0 <= prune_rate < 1.0 or kept_count(numel, prune_rate) < 1:
    raise UserError(f"{model}: prune_rate={prune_rate} must lie in [0, 1) and keep at least "
                    f"one of the {numel} edge slots (0.95 keeps {kept_count(numel, 0.95)}).")
  return kept_count(numel, prune_rate)


def _depthwise(x, kernel, stride: int = 1, dtype=jnp.float32):
  """3x3 depthwise conv in ``dtype``, padding 1; ``kernel`` (3, 3, 1, C)."""
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=x.shape[-1])


def _instance_norm(x, scale, bias, eps: float = 1e-5):
  """Per-example, per-channel norm over H, W with an affine map (PyTorch InstanceNorm2d),
  computed in float32 (at least)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
  return (x - mean) * lax.rsqrt(var + eps) * scale + bias


def _contract(x, w, dtype=jnp.float32):
  """The 1x1 graph convolution in ``dtype``: ``out[..., v] = sum_u x[..., u] * w[u, v]``."""
  return jnp.einsum("nhwu,uv->nhwv", x.astype(dtype), w.astype(dtype))


def random_graph_mask(key: jax.Array, valid: np.ndarray, k: int) -> jax.Array:
  """A fixed random graph: k slots drawn uniformly among the ``valid`` ones."""
  scores = jax.random.uniform(key, valid.shape)
  return topk_mask(scores, k, valid).astype(jnp.float32)


class EdgeMatrix(nn.Module):
  """The edges of one graph: ``params/edges`` of shape ``shape``, as the forward reads them.

  Attributes:
    shape: (num_sources, num_targets).
    valid: numpy bool array of ``shape``: the slots the forward pass reads.
    k: number of edges of the graph.
    graph: "dnw", "random" or "complete".
  """
  shape: tuple[int, int]
  valid: Any
  k: int
  graph: str = "dnw"

  @nn.compact
  def __call__(self):
    w = self.param("edges", _torch_init, self.shape)
    valid = np.asarray(self.valid)
    if self.graph == "dnw":
      return topk_ste(w, k=self.k, valid=valid)  # dnw.md §1
    if self.graph == "random":
      mask = self.variable("wiring", "mask", lambda: random_graph_mask(
          self.make_rng("params"), valid, self.k))
      return w * mask.value
    return w * valid


def _readout_window(x):
  """The release's pooling: a centre 3x3 crop average-pooled by 2x2, i.e. the 2x2
  window at rows/cols ``H//2 - 2 .. H//2 - 1`` (rows 2-3 of the 8x8 map)."""
  h0, w0 = x.shape[1] // 2 - 2, x.shape[2] // 2 - 2
  return jnp.mean(x[:, h0:h0 + 2, w0:w0 + 2, :], axis=(1, 2))


class _Downsample(nn.Module):
  """The tiny nets' stem (dnw.md §2): 32x32 -> 8x8 with ``features`` channels
  (hidden width ``width // 2``; ``width`` 0: ``features``)."""
  features: int = 32
  width: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    half = (self.width or self.features) // 2
    bn = lambda name: layers.BatchNorm(use_running_average=not train, momentum=0.9,
                                       epsilon=1e-5, dtype=self.dtype, name=name)
    x = layers.Conv(half, (3, 3), strides=2, padding=1, kernel_init=_torch_init,
                    dtype=self.dtype, name="conv_stem")(jnp.asarray(x, self.dtype))
    x = nn.relu(bn("bn_stem")(x))
    x = nn.Conv(half, (3, 3), strides=2, padding=1, feature_group_count=half,
                kernel_init=_torch_init, dtype=self.dtype, name="conv_dw")(x)
    x = layers.Conv(self.features, (1, 1), padding=0, kernel_init=_torch_init,
                    dtype=self.dtype, name="conv_pw")(x)
    return bn("bn_out")(x)


class StaticGraphNet(nn.Module):
  """The tiny static neural graph (dnw.md §2): a 5-layer DAG over 800 nodes.

  Layer 0 is the stem's output; layer i's nodes feed every node of later
  layers; the last layer feeds the ``num_outputs`` output nodes, which are the
  last nodes of that layer (their accumulated input plus the last layer's
  contribution is the graph's output, as in the release).

  Attributes:
    num_classes: classifier outputs.
    block_sizes: nodes per layer; the first is the stem's width.
    num_outputs: output nodes read by the classifier (the last ones).
    prune_rate: fraction of the ``N x N`` edge matrix pruned (0.95: 32,000 edges).
    graph: "dnw", "random" or "complete".
    num_edges: the edge count, instead of ``prune_rate`` (0: from prune_rate).
    stem_width: the stem's width before its last 1x1 conv is cut to the live stem
      nodes (0: ``block_sizes[0]``; set by :func:`compact_static`).
    dtype: compute dtype of the convs and contractions (see the module docstring).
    read_once: the output nodes add the later layers' contributions to the inputs
      already pulled for their own node ops, so every edge is read once (the same
      function, another rounding); the default reads every node's output in one
      contraction, so edges from earlier layers into the output nodes are read twice.
      :func:`export_wiring` counts this form: dnw.md §2 counts each edge once.
  """
  num_classes: int = 10
  block_sizes: Sequence[int] = (32, 192, 192, 192, 192)
  num_outputs: int = 100
  prune_rate: float = 0.95
  graph: str = "dnw"
  num_edges: int = 0
  stem_width: int = 0
  dtype: Any = jnp.float32
  read_once: bool = False

  def _layout(self):
    sizes = tuple(self.block_sizes)
    bounds = np.cumsum((0,) + sizes)
    nodes = int(bounds[-1])
    first_output = nodes - self.num_outputs
    # Layer i feeds the targets [target_start[i], N).
    target_start = [min(int(bounds[i + 1]), first_output) for i in range(len(sizes))]
    return sizes, bounds, nodes, target_start

  def valid_slots(self) -> np.ndarray:
    sizes, bounds, nodes, target_start = self._layout()
    valid = np.zeros((nodes, nodes), bool)
    for i in range(len(sizes)):
      valid[bounds[i]:bounds[i + 1], target_start[i]:] = True
    return valid

  def edge_count(self) -> int:
    nodes = int(sum(self.block_sizes))
    k = self.num_edges or _kept_edges("dnw_static", nodes * nodes, self.prune_rate)
    slots = int(self.valid_slots().sum())
    if k > slots:  # prune_rate counts the N x N matrix; the DAG reads fewer slots
      lowest = math.ceil((1 - slots / nodes ** 2) * 1e4) / 1e4
      asked, fix = ((f"num_edges={self.num_edges}", f"num_edges <= {slots}") if self.num_edges
                    else (f"prune_rate={self.prune_rate}", f"prune_rate >= {lowest}"))
      raise UserError(f"dnw_static: {asked} asks for {k} edges, but its DAG over "
                      f"block_sizes={tuple(self.block_sizes)} has only {slots} slots; "
                      f"use {fix}.")
    return k

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_graph(self.graph)
    sizes, bounds, nodes, target_start = self._layout()
    dt = self.dtype
    node_input = _Downsample(sizes[0], self.stem_width, dt, name="downsample")(x, train)
    w = EdgeMatrix((nodes, nodes), self.valid_slots(), self.edge_count(), self.graph,
                   name="graph")()
    dw = self.param("node_conv", _torch_init, (3, 3, 1, nodes))
    scale = self.param("norm_scale", nn.initializers.ones, (nodes,))
    bias = self.param("norm_bias", nn.initializers.zeros, (nodes,))
    first_output = nodes - self.num_outputs
    outputs, pulled = [], []
    # Each layer pulls its input from all earlier layers' outputs: one matmul per
    # layer over the rows the DAG allows (the same sums as pushing each layer's
    # output into all later nodes, without scattering into a buffer).
    for i in range(len(sizes)):
      lo, hi = int(bounds[i]), int(bounds[i + 1])
      if i > 0:
        node_input = _contract(jnp.concatenate(outputs, -1), w[:lo, lo:hi], dt)
      pulled.append(node_input)
      z = _instance_norm(node_input, scale[lo:hi], bias[lo:hi])
      outputs.append(_depthwise(nn.relu(z), dw[..., lo:hi], 1, dt))
    # The output nodes: their accumulated input plus the contributions of their own
    # and later layers.
    if not self.read_once:
      out = _contract(jnp.concatenate(outputs, -1), w[:, first_output:], dt)
    else:
      parts = []
      for i in range(len(sizes)):
        lo, a, b = int(bounds[i]), max(int(bounds[i]), first_output), int(bounds[i + 1])
        if a < b:
          part = _contract(jnp.concatenate(outputs[i:], -1), w[lo:, a:b], dt)
          parts.append(part if i == 0 else pulled[i][..., a - lo:b - lo] + part)
      out = jnp.concatenate(parts, -1)
    out = _readout_window(out)
    out = nn.Dense(self.num_classes, kernel_init=_torch_init, dtype=dt, name="fc")(out)
    return out.astype(jnp.float32)

  def graph_blocks(self, input_shape) -> list[dict]:
    """The graph blocks, for :func:`export_wiring` and FLOPs (one per edge matrix).

    Each dict: ``name``; ``path`` of the edge parameter; ``valid`` slots; ``k``
    edges; ``spatial`` size of the graph's feature maps for ``input_shape``;
    ``steps`` (applications per forward); ``dst_node`` (node id of each target;
    source u is node u); ``outputs`` (node ids read after the graph); ``inputs``
    (the first node ids, fed from outside the graph); ``chained`` (its input
    nodes are the previous block's outputs).
    """
    _, _, nodes, _ = self._layout()
    return [{"name": "graph", "path": ("graph", "edges"), "valid": self.valid_slots(),
             "k": self.edge_count(), "spatial": input_shape[0] // 4,
             "steps": 1, "dst_node": np.arange(nodes),
             "outputs": np.arange(nodes - self.num_outputs, nodes),
             "inputs": int(self.block_sizes[0]), "chained": False}]


class _RecurrentGraphNet(nn.Module):
  """Shared pieces of the discrete- and continuous-time graphs (one N x N graph)."""
  num_classes: int = 10
  nodes: int = 800
  stem_width: int = 32
  num_outputs: int = 100
  prune_rate: float = 0.95
  graph: str = "dnw"
  dtype: Any = jnp.float32

  def edge_count(self) -> int:
    return _kept_edges(self.registry_name, self.nodes * self.nodes, self.prune_rate)

  def _pieces(self, x, train):
    _check_graph(self.graph)
    x = _Downsample(self.stem_width, dtype=self.dtype, name="downsample")(x, train)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # the state Z is float32
    z0 = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.nodes - self.stem_width)))
    w = EdgeMatrix((self.nodes, self.nodes), np.ones((self.nodes,) * 2, bool),
                   self.edge_count(), self.graph, name="graph")()
    dw = self.param("node_conv", _torch_init, (3, 3, 1, self.nodes))
    scale = self.param("norm_scale", nn.initializers.ones, (self.nodes,))
    bias = self.param("norm_bias", nn.initializers.zeros, (self.nodes,))
    return z0, (w.astype(self.dtype), dw.astype(self.dtype), scale, bias)

  def _classify(self, z):
    out = _readout_window(z[..., self.nodes - self.num_outputs:])
    out = nn.Dense(self.num_classes, kernel_init=_torch_init, dtype=self.dtype,
                   name="fc")(out)
    return out.astype(jnp.float32)

  def graph_blocks(self, input_shape) -> list[dict]:
    return [{"name": "graph", "path": ("graph", "edges"),
             "valid": np.ones((self.nodes,) * 2, bool), "k": self.edge_count(),
             "spatial": input_shape[0] // 4, "steps": self._steps(),
             "dst_node": np.arange(self.nodes),
             "outputs": np.arange(self.nodes - self.num_outputs, self.nodes),
             "inputs": self.stem_width, "chained": False}]


def graph_update(z, args):
  """One application of the recurrent graph: norm(graph(dw(relu(z)))) (dnw.md §2).

  The conv and the contraction run in the dtype of ``w`` and ``dw``; the norm and the
  result in float32 (at least), the dtype of the state ``z``.
  """
  w, dw, scale, bias = args
  y = _contract(_depthwise(nn.relu(z), dw, 1, dw.dtype), w, w.dtype)
  return _instance_norm(y, scale, bias).astype(z.dtype)


class DiscreteTimeGraphNet(_RecurrentGraphNet):
  """Discrete-time neural graph: one N x N graph applied ``steps`` times (dnw.md §2)."""
  registry_name = "dnw_discrete"  # its name in jaxprune.models (for messages)
  steps: int = 5

  def _steps(self):
    return self.steps

  @nn.compact
  def __call__(self, x, train: bool = False):
    z, args = self._pieces(x, train)
    for _ in range(self.steps):
      z = graph_update(z, args)
    return self._classify(z)


def solve_graph_ode(z0, args, *, rtol: float = 1e-3, atol: float = 1e-3,
                    max_steps: int = 4096):
  """Solves dZ/dt = norm(graph(dw(relu(Z)))) on [0, 1] with adaptive dopri5 (dnw.md §2).

  Returns ``(Z(1), stats)``; ``stats`` holds diffrax's ``num_steps``,
  ``num_accepted_steps`` and ``num_rejected_steps``.
  """
  term = diffrax.ODETerm(lambda t, z, a: graph_update(z, a))
  solution = diffrax.diffeqsolve(
      term, diffrax.Dopri5(), t0=0.0, t1=1.0, dt0=None, y0=z0, args=args,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      max_steps=max_steps, saveat=diffrax.SaveAt(t1=True))
  return solution.ys[-1], solution.stats


class ContinuousTimeGraphNet(_RecurrentGraphNet):
  """Continuous-time neural graph: Z(1) of an ODE over the N x N graph (dnw.md §2).

  The solver's step counts are sown into ``intermediates/ode_num_steps``.
  """
  registry_name = "dnw_continuous"
  rtol: float = 1e-3
  atol: float = 1e-3

  def _steps(self):
    return 1  # per function evaluation; dopri5 makes 6 per accepted step

  @nn.compact
  def __call__(self, x, train: bool = False):
    z, args = self._pieces(x, train)
    z, stats = solve_graph_ode(z, args, rtol=self.rtol, atol=self.atol)
    self.sow("intermediates", "ode_num_steps", stats["num_steps"])
    return self._classify(z)


def mobilenet_edges(inp: int, out: int, num_layers: int, width: float) -> float:
  """Pointwise edges of MobileNetV1 x width in one block: (in*out + (L-1)*out^2) * d^2."""
  return (inp * out + (num_layers - 1) * out * out) * width * width


def mobilenet_prune_rate(inp: int, out: int, num_layers: int, width: float) -> float:
  """Per-block prune rate of the MobileNetV1-like graph (dnw.md §2).

  The block's edge matrix has ``(in + out*(L-1)) x out*L`` entries and keeps as
  many edges as MobileNetV1 x ``width`` has pointwise edges in that block.
  """
  numel = (inp + out * (num_layers - 1)) * out * num_layers
  return 1.0 - mobilenet_edges(inp, out, num_layers, width) / numel


class GraphBlock(nn.Module):
  """One MobileNetV1-like block: a DAG over its input nodes and all its layers' nodes.

  Sources are the ``inp`` input nodes and the nodes of layers 1..L-1; targets
  are the nodes of layers 1..L; every node feeds all later layers. A node is
  BN -> ReLU -> depthwise 3x3 (stride ``stride`` on the input nodes).
  """
  inp: int
  out: int
  stride: int
  num_layers: int
  width: float
  graph: str = "dnw"
  dtype: Any = jnp.float32

  def shape(self):
    return (self.inp + self.out * (self.num_layers - 1), self.out * self.num_layers)

  def valid_slots(self) -> np.ndarray:
    n_src, n_dst = self.shape()
    src_layer = np.concatenate([np.zeros(self.inp, int),
                                1 + np.arange(n_src - self.inp) // self.out])
    dst_layer = 1 + np.arange(n_dst) // self.out
    return dst_layer[None, :] > src_layer[:, None]

  def edge_count(self) -> int:
    n_src, n_dst = self.shape()
    return kept_count(n_src * n_dst, mobilenet_prune_rate(
        self.inp, self.out, self.num_layers, self.width))

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: layers.BatchNorm(use_running_average=not train, momentum=0.9,
                                       epsilon=1e-5, dtype=self.dtype, name=name)
    inp, out, n, dt = self.inp, self.out, self.num_layers, self.dtype
    w = EdgeMatrix(self.shape(), self.valid_slots(), self.edge_count(), self.graph,
                   name="graph")()
    dw_in = self.param("input_conv", _torch_init, (3, 3, 1, inp))
    z = _depthwise(nn.relu(bn("bn0")(x)), dw_in, self.stride, dt)
    acc = _contract(z, w[:inp], dt)
    if n > 1:
      dw = self.param("node_conv", _torch_init, (3, 3, 1, out * (n - 1)))
    for i in range(n - 1):
      z = nn.relu(bn(f"bn{i + 1}")(acc[..., i * out:(i + 1) * out]))
      z = _depthwise(z, dw[..., i * out:(i + 1) * out], 1, dt)
      src = inp + i * out
      acc = acc.at[..., (i + 1) * out:].add(
          _contract(z, w[src:src + out, (i + 1) * out:], dt))
    return acc[..., -out:]


class MobileNetV1Like(nn.Module):
  """The MobileNetV1-like DNW network for ImageNet (dnw.md §2).

  Attributes:
    num_classes: classifier outputs.
    width: the multiplier d whose MobileNetV1 pointwise edge count each block keeps
      (0.225, 0.3, 0.49 in the paper).
    graph: "dnw", "random" or "complete".
    blocks: (in, out, stride, layers) per block.
    dtype: compute dtype of the convs and contractions (see the module docstring).
  """
  num_classes: int = 1000
  width: float = 0.225
  graph: str = "dnw"
  blocks: Sequence[Sequence[int]] = MOBILENET_BLOCKS
  dtype: Any = jnp.float32

  def _stem_stride(self, image_size):
    return 1 if image_size <= 64 else 2  # as the release: small inputs keep their size

  def _check(self):
    _check_graph(self.graph)
    if not 0.0 < self.width <= 1.0:
      raise UserError(f"dnw_mobilenet: width={self.width} must lie in (0, 1].")

  @nn.compact
  def __call__(self, x, train: bool = False):
    self._check()
    x = layers.Conv(self.blocks[0][0], (3, 3), strides=self._stem_stride(x.shape[1]),
                    padding=1, use_bias=False, kernel_init=_torch_init, dtype=self.dtype,
                    name="conv_stem")(jnp.asarray(x, self.dtype))
    for b, (inp, out, stride, n) in enumerate(self.blocks):
      x = GraphBlock(inp, out, stride, n, self.width, self.graph, self.dtype,
                     name=f"block{b}")(x, train)
    x = layers.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, name="bn_out")(x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    x = nn.Dense(self.num_classes, kernel_init=_torch_init, dtype=self.dtype, name="fc")(x)
    return x.astype(jnp.float32)

  def graph_blocks(self, input_shape) -> list[dict]:
    self._check()
    spatial = input_shape[0] // self._stem_stride(input_shape[0])
    out = []
    for b, (inp, o, stride, n) in enumerate(self.blocks):
      block = GraphBlock(inp, o, stride, n, self.width, self.graph, parent=None)
      spatial = math.ceil(spatial / stride)
      n_src, n_dst = block.shape()
      out.append({"name": f"block{b}", "path": (f"block{b}", "graph", "edges"),
                  "valid": block.valid_slots(), "k": block.edge_count(),
                  "spatial": spatial, "steps": 1, "dst_node": inp + np.arange(n_dst),
                  "outputs": inp + np.arange(n_dst - o, n_dst), "inputs": inp,
                  "chained": b > 0})
    return out


def static_graph(num_classes: int = 10, graph: str = "dnw", prune_rate: float = 0.95,
                 **kwargs) -> StaticGraphNet:
  """The tiny static CIFAR-10 neural graph (32,000 of 800x800 edges)."""
  return StaticGraphNet(num_classes=num_classes, graph=graph, prune_rate=prune_rate,
                        **kwargs)


def discrete_graph(num_classes: int = 10, graph: str = "dnw", prune_rate: float = 0.95,
                   **kwargs) -> DiscreteTimeGraphNet:
  """The tiny discrete-time CIFAR-10 neural graph (5 steps of one 800x800 graph)."""
  return DiscreteTimeGraphNet(num_classes=num_classes, graph=graph,
                              prune_rate=prune_rate, **kwargs)


def continuous_graph(num_classes: int = 10, graph: str = "dnw", prune_rate: float = 0.95,
                     **kwargs) -> ContinuousTimeGraphNet:
  """The tiny continuous-time CIFAR-10 neural graph (dopri5, rtol = atol = 1e-3)."""
  return ContinuousTimeGraphNet(num_classes=num_classes, graph=graph,
                                prune_rate=prune_rate, **kwargs)


def mobilenet_graph(num_classes: int = 1000, width: float = 0.225, graph: str = "dnw",
                    blocks: Sequence[Sequence[int]] = MOBILENET_BLOCKS,
                    dtype: Any = jnp.float32) -> MobileNetV1Like:
  """The MobileNetV1-like DNW network at width multiplier ``width``.

  ``blocks`` ((in, out, stride, layers) per block) defaults to the paper's; ``dtype`` is
  the compute dtype.
  """
  return MobileNetV1Like(num_classes=num_classes, width=width, graph=graph,
                         blocks=tuple(tuple(b) for b in blocks), dtype=dtype)


# --------------------------------------------------------------------------------------
# Export: edge lists, dead-node removal, executed FLOPs.


def edge_values(model, variables, block) -> np.ndarray:
  """The edge matrix as the forward pass reads it (zeros off the graph)."""
  w = variables["params"]
  for p in block["path"]:
    w = w[p]
  w = np.asarray(w, np.float32)
  if model.graph == "dnw":
    mask = np.asarray(topk_mask(jnp.asarray(w), block["k"], block["valid"]))
  elif model.graph == "random":
    wiring = variables["wiring"]
    for p in block["path"][:-1]:
      wiring = wiring[p]
    mask = np.asarray(wiring["mask"]) > 0
  else:
    mask = block["valid"]
  return np.where(mask, w, 0.0)


def live_nodes(edges: np.ndarray, dst_node: np.ndarray, outputs: np.ndarray,
               num_nodes: int) -> np.ndarray:
  """Nodes that reach an output through nonzero edges (a fixed point; exact for DAGs
  and recurrences alike: a node that reaches no output never affects the logits).

  Args:
    edges: (num_sources, num_targets); source u is node u.
    dst_node: (num_targets,) node id of each target.
    outputs: node ids read after the graph (always live).
    num_nodes: number of node ids.

  Returns:
    bool (num_nodes,).
  """
  has = edges != 0
  live = np.zeros(num_nodes, bool)
  live[outputs] = True
  while True:
    feeds_live = (has & live[dst_node][None, :]).any(axis=1)
    new = live.copy()
    new[:edges.shape[0]] |= feeds_live
    if (new == live).all():
      return live
    live = new


def export_wiring(model, variables, input_shape, *, with_edges: bool = True) -> dict:
  """The learned graph of a DNW model, dead nodes removed, with its FLOPs.

  Args:
    model: a static/discrete/continuous graph net or :class:`MobileNetV1Like`.
    variables: its variables (concrete).
    input_shape: one example's shape, e.g. (32, 32, 3).
    with_edges: include the edge lists (``[source, target, weight]`` per edge).

  Returns:
    A JSON-ready dict: ``blocks`` (per block: ``name``, ``spatial``, ``steps``,
    ``edges`` (kept), ``executed_edges`` (after dead-node removal), ``nodes``,
    ``live_nodes``, ``nodes_without_inputs``, ``edge_list``), ``flops_executed``
    (dnw.md §2: ``(edges + 9 * live nodes) * spatial^2 * steps`` per block, plus stem
    and classifier), ``flops_dense_masked`` (every valid slot and every node op),
    ``params`` and ``params_executed``. Both FLOPs are ``flops.count_layers(...,
    nonzero=True)`` on variables that say what runs (:func:`_count_variables`).
  """
  blocks = model.graph_blocks(input_shape)
  live_next = None
  rows, matrices = [], []
  for block in reversed(blocks):  # later blocks decide which outputs are still read
    edges = edge_values(model, variables, block)
    n_src, _ = edges.shape
    num_nodes = int(max(n_src, int(block["dst_node"].max()) + 1))
    outputs = block["outputs"]
    if live_next is not None:
      outputs = outputs[live_next[:len(outputs)]]
    live = live_nodes(edges, block["dst_node"], outputs, num_nodes)
    executed = edges * live[block["dst_node"]][None, :] * live[:n_src][:, None]
    src_live = (executed != 0).any(axis=1)
    has_input = np.zeros(num_nodes, bool)
    has_input[block["dst_node"][(executed != 0).any(axis=0)]] = True
    inputs = block["inputs"]
    row = {"name": block["name"], "spatial": block["spatial"], "steps": block["steps"],
           "sources": int(n_src), "targets": int(edges.shape[1]),
           "edges": int((edges != 0).sum()), "executed_edges": int((executed != 0).sum()),
           "nodes": num_nodes, "live_nodes": int(live.sum()),
           "live_node_ops": int(src_live.sum()),
           "nodes_without_inputs": int((live[inputs:] & ~has_input[inputs:]).sum()),
           "valid_slots": int(block["valid"].sum())}
    if with_edges:
      u, v = np.nonzero(executed)
      row["edge_list"] = [[int(a), int(block["dst_node"][b]), float(executed[a, b])]
                          for a, b in zip(u, v)]
    rows.append(row)
    matrices.append(executed)
    # A chained block's input nodes are the previous block's outputs.
    live_next = src_live[:inputs] if block["chained"] else None
  rows.reverse()
  exec_vars, dense_vars = _count_variables(model, variables, blocks, matrices[::-1])
  counted = model.clone(read_once=True) if isinstance(model, StaticGraphNet) else model
  executed = _network_layers(counted, exec_vars, input_shape)
  dense = _network_layers(counted.clone(graph="complete"), dense_vars, input_shape)
  # The stem's and the classifier's kernels and biases (the graph's are counted by edge).
  layer_params = int(sum(math.prod(r["kernel_shape"]) +
                         (r["kernel_shape"][-1] if r["bias_adds"] else 0)
                         for r in executed if r["kernel"].endswith("/kernel")))
  return {"graph": model.graph, "blocks": rows,
          "flops_executed": int(sum(r["flops"] for r in executed)),
          "flops_dense_masked": int(sum(r["flops"] for r in dense)),
          "params": flops_lib.count_params(variables),
          "params_executed": layer_params + int(sum(
              r["executed_edges"] + NODE_TAPS * r["live_node_ops"] for r in rows)),
          "edges": int(sum(r["edges"] for r in rows)),
          "executed_edges": int(sum(r["executed_edges"] for r in rows))}


def _network_layers(model, variables, input_shape) -> list[dict]:
  """The network's layers (ops with a parameter operand) counted on the nonzero entries
  of `variables`. The continuous-time net's solver loop counts once: one function
  evaluation (dnw.md §2); its own arithmetic (dopri5's stage sums) is not the network's."""
  layers = flops_lib.count_layers(model, variables, input_shape, nonzero=True)
  return [r for r in layers if r["kernel"] is not None]


def _node_ops(model, block) -> list[tuple[tuple, slice]]:
  """(param path, source slice) of a block's node-op kernels: source u's op is entry u."""
  if isinstance(model, MobileNetV1Like):
    n_src = block["valid"].shape[0]
    inp = block["inputs"]
    return [((block["name"], "input_conv"), slice(0, inp))] + (
        [((block["name"], "node_conv"), slice(inp, n_src))] if n_src > inp else [])
  return [(("node_conv",), slice(None))]


def _count_variables(model, variables, blocks, executed_edges):
  """The variables that say what runs: (executed, dense masked). Executed: each edge
  matrix is 1 on the executed edges, 0 elsewhere (so top-k keeps exactly them), each node
  op's kernel 1 for the sources with an executed edge, 0 for the others; dense masked:
  every slot and every node op 1 (for the ``complete`` graph, which reads the valid
  slots)."""
  params = jax.tree.map(np.asarray, flax.core.unfreeze(variables["params"]))
  exec_p, dense_p = jax.tree.map(np.copy, params), jax.tree.map(np.copy, params)

  def put(tree, path, value):
    for p in path[:-1]:
      tree = tree[p]
    tree[path[-1]] = value.astype(np.asarray(tree[path[-1]]).dtype)

  for block, executed in zip(blocks, executed_edges):
    put(exec_p, block["path"], executed != 0)
    put(dense_p, block["path"], np.ones(executed.shape, bool))
    src_live = (executed != 0).any(axis=1)  # a node op runs when its output is read
    for path, sources in _node_ops(model, block):
      shape = np.shape(_get(params, path))
      put(exec_p, path, np.broadcast_to(src_live[sources], shape))
      put(dense_p, path, np.ones(shape, bool))
  rest = {k: v for k, v in variables.items() if k != "params"}
  return {"params": exec_p, **rest}, {"params": dense_p, **rest}


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def compact_static(model: StaticGraphNet, variables) -> tuple[StaticGraphNet, dict]:
  """The dead-node-free static network: same logits, fewer nodes, a fixed mask.

  Every node that reaches no output is dropped with its node op and edges (the
  stem's dropped channels too); the kept edges become the fixed ``wiring`` mask
  of a ``graph="random"`` network over the live nodes, whose edge matrix is
  dense over them. Layers keep their order, so each layer's targets are still a
  suffix of the node order.

  Returns:
    ``(compact_model, compact_variables)``.
  """
  block = model.graph_blocks((32, 32, 3))[0]
  edges = edge_values(model, variables, block)
  nodes = edges.shape[0]
  live = live_nodes(edges, block["dst_node"], block["outputs"], nodes)
  bounds = np.cumsum((0,) + tuple(model.block_sizes))
  sizes = tuple(int(live[bounds[i]:bounds[i + 1]].sum()) for i in range(len(bounds) - 1))
  if min(sizes) == 0:
    raise ValueError(f"a layer lost all its nodes ({sizes}); no compact static net.")
  idx = np.nonzero(live)[0]
  sub = edges[np.ix_(idx, idx)]
  compact = StaticGraphNet(num_classes=model.num_classes, block_sizes=sizes,
                           num_outputs=model.num_outputs, graph="random",
                           num_edges=int((sub != 0).sum()),
                           stem_width=model.stem_width or int(model.block_sizes[0]),
                           dtype=model.dtype)
  params = jax.tree.map(np.asarray, flax.core.unfreeze(variables["params"]))
  stem_idx = idx[idx < bounds[1]]
  down = dict(params["downsample"])
  down["conv_pw"] = {"kernel": down["conv_pw"]["kernel"][..., stem_idx],
                     "bias": down["conv_pw"]["bias"][stem_idx]}
  down["bn_out"] = {k: v[stem_idx] for k, v in down["bn_out"].items()}
  new_params = {"downsample": down, "graph": {"edges": sub},
                "node_conv": params["node_conv"][..., idx],
                "norm_scale": params["norm_scale"][idx],
                "norm_bias": params["norm_bias"][idx], "fc": params["fc"]}
  state = {k: v for k, v in variables.items() if k not in ("params", "wiring")}
  state = jax.tree.map(np.asarray, state)
  if "batch_stats" in state:
    bs = dict(state["batch_stats"])
    ds = dict(bs["downsample"])
    ds["bn_out"] = {k: v[stem_idx] for k, v in ds["bn_out"].items()}
    bs["downsample"] = ds
    state["batch_stats"] = bs
  new = {"params": new_params, **state,
         "wiring": {"graph": {"mask": (sub != 0).astype(np.float32)}}}
  return compact, jax.tree.map(jnp.asarray, new)
