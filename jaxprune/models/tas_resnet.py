"""The TAS searchable ResNets, CIFAR and ImageNet layouts (docs/methods/tas.md §1, §4): the
official supernet, one jitted search step; no FLOPs (search/resnet.py prices it), no schedules."""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import kernels
from jaxprune.errors import UserError
from jaxprune.models import layers
from jaxprune.models import resnet
from jaxprune.models.resnet import conv_init
from jaxprune.models.resnet import dense_init
from jaxprune.search.base import ARCH_INIT_STD
from jaxprune.search.base import depth_candidates
from jaxprune.search.base import fitted_candidates
from jaxprune.search.base import imagenet_depth_candidates
from jaxprune.search.base import Selection
from jaxprune.search.base import width_candidates

class CandidateBatchNorm(nn.Module):
  """One batch norm per width candidate, as ``[n_candidates, C_full]`` rows.

  Candidate j normalises the first ``C_j`` channels with its own ``scale``,
  ``bias`` (in ``params``) and running ``mean``, ``var`` (in ``batch_stats``),
  all of shape ``[n_candidates, C_full]``; only the first ``C_j`` columns of
  row j are ever used (tas.md §4). Per-channel batch statistics do not depend
  on how many channels a candidate keeps, so one ``mean``/``var`` over
  (N, H, W) of the full-width input serves every candidate.

  The module returns the affine maps instead of normalised tensors so that the
  caller can fuse both candidates' BN with CWI into one matmul
  (:class:`SearchConv`): ``BN_j(y[..., :C_j])`` zero-padded to ``C_full`` is
  ``(y - center) * gain[j] + shift[j]``.

  Statistics follow PyTorch, as the official search does: in train mode the
  output uses the biased batch variance and the running statistics of the
  picked rows move as ``new = momentum * old + (1 - momentum) * batch`` with the
  *unbiased* batch variance (``momentum=0.9`` here is PyTorch's 0.1). Only the
  picked rows and, within them, only the first ``C_j`` columns change; the
  statistics are not updated during ``init``. In eval mode each pick uses its
  own running statistics.

  Attributes:
    candidates: the candidate widths ``C_j`` (sorted, distinct).
    momentum: running-average decay (Flax convention).
    epsilon: added to the variance.
  """
  candidates: Sequence[int]
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, y: jax.Array, picks: Selection, *, train: bool):
    """Returns ``(center [C], gain [k, C], shift [k, C])`` for the picks.

    Args:
      y: ``[..., C_full]`` full-width conv output (float32 statistics).
      picks: the sampled candidates (their ``indices`` and ``widths``).
      train: batch statistics (and running-average update) or running ones.

    Returns:
      ``gain`` and ``shift`` are zero beyond each pick's width ``C_j``.
    """
    n, c_full = len(self.candidates), y.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (n, c_full))
    bias = self.param("bias", nn.initializers.zeros, (n, c_full))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (n, c_full))
    ra_var = self.variable("batch_stats", "var", jnp.ones, (n, c_full))

    idx = picks.indices
    # valid[j, c]: channel c belongs to pick j's prefix C_j (§4).
    valid = jnp.arange(c_full)[None, :] < picks.widths[:, None]
    y32 = y.astype(jnp.float32)
    axes = tuple(range(y.ndim - 1))
    if train:
      mean = jnp.mean(y32, axis=axes)
      var = jnp.mean(jnp.square(y32 - mean), axis=axes)  # biased, as torch
      if not self.is_initializing():
        count = y.size // c_full
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        for ra, batch in ((ra_mean, mean), (ra_var, unbiased)):
          rows = ra.value[idx]
          ra.value = ra.value.at[idx].set(
              jnp.where(valid, m * rows + (1 - m) * batch, rows))
      center = mean
      pick_mean = jnp.broadcast_to(mean, valid.shape)
      pick_var = jnp.broadcast_to(var, valid.shape)
    else:
      pick_mean, pick_var = ra_mean.value[idx], ra_var.value[idx]
      center = pick_mean[0]
    gain = jnp.where(valid, scale[idx] * jax.lax.rsqrt(pick_var + self.epsilon),
                     0.0)
    # (y - m_j) g_j + b_j == (y - center) g_j + (b_j + (center - m_j) g_j).
    shift = jnp.where(valid, bias[idx] + (center - pick_mean) * gain, 0.0)
    return center, gain, shift


class SearchConv(nn.Module):
  """A searchable conv: full-width conv, per-candidate BN, 2-candidate CWI mix.

  Computes the conv at its full width ``features``; candidate j is the prefix
  of the first ``C_j`` output channels. For the two sampled candidates a, b
  (the ``selection``, drawn by :class:`TASResNet` with
  :func:`jaxprune.kernels.gumbel_select`) it returns (tas.md §4)::

    out = w_a * CWI(BN_a(y[:C_a]) -> C_max) + w_b * CWI(BN_b(y[:C_b]) -> C_max)

  with ``C_max = max(C_a, C_b)``, then ReLU if ``relu``. Widths are traced: the
  output is a ``[..., features]`` buffer that is exactly zero beyond
  ``C_max``. The input may be zero-padded the same way; zero input channels
  contribute nothing, which equals slicing the kernel to the input's width.
  Because BN and CWI are both linear per pick, the mix is computed as one
  ``[C, C]`` matmul ``(y - center) @ A + c`` with
  ``A = sum_j w_j diag(gain_j) M_j`` and ``M_j`` the traced CWI matrix
  (:func:`jaxprune.kernels.cwi_matrix_traced`).

  Attributes:
    features: full output width.
    kernel: square kernel size (PyTorch padding ``kernel // 2``).
    stride: conv stride.
    pool: 2x2 average pool before the conv (the stride-2 shortcut, §1).
    relu: apply ReLU to the mixed output.
    dtype: compute dtype.
    precision: precision of the BN/CWI mix matmul.
    candidates: the conv's width candidates (default: :func:`width_candidates` of
      ``features``; :class:`TASResNet` passes its rounded ones).
  """
  features: int
  kernel: int = 3
  stride: int = 1
  pool: bool = False
  relu: bool = True
  dtype: Any = jnp.float32
  precision: Any = None
  candidates: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, selection: Selection, *, train: bool):
    """Returns the ``[..., features]`` mixed output (zero beyond C_max)."""
    if self.pool:
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    pad = self.kernel // 2
    # The shared fast conv of every model (its precision: the backend default).
    y = layers.Conv(self.features, (self.kernel, self.kernel),
                    strides=(self.stride, self.stride),
                    padding=((pad, pad), (pad, pad)), use_bias=False,
                    kernel_init=conv_init, dtype=self.dtype, name="conv")(x)
    center, gain, shift = CandidateBatchNorm(
        tuple(self.candidates) or width_candidates(self.features), name="bn")(y, selection, train=train)
    cwi = jax.vmap(kernels.cwi_matrix_traced, (0, None, None))(
        selection.widths, selection.out_width, self.features)  # [k, C, C]
    w = selection.weights.astype(jnp.float32)
    mix = jnp.einsum("k,kc,kcd->cd", w, gain, cwi)
    offset = jnp.einsum("k,kc,kcd->d", w, shift, cwi)
    out = jnp.matmul((y.astype(jnp.float32) - center).astype(self.dtype),
                     mix.astype(self.dtype), precision=self.precision)
    out = out + offset.astype(self.dtype)
    return nn.relu(out) if self.relu else out


class SearchBlock(nn.Module):
  """A searchable basic or bottleneck block (tas.md §1, §4).

  Each conv is a :class:`SearchConv`. A block has a shortcut conv exactly where
  the standard network has one (full-width input != output, or stride 2), as
  in the official search code; its 1x1 conv reuses the picks and mixing weights
  of the block's last conv, and in search mode is always followed by a
  per-candidate BN. A stride-2 shortcut is the derived network's kind: a 2x2
  average pool then the 1x1 conv in the CIFAR layout (§1), the strided 1x1 conv
  (+ BN, torchvision) in the ImageNet layout. The
  residual add of the official code adds the narrower tensor into the leading
  channels of the wider one; with zero-padded full-width buffers that is a
  plain add, and the output's valid width is the larger of the two.

  Attributes:
    widths: full output width of each conv (2 basic, 3 bottleneck).
    block: "basic" or "bottleneck".
    stride: stride of the block's 3x3 conv.
    shortcut: whether the block has a shortcut conv.
    dtype, precision: see :class:`SearchConv`.
    layout: "cifar" or "imagenet": the kind of stride-2 shortcut.
    candidates: each conv's width candidates (default: :func:`width_candidates`).
  """
  widths: Sequence[int]
  block: str = "basic"
  stride: int = 1
  shortcut: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  layout: str = "cifar"
  candidates: Sequence[Sequence[int]] = ()

  @nn.compact
  def __call__(self, x, in_width, selections: Sequence[Selection], *,
               train: bool):
    """Returns ``(out, out_width)``; `selections` holds one per conv."""
    kernel_sizes = (3, 3) if self.block == "basic" else (1, 3, 1)
    stride_at = 0 if self.block == "basic" else 1
    last = len(self.widths) - 1
    candidates = list(self.candidates) or [()] * len(self.widths)
    y = x
    for i, (width, kernel) in enumerate(zip(self.widths, kernel_sizes)):
      y = SearchConv(width, kernel, self.stride if i == stride_at else 1,
                     relu=i != last, dtype=self.dtype, precision=self.precision,
                     candidates=tuple(candidates[i]),
                     name=f"conv_{'abc'[i]}")(y, selections[i], train=train)
    picks = selections[last]
    if self.shortcut:
      # §4: the shortcut mixes the same widths as the block's last conv. No
      # public ImageNet search exists (§6): ImageNet uses the derived net's
      # strided 1x1 conv, its BN made per-candidate like every search BN.
      pool = self.layout == "cifar" and self.stride != 1
      residual = SearchConv(
          self.widths[-1], 1, 1 if pool else self.stride, pool=pool,
          relu=False, dtype=self.dtype, precision=self.precision,
          candidates=tuple(candidates[last]), name="shortcut")(x, picks, train=train)
      out_width = picks.out_width
    else:
      residual = x
      out_width = jnp.maximum(in_width, picks.out_width)
    return nn.relu(y + residual), out_width


def depth_mix(features: Sequence[jax.Array], widths: Sequence[jax.Array],
              probs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A stage's output: its candidate depths mixed by `probs` (tas.md §4).

  The feature maps after each candidate depth are CWI-aligned to the largest
  valid width among them (traced widths,
  :func:`jaxprune.kernels.cwi_masked`) and summed with the stage's
  Gumbel-softmax vector `probs`.

  Args:
    features: ``[..., C_full]`` buffers after each candidate depth.
    widths: their valid widths (int32 scalars, may be traced).
    probs: ``[len(features)]`` depth weights.

  Returns:
    ``(mixed, out_width)``.
  """
  out_width = jnp.max(jnp.stack(widths))
  out = sum(p * kernels.cwi_masked(f, w, out_width)
            for p, f, w in zip(probs, features, widths))
  return out.astype(features[-1].dtype), out_width


class TASResNet(nn.Module):
  """The TAS searchable ResNet, CIFAR or ImageNet layout (tas.md §1, §4).

  Call as ``model.apply(variables, x, train=..., tau=..., key=...)`` with
  ``mutable=["batch_stats"]`` in train mode. `key` draws this step's Gumbel
  noise; `tau` may be traced. Everything runs at full width: one compiled
  function serves every sample.

  :meth:`sample` draws the whole step's architecture in one place: every
  conv's two picks by one :func:`jaxprune.kernels.gumbel_select` call on the
  stacked logits of all convs (independent noise per row; convs with different
  candidate counts are drawn in separate calls) and every stage's depth
  weights by one :func:`jaxprune.kernels.gumbel_softmax` call. The convs then
  receive their :class:`Selection`; the architecture parameters live at the
  top of the ``arch`` collection, one ``width_logits`` tree and one
  ``depth_logits`` tree, keyed by the paths of the convs and stages.

  The "imagenet" layout is the plain ImageNet ResNet's: the 7x7/2 stem conv
  is a searchable conv like any other (its width is searched), followed by
  the 3x3/2 max pool (zero channels beyond the valid width stay zero after
  ReLU and max); depth candidates follow :func:`imagenet_depth_candidates`.

  Attributes:
    depth: 6n+2 (basic) or 9n+2 (bottleneck) as for :func:`cifar_resnet`;
      18, 34, 50, 101 or 152 as for :func:`imagenet_resnet`.
    block: "basic" or "bottleneck".
    num_classes: classifier outputs.
    num_picks: |I|, width candidates mixed per conv (§2).
    dtype: compute dtype (parameters stay float32; logits are float32).
    precision: precision of the mix and classifier matmuls (convs use the
      backend default, as in :class:`jaxprune.models.ResNet`).
    layout: "cifar" or "imagenet", as for :class:`jaxprune.models.ResNet`.
    round_to: every conv's width candidates are rounded up to multiples of this
      (:func:`jaxprune.search.base.fitted_candidates`: a conv it would leave with fewer
      than ``num_picks`` candidates takes the largest of ``round_to // 2, ..., 1`` that
      does not); 1 is the reference's candidates. The search then prices, samples and
      derives rounded widths: the derived network is the network the search costed.
    whole: indices (in ``widths`` order, stem 0) of convs kept at their full width: one
      candidate, no width logit in the search (the backend default's narrow convs,
      :class:`jaxprune.search.ResNetSpace`).
  """
  depth: int
  block: str = "basic"
  num_classes: int = 10
  num_picks: int = 2
  dtype: Any = jnp.float32
  precision: Any = None
  layout: str = "cifar"
  round_to: int = 1
  whole: tuple[int, ...] = ()

  # --- static description of the search space (host-side, not wrapped) ----

  @property
  def full_depths(self) -> tuple[int, ...]:
    """Blocks per stage of the full-depth network."""
    return resnet.stage_depths(self.depth, self.layout, self.block)

  @property
  def convs_per_block(self) -> int:
    return 2 if self.block == "basic" else 3

  @nn.nowrap
  def full_widths(self) -> list[int]:
    """Full output width of every conv, in ``widths`` order (stem first)."""
    return resnet.default_widths(self.depth, self.layout, self.block)

  @nn.nowrap
  def conv_candidates(self) -> list[tuple[int, ...]]:
    """Width candidates of every conv, in ``widths`` order (rounded: ``round_to``; the
    full width alone for the ``whole`` convs)."""
    return [(c,) if i in self.whole else fitted_candidates(c, self.round_to, self.num_picks)
            for i, c in enumerate(self.full_widths())]

  @nn.nowrap
  def stage_candidates(self) -> list[tuple[int, ...]]:
    """Depth candidates of every stage (§1, per layout)."""
    if self.layout == "imagenet":
      return imagenet_depth_candidates(self.full_depths)
    return [depth_candidates(n) for n in self.full_depths]

  @nn.nowrap
  def conv_paths(self) -> list[tuple[str, ...]]:
    """Path of every conv's logits under ``arch["width_logits"]``, in order."""
    paths = [("stem",)]
    for s, n in enumerate(self.full_depths):
      for b in range(n):
        paths.extend((f"stage{s}_block{b}", f"conv_{'abc'[i]}")
                     for i in range(self.convs_per_block))
    return paths

  @nn.nowrap
  def width_logits(self, arch: Mapping[str, Any]) -> list[jax.Array]:
    """Every conv's width logits alpha from the ``arch`` collection."""
    out = []
    for path in self.conv_paths():
      node = arch["width_logits"]
      for name in path:
        node = node[name]
      out.append(node)
    return out

  @nn.nowrap
  def depth_logits(self, arch: Mapping[str, Any]) -> list[jax.Array]:
    """Every stage's depth logits beta from the ``arch`` collection."""
    return [arch["depth_logits"][f"stage{s}"]
            for s in range(len(self.full_depths))]

  @nn.nowrap
  def init_arch(self, key: jax.Array) -> dict[str, Any]:
    """A fresh ``arch`` collection: every logit vector N(0, 0.01) (§1)."""
    width_key, depth_key = jax.random.split(key)
    width_logits = {}
    for i, (path, candidates) in enumerate(zip(self.conv_paths(),
                                               self.conv_candidates())):
      node = width_logits
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = ARCH_INIT_STD * jax.random.normal(
          jax.random.fold_in(width_key, i), (len(candidates),))
    depth_logits = {
        f"stage{s}": ARCH_INIT_STD * jax.random.normal(
            jax.random.fold_in(depth_key, s), (len(choices),))
        for s, choices in enumerate(self.stage_candidates())}
    return {"width_logits": width_logits, "depth_logits": depth_logits}

  @nn.nowrap
  def derive(self, arch: Mapping[str, Any]) -> dict[str, list[int]]:
    """The argmax architecture (tas.md §7), on the host.

    Args:
      arch: the ``arch`` collection (concrete arrays).

    Returns:
      ``{"widths": [...], "blocks": [...]}``: the argmax width of every conv
      of the full-depth network (stem first, the ``widths`` format of
      :func:`jaxprune.models.cifar_resnet` and
      :func:`jaxprune.models.imagenet_resnet`) and the argmax depth of every
      stage; :meth:`derived_network` builds the plain network from them.
    """
    widths = [int(c[int(np.argmax(np.asarray(a)))])
              for c, a in zip(self.conv_candidates(), self.width_logits(arch))]
    blocks = [int(c[int(np.argmax(np.asarray(b)))])
              for c, b in zip(self.stage_candidates(), self.depth_logits(arch))]
    return {"widths": widths, "blocks": blocks}

  @nn.nowrap
  def derived_network(self, arch: Mapping[str, Any],
                      **kwargs: Any) -> resnet.ResNet:
    """The plain :class:`ResNet` of the argmax architecture (§7).

    Args:
      arch: the ``arch`` collection (concrete arrays).
      **kwargs: passed to :func:`cifar_resnet` or :func:`imagenet_resnet`
        (e.g. ``dtype``).
    """
    return self.plain_network(**self.derive(arch), **kwargs)

  @nn.nowrap
  def plain_network(self, **kwargs: Any) -> resnet.ResNet:
    """The standard (unpruned) ResNet this search space is built on.

    Args:
      **kwargs: passed to :func:`cifar_resnet` or :func:`imagenet_resnet`
        (``widths`` and ``blocks`` give a searched shape).
    """
    if self.layout == "imagenet":
      return resnet.imagenet_resnet(self.depth, self.num_classes, **kwargs)
    return resnet.cifar_resnet(self.depth, self.num_classes, block=self.block,
                               **kwargs)

  @nn.nowrap
  def sample(self, arch: Mapping[str, Any], tau, key: jax.Array
             ) -> tuple[list[Selection], list[jax.Array]]:
    """Draws every conv's width picks and every stage's depth weights (§2).

    Args:
      arch: the ``arch`` collection (may be traced).
      tau: Gumbel temperature.
      key: PRNG key.

    Returns:
      ``(selections, depth_probs)``: one :class:`Selection` per conv in
      ``widths`` order, one Gumbel-softmax vector per stage.
    """
    width_key, depth_key = jax.random.split(key)
    alphas, candidates = self.width_logits(arch), self.conv_candidates()
    selections = [None] * len(alphas)
    # One draw per candidate count (one in practice): rows are independent.
    for n in sorted({len(c) for c in candidates}):
      rows = [i for i, c in enumerate(candidates) if len(c) == n]
      if n == 1:  # a `whole` conv: its one candidate, every pick, all the weight
        for i in rows:
          selections[i] = Selection(
              jnp.zeros((self.num_picks,), jnp.int32),
              jax.nn.one_hot(0, self.num_picks, dtype=jnp.float32),
              jnp.full((self.num_picks,), candidates[i][0], jnp.int32))
        continue
      indices, weights = kernels.gumbel_select(
          jax.random.fold_in(width_key, n),
          jnp.stack([alphas[i] for i in rows]), tau, k=self.num_picks)
      table = jnp.asarray([candidates[i] for i in rows], jnp.int32)
      widths = jnp.take_along_axis(table, indices, axis=-1)
      for r, i in enumerate(rows):
        selections[i] = Selection(indices[r], weights[r], widths[r])
    betas = self.depth_logits(arch)
    depth_probs = [None] * len(betas)
    for n in sorted({len(b) for b in betas}):
      rows = [s for s, b in enumerate(betas) if len(b) == n]
      probs = kernels.gumbel_softmax(jax.random.fold_in(depth_key, n),
                                     jnp.stack([betas[s] for s in rows]), tau)
      for r, s in enumerate(rows):
        depth_probs[s] = probs[r]
    return selections, depth_probs

  # --- search-mode forward -------------------------------------------------

  @nn.compact
  def __call__(self, x, *, train: bool, tau, key):
    """Search-mode forward (tas.md §4).

    Args:
      x: ``[N, H, W, 3]`` images.
      train: batch statistics (and update of the picked candidates' running
        statistics) or running statistics; both modes sample.
      tau: Gumbel temperature (float or traced scalar).
      key: PRNG key of this step's Gumbel noise.

    Returns:
      ``[N, num_classes]`` float32 logits.
    """
    _check_space(self.depth, self.layout, self.block, self.num_picks, self.round_to)
    n_convs = len(self.full_widths())
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n_convs
           for i in self.whole):
      raise UserError(f"TASResNet whole={self.whole!r}: conv indices in [0, {n_convs}).")
    fresh = {}  # init: one draw serves both logit trees

    def init(name):
      if not fresh:
        fresh.update(self.init_arch(self.make_rng("params")))
      return fresh[name]
    arch = {name: self.variable("arch", name, init, name).value
            for name in ("width_logits", "depth_logits")}
    selections, depth_probs = self.sample(arch, tau, key)

    widths, candidates = self.full_widths(), self.conv_candidates()
    x = jnp.asarray(x, self.dtype)
    cifar = self.layout == "cifar"
    x = SearchConv(widths[0], 3 if cifar else 7, 1 if cifar else 2,
                   dtype=self.dtype, precision=self.precision,
                   candidates=candidates[0], name="stem")(x, selections[0], train=train)
    if not cifar:
      # The plain ImageNet stem's max pool (resnet.ResNet).
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    width = selections[0].out_width
    per_block = self.convs_per_block
    offset = 1  # index in `widths` of the current block's first conv
    for s, (n, choices) in enumerate(zip(self.full_depths,
                                         self.stage_candidates())):
      features, feature_widths = [], []
      for b in range(n):
        stride = 2 if (s > 0 and b == 0) else 1
        block_widths = tuple(widths[offset:offset + per_block])
        x, width = SearchBlock(
            block_widths, self.block, stride,
            shortcut=stride != 1 or x.shape[-1] != block_widths[-1],
            dtype=self.dtype, precision=self.precision, layout=self.layout,
            candidates=tuple(candidates[offset:offset + per_block]),
            name=f"stage{s}_block{b}")(
                x, width, selections[offset:offset + per_block], train=train)
        offset += per_block
        if b + 1 in choices:
          features.append(x)
          feature_widths.append(width)
      x, width = depth_mix(features, feature_widths, depth_probs[s])

    x = jnp.mean(x, axis=(-3, -2))
    # Zeros beyond the valid width: the classifier reads only its first C_in
    # columns of the full-width weight (§4).
    x = nn.Dense(self.num_classes, kernel_init=dense_init,
                 bias_init=nn.initializers.zeros, dtype=self.dtype,
                 precision=self.precision, name="classifier")(x)
    return x.astype(jnp.float32)


def _check_space(depth, layout, block, num_picks, round_to=1):
  """Raises UserError unless the search space is well defined."""
  if layout not in resnet.LAYOUTS:
    raise UserError(f"Unknown ResNet layout {layout!r}; use one of "
                    f"{resnet.LAYOUTS}.")
  if block not in resnet.BLOCK_TYPES:
    raise UserError(f"Unknown ResNet block {block!r}; use one of "
                    f"{resnet.BLOCK_TYPES}.")
  if layout == "imagenet" and block != resnet.block_type(depth, layout):
    raise UserError(f"ImageNet ResNet-{depth} uses "
                    f"{resnet.block_type(depth, layout)} blocks, not "
                    f"{block!r}.")
  resnet.stage_depths(depth, layout, block)  # validates the depth
  if not isinstance(num_picks, int) or num_picks < 1:
    raise UserError(f"num_picks must be a positive int, got {num_picks!r} "
                    "(TAS uses 2).")
  if (isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer))
      or round_to < 1):
    raise UserError(f"round_to must be an int >= 1, got {round_to!r}.")
  too_narrow = [c for c in resnet.default_widths(depth, layout, block)
                if len(width_candidates(c)) < num_picks]
  if too_narrow:
    raise UserError(f"num_picks={num_picks} exceeds the width candidates of "
                    f"convs with {sorted(set(too_narrow))} channels.")


def tas_cifar_resnet(depth: int, num_classes: int = 10, *,
                     block: str | None = None, num_picks: int = 2,
                     dtype: Any = jnp.float32,
                     precision: Any = None, round_to: int = 1) -> TASResNet:
  """The TAS searchable CIFAR ResNet-`depth` (tas.md §1, §4).

  Args:
    depth: 6n+2 (basic: 20, 32, 56, 110) or 9n+2 (bottleneck: 164).
    num_classes: classifier outputs.
    block: "basic" or "bottleneck"; defaults to :func:`block_type`.
    num_picks: |I|, width candidates mixed per conv (§2); must be >= 2 for
      the width logits to receive gradients.
    dtype: compute dtype.
    precision: precision of the mix and classifier matmuls (e.g.
      ``jax.lax.Precision.HIGHEST``); convs use the backend default.
    round_to: candidates rounded to its multiples (:class:`TASResNet`); 1: the reference's.

  Returns:
    A :class:`TASResNet`.

  Example:
    >>> model = tas_cifar_resnet(20)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> variables = model.init(jax.random.key(0), x, train=False, tau=5.0,
    ...                        key=jax.random.key(1))
    >>> logits, updates = model.apply(variables, x, train=True, tau=5.0,
    ...     key=jax.random.key(2), mutable=["batch_stats"])
    >>> model.derive(variables["arch"])  # {"widths": [...], "blocks": [...]}
  """
  block = block or resnet.block_type(depth, "cifar")
  _check_space(depth, "cifar", block, num_picks, round_to)
  return TASResNet(depth=depth, block=block, num_classes=num_classes,
                   num_picks=num_picks, dtype=dtype, precision=precision,
                   round_to=int(round_to))


def tas_imagenet_resnet(depth: int, num_classes: int = 1000, *,
                        num_picks: int = 2, dtype: Any = jnp.float32,
                        precision: Any = None, round_to: int = 1) -> TASResNet:
  """The TAS searchable ImageNet ResNet-`depth` (tas.md §1, §4).

  The torchvision layout of :func:`imagenet_resnet`: every conv (the 7x7/2
  stem included) has the width candidates of :func:`width_candidates`, every
  stage the depth candidates of :func:`imagenet_depth_candidates` (ResNet-18:
  (1, 2) per stage; ResNet-50: (1, 2, 3), (1, 2, 4), (2, 4, 6), (1, 2, 3)).
  Stride-2 and channel-changing shortcuts are a 1x1 conv carrying the stride
  plus a per-candidate BN, the kind the derived network has (no public
  ImageNet search script exists, §6). ``model.derived_network(arch)`` is
  ``imagenet_resnet(depth, widths=..., blocks=...)``.

  Args:
    depth: 18, 34 (basic blocks), 50, 101 or 152 (bottleneck blocks).
    num_classes: classifier outputs.
    num_picks: |I|, width candidates mixed per conv (§2).
    dtype: compute dtype.
    precision: precision of the mix and classifier matmuls.
    round_to: candidates rounded to its multiples (:class:`TASResNet`); 1: the reference's.

  Returns:
    A :class:`TASResNet` with ``layout="imagenet"``.

  Example:
    >>> model = tas_imagenet_resnet(18)
    >>> x = jnp.zeros((2, 224, 224, 3))
    >>> variables = model.init(jax.random.key(0), x, train=False, tau=5.0,
    ...                        key=jax.random.key(1))
  """
  block = resnet.block_type(depth, "imagenet")  # validates the depth
  _check_space(depth, "imagenet", block, num_picks, round_to)
  return TASResNet(depth=depth, block=block, num_classes=num_classes,
                   num_picks=num_picks, dtype=dtype, precision=precision,
                   layout="imagenet", round_to=int(round_to))


__all__ = [
    "width_candidates", "depth_candidates",
    "imagenet_depth_candidates", "Selection", "CandidateBatchNorm",
    "SearchConv", "SearchBlock", "depth_mix", "TASResNet", "tas_cifar_resnet",
    "tas_imagenet_resnet",
]
