"""A model zoo for jaxprune's graph, surgery and FLOPs: architectures written the way
Flax users write them, independently of ``jaxprune.models``, each with

- a Linen module (:mod:`zoo.linen_models`) and, where natural, an NNX twin
  (:mod:`zoo.nnx_models`) with the same parameter paths;
- explicit per-layer widths (``Arch.widths``): a pruned network is the same code with
  smaller widths;
- a closed-form hand count of FLOPs and params as a function of the widths
  (:mod:`zoo.counts`);
- ``widths_of(params)``: the widths read back from a (pruned) params tree, so a test
  can check ``count(widths_of(pruned))``.

``params`` everywhere here is a plain nested dict without a collection prefix: the
Linen ``variables["params"]`` or ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``.
"""
import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import counts
from zoo import linen_models as L
from zoo import nnx_models as N

INPUT_SHAPE = (16, 16, 3)


@dataclasses.dataclass(frozen=True)
class Arch:
  name: str
  widths: dict[str, int]            # the full network's widths
  linen: Callable[..., nn.Module]   # widths as keyword arguments
  nnx: Callable[..., nnx.Module] | None  # widths as keyword arguments + rngs=
  count: Callable[[dict], dict]     # hand count: widths -> {"flops", "params"}
  widths_of: Callable[[dict], dict]  # params tree -> widths
  output_shape: tuple = (counts.CLASSES,)
  input_shape: tuple = INPUT_SHAPE
  # (leaf-path regex, axis or None): a group with such a member is not exactly removable
  # under a mask, with the reason (see ``masked_exact``).
  inexact: tuple = ()
  # widths -> whether the same model code can be built with them (the stock
  # attention has one head_dim for q, k and v).
  buildable: Callable[[dict], bool] = lambda w: True

  def build_linen(self, widths=None):
    return self.linen(**(widths or self.widths))

  def build_nnx(self, widths=None, seed=0):
    return self.nnx(**(widths or self.widths), rngs=nnx.Rngs(seed))


def shape(params, path):
  """Shape of the leaf at '/'-joined `path` of a nested dict (arrays or shape structs)."""
  node = params
  for k in path.split("/"):
    node = node[k]
  return tuple(np.shape(node))


def _outs(*names):
  """widths_of for widths that are each one kernel's output features."""
  def widths_of(params):
    return {w: shape(params, p + "/kernel")[-1] for w, p in names}
  return widths_of


def _split_widths(params):
  right = shape(params, "pw1/kernel")[-2]
  return {"left": shape(params, "conv_stem/kernel")[-1] - right, "right": right,
          "b": shape(params, "pw1/kernel")[-1], "r2": shape(params, "pw2/kernel")[-1],
          "c3": shape(params, "fuse/kernel")[-1]}


def _vit_widths(params):
  q, v = shape(params, "attn/query/kernel"), shape(params, "attn/value/kernel")
  return {"embed": shape(params, "patch/kernel")[-1], "heads": q[1], "qk_dim": q[2],
          "v_dim": v[2], "mlp": shape(params, "mlp1/kernel")[-1]}


def _bottleneck_widths(params):
  w = {"stem": shape(params, "conv_init/kernel")[-1]}
  for s in ("s1", "s2"):
    w[s + "_out"] = shape(params, f"{s}b0/conv3/kernel")[-1]
    for b in (0, 1):
      w[f"{s}b{b}_a"] = shape(params, f"{s}b{b}/conv1/kernel")[-1]
      w[f"{s}b{b}_b"] = shape(params, f"{s}b{b}/conv2/kernel")[-1]
  return w


# LayerNorm normalises over the embedding: a zeroed channel still enters the mean
# and variance, so removing it changes the other channels' outputs.
_LN = ((r"(^|/)ln\w*/(scale|bias)$", None),)
# Attention scales q.k by 1/sqrt(head_dim), read from the shape: removing qk_dim
# channels changes the softmax temperature.
_QK = ((r"(^|/)attn/query/kernel$", 2),)

ZOO = [
    Arch("plain_cnn", {"c1": 8, "c2": 12}, L.PlainCNN, N.PlainCNN, counts.plain_cnn,
         _outs(("c1", "conv1"), ("c2", "conv2"))),
    Arch("vgg", {"c1": 8, "c2": 8, "c3": 12, "c4": 12, "hidden": 16}, L.VGG, N.VGG,
         counts.vgg, _outs(("c1", "conv1"), ("c2", "conv2"), ("c3", "conv3"),
                           ("c4", "conv4"), ("hidden", "fc1"))),
    Arch("resnet_basic", {"stem": 8, "s1b0": 6, "s1b1": 6, "s2": 12, "s2b0": 10, "s2b1": 10},
         L.ResNetBasic, N.ResNetBasic, counts.resnet_basic,
         _outs(("stem", "conv_init"), ("s1b0", "s1b0/conv1"), ("s1b1", "s1b1/conv1"),
               ("s2", "s2b0/conv2"), ("s2b0", "s2b0/conv1"), ("s2b1", "s2b1/conv1"))),
    Arch("resnet_bottleneck",
         {"stem": 8, "s1_out": 24, "s1b0_a": 6, "s1b0_b": 6, "s1b1_a": 6, "s1b1_b": 6,
          "s2_out": 32, "s2b0_a": 8, "s2b0_b": 8, "s2b1_a": 8, "s2b1_b": 8},
         L.ResNetBottleneck, N.ResNetBottleneck, counts.resnet_bottleneck, _bottleneck_widths,
         # Flax's block adds conv_proj when the shapes differ: the count assumes it does.
         buildable=lambda w: w["stem"] != w["s1_out"]),
    Arch("mobilenet_v1", {"c0": 8, "c1": 12, "c2": 16}, L.MobileNetV1, N.MobileNetV1,
         counts.mobilenet_v1, _outs(("c0", "conv_stem"), ("c1", "pw1"), ("c2", "pw2"))),
    Arch("mobilenet_v2", {"c0": 8, "e1": 16, "c2": 12, "e2": 24, "e3": 24, "ch": 16},
         L.MobileNetV2, N.MobileNetV2, counts.mobilenet_v2,
         _outs(("c0", "conv_stem"), ("e1", "b1/expand"), ("c2", "b2/project"),
               ("e2", "b2/expand"), ("e3", "b3/expand"), ("ch", "conv_head"))),
    Arch("densenet", {"c0": 8, "g1": 6, "g2": 6, "g3": 6, "t": 10}, L.DenseNet, N.DenseNet,
         counts.densenet, _outs(("c0", "conv_stem"), ("g1", "layer1_conv"),
                                ("g2", "layer2_conv"), ("g3", "layer3_conv"),
                                ("t", "trans_conv"))),
    Arch("split_concat", {"left": 6, "right": 6, "b": 8, "r2": 6, "c3": 12},
         L.SplitConcat, N.SplitConcat, counts.split_concat, _split_widths),
    Arch("unet", {"e1": 6, "e2": 8, "m": 12, "u2": 8, "d2": 8, "u1": 6, "d1": 6},
         L.UNet, N.UNet, counts.unet,
         _outs(("e1", "enc1"), ("e2", "enc2"), ("m", "mid"), ("u2", "up2"), ("d2", "dec2"),
               ("u1", "up1"), ("d1", "dec1")),
         output_shape=(16, 16, counts.UNET_OUT)),
    Arch("mlp", {"h1": 16, "h2": 12}, L.MLP, N.MLP, counts.mlp,
         _outs(("h1", "fc1"), ("h2", "fc2"))),
    Arch("vit", {"embed": 16, "heads": 4, "qk_dim": 4, "v_dim": 4, "mlp": 32}, L.ViT, N.ViT,
         counts.vit, _vit_widths, inexact=_LN + _QK,
         buildable=lambda w: w["qk_dim"] == w["v_dim"]),
    Arch("remat_cnn", {"c0": 8, "m1": 8, "m2": 8}, L.RematCNN, N.RematCNN, counts.remat_cnn,
         _outs(("c0", "conv_stem"), ("m1", "block1/conv1"), ("m2", "block2/conv1"))),
    Arch("jaxprune_conv", {"c1": 8, "c2": 8}, L.JaxpruneConv, N.JaxpruneConv,
         counts.jaxprune_conv, _outs(("c1", "conv1"), ("c2", "conv2"))),
]
BY_NAME = {a.name: a for a in ZOO}


def masked_exact(arch: Arch, member_axes) -> bool:
  """Whether removing a masked group gives exactly the masked network's outputs.

  Args:
    member_axes: (leaf path without collection prefix, axis) of the group's members.
  """
  for pattern, axis in arch.inexact:
    for path, ax in member_axes:
      if re.search(pattern, path) and (axis is None or axis == ax):
        return False
  return True


# ---------------------------------------------------------------- initialisation

def _perturb(path: str, leaf, rng: np.random.Generator):
  """Random values for leaves that init sets to constants (biases, BN, cls), so a
  test sees every parameter: BN scale 1 +- 0.2, biases and means small, var in
  [0.5, 1.5]. numpy, so that no XLA computation is compiled for it."""
  name = path.rsplit("/", 1)[-1]
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  size = np.shape(leaf)
  if name == "scale":
    return jnp.asarray(1.0 + 0.2 * rng.standard_normal(size), leaf.dtype)
  if name in ("bias", "mean", "cls"):
    return jnp.asarray(0.1 * rng.standard_normal(size), leaf.dtype)
  if name == "var":
    return jnp.asarray(rng.uniform(0.5, 1.5, size), leaf.dtype)
  return leaf


def _path(keypath) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def perturbed(tree, seed: int):
  """``tree`` (a Linen variables dict or a pure NNX state dict) with random constants."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(lambda p, leaf: _perturb(_path(p), leaf, rng), tree)


def init_linen(arch: Arch, widths=None, seed: int = 0, abstract: bool = False):
  """(module, variables) with perturbed constants (see :func:`_perturb`); with
  `abstract`, variables are shape structs (nothing is computed)."""
  model = arch.build_linen(widths)
  x = jnp.zeros((1,) + arch.input_shape)
  init = lambda key: model.init(key, x, train=False)
  if abstract:
    return model, dict(jax.eval_shape(init, jax.random.key(seed)))
  return model, perturbed(dict(init(jax.random.key(seed))), seed + 1)


def nnx_from_linen(model: nnx.Module, variables) -> nnx.Module:
  """Loads a twin's Linen variables (params + batch_stats) into the NNX `model`."""
  state = nnx.to_pure_dict(nnx.state(model))
  flat = {}
  for coll in variables.values():
    flat.update({_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(coll)[0]})
  new = jax.tree_util.tree_map_with_path(lambda p, leaf: flat[_path(p)], state)
  nnx.replace_by_pure_dict(st := nnx.state(model), new)
  nnx.update(model, st)
  return model


def init_nnx(arch: Arch, widths=None, seed: int = 0, abstract: bool = False) -> nnx.Module:
  """The NNX twin with the same values as ``init_linen(arch, widths, seed)``, eval mode;
  with `abstract`, its variables hold shape structs."""
  model = nnx.eval_shape(lambda: arch.build_nnx(widths, seed))
  if not abstract:
    model = nnx_from_linen(model, init_linen(arch, widths, seed)[1])
  model.eval()
  return model


def nnx_params(model: nnx.Module):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def random_widths(arch: Arch, rng: np.random.Generator, low=0.3, high=0.6) -> dict:
  """The arch's widths with a random `low`..`high` fraction of each removed (>= 1 kept),
  drawn until the same code can be built with them."""
  while True:
    w = {k: max(1, v - int(rng.integers(int(np.ceil(low * v)), int(high * v) + 1)))
         for k, v in arch.widths.items()}
    if arch.name == "vit":
      w["v_dim"] = w["qk_dim"]
    if arch.buildable(w):
      return w


def example(arch: Arch, batch: int = 2, seed: int = 0):
  return jax.random.normal(jax.random.key(seed), (batch,) + arch.input_shape)
