"""Plain CIFAR and ImageNet ResNets with explicit per-conv widths and per-stage depths.

The widths/blocks format is TAS's released shapes (docs/methods/tas.md §1, §10). Describes
networks only: no FLOPs, no search state (docs/design/models.md).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.errors import UserError
from jaxprune.models import layers

# Kaiming normal, fan_out (tas.md §1; torchvision uses the same for ImageNet).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Linear classifier N(0, 0.01), bias 0 (tas.md §1).
dense_init = nn.initializers.normal(stddev=0.01)

LAYOUTS = ("cifar", "imagenet")
BLOCK_TYPES = ("basic", "bottleneck")

_STAGE_PLANES = {"cifar": (16, 32, 64), "imagenet": (64, 128, 256, 512)}
_STEM_WIDTH = {"cifar": 16, "imagenet": 64}
_EXPANSION = {"basic": 1, "bottleneck": 4}
_CONVS_PER_BLOCK = {"basic": 2, "bottleneck": 3}
_IMAGENET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def block_type(depth: int, layout: str = "cifar") -> str:
  """The block type ("basic" or "bottleneck") of the standard ResNet-`depth`.

  CIFAR depths 6n+2 below 164 use basic blocks; 164 and deeper use bottleneck
  blocks (9n+2), as ResNet-164 does in TAS (tas.md §1).
  """
  _check_layout(layout)
  if layout == "imagenet":
    return _imagenet_spec(depth)[0]
  return "bottleneck" if depth >= 164 else "basic"


def stage_depths(depth: int, layout: str = "cifar",
                 block: str | None = None) -> tuple[int, ...]:
  """Blocks per stage of the full-depth ResNet-`depth`."""
  _check_layout(layout)
  if layout == "imagenet":
    return _imagenet_spec(depth)[1]
  block = block or block_type(depth, layout)
  _check_block(block)
  per_block = 3 * _CONVS_PER_BLOCK[block]  # 3 stages of n blocks, plus 2.
  if not isinstance(depth, int) or depth < 2 + per_block or (
      (depth - 2) % per_block):
    raise UserError(
        f"CIFAR ResNet depth {depth} is not valid for {block} blocks: use "
        f"depth = {per_block}n + 2 with n >= 1 (e.g. "
        f"{'20, 32, 56, 110' if block == 'basic' else '164'}).")
  return (((depth - 2) // per_block),) * 3


def default_widths(depth: int, layout: str = "cifar",
                   block: str | None = None) -> list[int]:
  """Output widths of every conv of the standard ResNet-`depth`, in order.

  The order is the stem, then each block's convs (conv_a, conv_b for basic,
  conv_a, conv_b, conv_c for bottleneck blocks), stage by stage; shortcut convs
  are not listed (their width is the block's last width). This is TAS's
  ``xchannels[1:]`` (tas.md §10).
  """
  block = block or block_type(depth, layout)
  depths = stage_depths(depth, layout, block)
  widths = [_STEM_WIDTH[layout]]
  for planes, n in zip(_STAGE_PLANES[layout], depths):
    conv_widths = [planes] * (_CONVS_PER_BLOCK[block] - 1)
    conv_widths.append(planes * _EXPANSION[block])
    widths.extend(conv_widths * n)
  return widths


def default_blocks(depth: int, layout: str = "cifar",
                   block: str | None = None) -> list[int]:
  """Blocks kept per stage by the standard ResNet-`depth` (all of them)."""
  return list(stage_depths(depth, layout, block))


def _check_layout(layout):
  if layout not in LAYOUTS:
    raise UserError(f"Unknown ResNet layout {layout!r}; use one of {LAYOUTS}.")


def _check_block(block):
  if block not in BLOCK_TYPES:
    raise UserError(
        f"Unknown ResNet block {block!r}; use one of {BLOCK_TYPES}.")


def _imagenet_spec(depth):
  if depth not in _IMAGENET_STAGES:
    raise UserError(f"ImageNet ResNet depth {depth} is not supported; use one "
                    f"of {sorted(_IMAGENET_STAGES)}.")
  return _IMAGENET_STAGES[depth]


def validate_shape(widths: Sequence[int], blocks: Sequence[int],
                   full_depths: Sequence[int], block: str) -> None:
  """Raises UserError unless `widths`/`blocks` fit the full-depth network."""
  expected = 1 + _CONVS_PER_BLOCK[block] * sum(full_depths)
  if len(widths) != expected:
    raise UserError(
        f"widths has {len(widths)} entries; a {block}-block ResNet with stage "
        f"depths {list(full_depths)} has {expected} convs (the stem, then "
        f"{_CONVS_PER_BLOCK[block]} per block of the full-depth network, also "
        "for dropped blocks). Pass xchannels[1:] of a released shape.")
  bad = [w for w in widths
         if not isinstance(w, int) or isinstance(w, bool) or w < 1]
  if bad:
    raise UserError(f"widths must be positive integers; got {bad}.")
  if len(blocks) != len(full_depths):
    raise UserError(f"blocks has {len(blocks)} entries; the network has "
                    f"{len(full_depths)} stages.")
  for s, (kept, full) in enumerate(zip(blocks, full_depths)):
    if not isinstance(kept, int) or isinstance(kept, bool) or not (
        1 <= kept <= full):
      raise UserError(f"blocks[{s}] = {kept} is out of range: stage {s} has "
                      f"{full} blocks, keep between 1 and {full}.")


def _conv(features, kernel, stride, dtype, name):
  # PyTorch padding (k // 2 each side): stride-2 windows line up as in torch.
  pad = kernel // 2
  return layers.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_init, dtype=dtype, name=name)


def _batch_norm(train, dtype, name, zero_scale=False):
  # PyTorch defaults: momentum 0.1 there is 0.9 here; eps 1e-5.
  return layers.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      scale_init=(nn.initializers.zeros if zero_scale
                                  else nn.initializers.ones),
                      dtype=dtype, name=name)


class ResidualBlock(nn.Module):
  """A basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1) residual block.

  Attributes:
    widths: output width of each conv (2 for basic, 3 for bottleneck).
    block: "basic" or "bottleneck".
    stride: stride of the block's 3x3 conv (the first conv of a basic block,
      the middle one of a bottleneck block).
    shortcut: "identity", "conv" (1x1, no BN), "conv_bn" (1x1 + BN, carries
      the stride) or "avgpool_conv" (2x2 average pool, then 1x1 conv, no BN).
    zero_init_residual: start the last BN's scale at 0.
    dtype: compute dtype.
  """
  widths: Sequence[int]
  block: str = "basic"
  stride: int = 1
  shortcut: str = "identity"
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kernels = (3, 3) if self.block == "basic" else (1, 3, 1)
    stride_at = 0 if self.block == "basic" else 1
    last = len(self.widths) - 1
    y = x
    for i, (width, kernel) in enumerate(zip(self.widths, kernels)):
      letter = "abc"[i]
      y = _conv(width, kernel, self.stride if i == stride_at else 1,
                self.dtype, f"conv_{letter}")(y)
      y = _batch_norm(train, self.dtype, f"bn_{letter}",
                      zero_scale=self.zero_init_residual and i == last)(y)
      if i != last:
        y = nn.relu(y)

    out = self.widths[-1]
    if self.shortcut == "identity":
      residual = x
    elif self.shortcut == "avgpool_conv":
      # TAS stride-2 shortcut: 2x2 average pool, then a 1x1 conv, no BN (§1).
      residual = nn.avg_pool(x, (2, 2), strides=(2, 2))
      residual = _conv(out, 1, 1, self.dtype, "shortcut_conv")(residual)
    else:
      residual = _conv(out, 1, self.stride, self.dtype, "shortcut_conv")(x)
      if self.shortcut == "conv_bn":
        residual = _batch_norm(train, self.dtype, "shortcut_bn")(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """A ResNet built from explicit per-conv widths and per-stage block counts.

  Attributes:
    widths: output width of every conv of the full-depth network: the stem, then
      each block's convs in order (TAS ``xchannels[1:]``). Widths of dropped
      blocks are ignored.
    blocks: blocks kept per stage (TAS ``xblocks``); a stage keeps its first
      ``blocks[s]`` blocks and the next stage reads the last kept block.
    full_depths: blocks per stage of the full-depth network (indexes `widths`).
    block: "basic" or "bottleneck".
    layout: "cifar" (3x3 stem, TAS shortcuts, tas.md §1) or "imagenet"
      (torchvision: 7x7/2 stem + 3x3/2 max pool, 1x1 conv + BN shortcuts).
    num_classes: classifier outputs.
    zero_init_residual: start each block's last BN scale at 0.
    dtype: compute dtype; parameters stay float32 and logits are float32.

  Parameter paths: ``stem_conv``, ``stem_bn``;
  ``stage{s}_block{b}/conv_{a,b,c}`` and ``bn_{a,b,c}`` (0-based s and b);
  ``.../shortcut_conv`` and ``.../shortcut_bn`` where a block has them;
  ``classifier``.
  """
  widths: Sequence[int]
  blocks: Sequence[int]
  full_depths: Sequence[int]
  block: str = "basic"
  layout: str = "cifar"
  num_classes: int = 10
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_layout(self.layout)
    _check_block(self.block)
    validate_shape(self.widths, self.blocks, self.full_depths, self.block)
    cifar = self.layout == "cifar"
    x = jnp.asarray(x, self.dtype)

    x = _conv(self.widths[0], 3 if cifar else 7, 1 if cifar else 2, self.dtype,
              "stem_conv")(x)
    x = nn.relu(_batch_norm(train, self.dtype, "stem_bn")(x))
    if not cifar:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    per_block = _CONVS_PER_BLOCK[self.block]
    offset = 1  # index in `widths` of the current block's first conv
    # The shortcut follows the configured widths, not the input's: a network rebuilt
    # at pruned widths (jaxprune.surgery.rebuild) keeps the original's structure.
    in_width = self.widths[0]
    for s, (full, kept) in enumerate(zip(self.full_depths, self.blocks)):
      for b in range(kept):
        stride = 2 if (s > 0 and b == 0) else 1
        widths = tuple(self.widths[offset + b * per_block:
                                   offset + (b + 1) * per_block])
        x = ResidualBlock(
            widths, self.block, stride,
            self._shortcut(in_width, widths[-1], stride),
            self.zero_init_residual, self.dtype, name=f"stage{s}_block{b}")(
                x, train)
        in_width = widths[-1]
      offset += full * per_block

    x = jnp.mean(x, axis=(-3, -2))
    x = nn.Dense(self.num_classes, kernel_init=dense_init,
                 bias_init=nn.initializers.zeros, dtype=self.dtype,
                 name="classifier")(x)
    return x.astype(jnp.float32)

  def _shortcut(self, in_width, out_width, stride):
    """Shortcut kind of a block (tas.md §1, §7; torchvision for ImageNet)."""
    if stride == 1 and in_width == out_width:
      return "identity"
    if self.layout == "imagenet":
      return "conv_bn"
    if stride != 1:
      return "avgpool_conv"
    return "conv_bn" if self.block == "basic" else "conv"


def _build(depth, layout, num_classes, widths, blocks, block, dtype,
           zero_init_residual):
  if layout == "imagenet":
    if block is not None and block != block_type(depth, layout):
      raise UserError(f"ImageNet ResNet-{depth} uses "
                      f"{block_type(depth, layout)} blocks, not {block!r}.")
  block = block or block_type(depth, layout)
  _check_block(block)
  full = stage_depths(depth, layout, block)
  widths = tuple(default_widths(depth, layout, block) if widths is None
                 else (int(w) if _is_integral(w) else w for w in widths))
  blocks = tuple(full if blocks is None
                 else (int(b) if _is_integral(b) else b for b in blocks))
  validate_shape(widths, blocks, full, block)
  return ResNet(widths=widths, blocks=blocks, full_depths=full, block=block,
                layout=layout, num_classes=num_classes,
                zero_init_residual=zero_init_residual, dtype=dtype)


def _is_integral(v):
  # Accept numpy integers from JSON/arrays, reject floats and bools.
  return hasattr(v, "__index__") and not isinstance(v, bool)


def cifar_resnet(depth: int, num_classes: int = 10, *,
                 widths: Sequence[int] | None = None,
                 blocks: Sequence[int] | None = None,
                 block: str | None = None,
                 zero_init_residual: bool = False,
                 dtype: Any = jnp.float32) -> ResNet:
  """The CIFAR ResNet of TAS (tas.md §1), optionally with a searched shape.

  Args:
    depth: 6n+2 (basic blocks: 20, 32, 56, 110) or 9n+2 (bottleneck: 164).
    num_classes: classifier outputs.
    widths: output width of every conv of the full-depth network (stem, then
      each block's convs); defaults to :func:`default_widths`.
    blocks: blocks kept per stage; defaults to all.
    block: "basic" or "bottleneck"; defaults to :func:`block_type`.
    zero_init_residual: start each block's last BN scale at 0.
    dtype: compute dtype (parameters stay float32).

  Returns:
    A :class:`ResNet`; ``model.apply(variables, x, train=...)`` maps NHWC
    images to float32 logits.

  Example:
    >>> model = cifar_resnet(20)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  """
  return _build(depth, "cifar", num_classes, widths, blocks, block, dtype,
                zero_init_residual)


def imagenet_resnet(depth: int, num_classes: int = 1000, *,
                    widths: Sequence[int] | None = None,
                    blocks: Sequence[int] | None = None,
                    zero_init_residual: bool = False,
                    dtype: Any = jnp.float32) -> ResNet:
  """A torchvision-layout ImageNet ResNet (18, 34, 50, 101, 152).

  Same `widths`/`blocks` convention as :func:`cifar_resnet`: the stem's width,
  then each block's convs in order (TAS ``xchannels[1:]``).
  """
  return _build(depth, "imagenet", num_classes, widths, blocks, None, dtype,
                zero_init_residual)


def _from_shape(factory, xchannels, xblocks, num_classes, **kwargs):
  xchannels = list(xchannels)
  if not xchannels or xchannels[0] != 3:
    raise UserError("xchannels must start with the input channels (3), then "
                    "list every conv's width, as in tas_released_shapes.json.")
  # Depth 6n+2 (basic) or 9n+2 (bottleneck) nets have depth - 1 convs, so the
  # released format (input channels + one width per conv) has `depth` entries.
  return factory(len(xchannels), num_classes, widths=xchannels[1:],
                 blocks=list(xblocks), **kwargs)


def cifar_resnet_from_shape(xchannels: Sequence[int], xblocks: Sequence[int],
                            num_classes: int = 10, **kwargs) -> ResNet:
  """A CIFAR ResNet from a TAS released shape (tas.md §10).

  Args:
    xchannels: 3, then every conv's width (the json's ``xchannels``).
    xblocks: blocks kept per stage (the json's ``xblocks``).
    num_classes: classifier outputs.
    **kwargs: passed to :func:`cifar_resnet` (block, dtype, ...).
  """
  return _from_shape(cifar_resnet, xchannels, xblocks, num_classes, **kwargs)


def imagenet_resnet_from_shape(xchannels: Sequence[int],
                               xblocks: Sequence[int],
                               num_classes: int = 1000, **kwargs) -> ResNet:
  """An ImageNet ResNet from a TAS released shape (tas.md §10)."""
  return _from_shape(imagenet_resnet, xchannels, xblocks, num_classes,
                     **kwargs)


__all__ = [
    "ResNet", "ResidualBlock", "block_type", "stage_depths", "default_widths",
    "default_blocks", "validate_shape", "cifar_resnet", "imagenet_resnet",
    "cifar_resnet_from_shape", "imagenet_resnet_from_shape",
]
