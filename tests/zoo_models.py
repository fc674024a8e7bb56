"""Real-model patterns for jaxprune (issue 22), written with Flax only (no jaxprune import).

Each entry of ``ZOO`` is a small model in a pattern published JAX code uses (big_vision's
BiT and ViT, BERT, GPT-2, Flax's lm1b and ImageNet examples, Llama/Gemma-style NNX
decoders), with:
- ``build(seed)`` -> ``(model, variables)`` (variables None for NNX);
- ``inputs``: one example's inputs, a pytree of ``jax.ShapeDtypeStruct`` (no batch axis);
- ``args(inputs)`` -> the forward's positional arguments and ``pick(out)`` -> the logits, so
  ``call(model)`` is the ``call=`` jaxprune takes (Linen ``call(variables, inputs)``, NNX
  ``call(module, inputs)``), ``None`` where the forward is ``model(x)``;
- ``single()`` -> ``(input_shape, call)`` for an API that takes one float input ``x``:
  token ids are read from ``x`` (``|x| mod vocab``), masks are all ones;
- ``hand_count()`` -> ``{"flops", "params"}`` by hand, in the convention of
  ``jaxprune.flops.count``: multiply-accumulates of every conv and matrix product (attention's
  q.k and attn.v included) plus one add per output element of a parameter added to such a
  product's result (a bias add); norms, activations, softmax, embedding lookups, position
  tables and residual adds are free; per example; dead code (an output the logits never
  use) is not counted. Params are trainable entries (BN statistics excluded).
"""
import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMAGE = (16, 16, 3)
CLASSES = 10
VOCAB, TOKENS, WIDTH, HEADS, MLP, LAYERS = 64, 8, 32, 4, 64, 2


# ------------------------------------------------------------------ counting helpers

def dense(tokens, d_in, d_out, bias=True):
  """(flops, params) of a matrix product on `tokens` rows with an optional bias."""
  return (tokens * d_in * d_out + (tokens * d_out if bias else 0),
          d_in * d_out + (d_out if bias else 0))


def conv(out_hw, k, c_in, c_out, bias=True):
  return (out_hw * k * k * c_in * c_out + (out_hw * c_out if bias else 0),
          k * k * c_in * c_out + (c_out if bias else 0))


def norm(c, scale=True, bias=True):
  return (0, c * (int(scale) + int(bias)))


def mha(t_q, t_kv, d, bias=True):
  """Flax MultiHeadDotProductAttention (qkv_features = out = d): q, k, v, out and the two dots."""
  parts = [dense(t_q, d, d, bias), dense(t_kv, d, d, bias), dense(t_kv, d, d, bias),
           dense(t_q, d, d, bias), (2 * t_q * t_kv * d, 0)]
  return parts


def total(parts):
  return {"flops": int(sum(f for f, _ in parts)), "params": int(sum(p for _, p in parts))}


# ------------------------------------------------------------------ the entry type

@dataclasses.dataclass(frozen=True)
class ZooModel:
  name: str
  pattern: str                     # what published code it stands for
  api: str                         # "linen" or "nnx"
  build: Callable[[int], tuple]    # seed -> (model, variables or None)
  inputs: Any                      # one example: pytree of ShapeDtypeStruct
  hand_count: Callable[[], dict]
  output_shape: tuple              # one example's logits
  args: Callable[[Any], tuple] = lambda inputs: (inputs,)
  pick: Callable[[Any], Any] = lambda out: out
  vocab: int = 0                   # token-id inputs draw from [0, vocab)
  plain: bool = True               # the forward is model(x): no call= needed

  def call(self, model):
    """The ``call=`` for jaxprune (None when the forward is plain ``model(x)``)."""
    if self.plain:
      return None
    if self.api == "nnx":
      return lambda module, inputs: self.pick(module(*self.args(inputs)))
    return lambda variables, inputs: self.pick(model.apply(variables, *self.args(inputs)))

  def single(self, model):
    """(input_shape, call) for an API with one float input per example."""
    if not isinstance(self.inputs, dict):
      return self.inputs.shape, self.call(model)
    full = self.call(model) or (lambda m, inputs: m(inputs))
    shape = next(iter(self.inputs.values())).shape
    return shape, lambda m, x: full(m, self.from_ids(jnp.abs(x).astype(jnp.int32) % self.vocab))

  def from_ids(self, ids):
    """The inputs pytree for a batch of token ids (masks all ones)."""
    out = {}
    for k, s in self.inputs.items():
      out[k] = ids if k == "input_ids" else jnp.ones(ids.shape, s.dtype) if k == \
          "attention_mask" else jnp.zeros(ids.shape, s.dtype)
    return out

  def example(self, batch=2, seed=0):
    """Concrete inputs for `batch` examples: normal images, random ids, masks with padding."""
    rng = np.random.default_rng(seed)
    def one(s):
      shape = (batch,) + tuple(s.shape)
      if jnp.issubdtype(s.dtype, jnp.floating):
        return jnp.asarray(rng.normal(size=shape), s.dtype)
      return jnp.asarray(rng.integers(0, self.vocab, size=shape), s.dtype)
    out = jax.tree.map(one, self.inputs)
    if isinstance(out, dict) and "attention_mask" in out:
      mask = np.ones((batch,) + self.inputs["attention_mask"].shape, np.int32)
      mask[0, -2:] = 0  # the first example is padded
      out["attention_mask"] = jnp.asarray(mask)
    if isinstance(out, dict) and "token_type_ids" in out:
      types = np.zeros((batch,) + self.inputs["token_type_ids"].shape, np.int32)
      types[:, TOKENS // 2:] = 1
      out["token_type_ids"] = jnp.asarray(types)
    return out


def _linen(module, inputs, seed, **kw):
  example = jax.tree.map(lambda s: jnp.zeros((1,) + tuple(s.shape), s.dtype), inputs)
  args = tuple(example.values()) if isinstance(example, dict) else (example,)
  # Compiled once: an eager Linen init dispatches op by op.
  return module, jax.jit(functools.partial(module.init, **kw))(jax.random.key(seed), *args)


# ================================================================== 1. BiT ResNetV2

class StdConv(nn.Module):
  """A conv whose kernel is standardised over (H, W, in) per output channel (BiT)."""
  features: int
  kernel: int = 3
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(),
                   (self.kernel, self.kernel, x.shape[-1], self.features))
    w = (w - w.mean((0, 1, 2), keepdims=True)) / jnp.sqrt(w.var((0, 1, 2), keepdims=True) + 1e-8)
    return jax.lax.conv_general_dilated(x, w, (self.stride, self.stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class PreActUnit(nn.Module):
  """ResNetV2 pre-activation bottleneck: GN-ReLU before each StdConv, projection when needed."""
  out: int
  mid: int
  stride: int = 1
  groups: int = 4

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.GroupNorm(self.groups, name="gn1")(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.out:
      shortcut = StdConv(self.out, 1, self.stride, name="proj")(y)
    y = StdConv(self.mid, 1, name="conv1")(y)
    y = nn.relu(nn.GroupNorm(self.groups, name="gn2")(y))
    y = StdConv(self.mid, 3, self.stride, name="conv2")(y)
    y = nn.relu(nn.GroupNorm(self.groups, name="gn3")(y))
    return StdConv(self.out, 1, name="conv3")(y) + shortcut


class BiT(nn.Module):
  root: int = 16
  units: tuple = ((32, 8, 1), (64, 16, 2))
  num_classes: int = CLASSES

  @nn.compact
  def __call__(self, x):
    x = StdConv(self.root, 3, name="root")(x)
    for i, (out, mid, stride) in enumerate(self.units):
      x = PreActUnit(out, mid, stride, name=f"unit{i}")(x)
    x = nn.relu(nn.GroupNorm(4, name="gn_final")(x))
    return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


def bit_count(root=16, units=((32, 8, 1), (64, 16, 2)), hw=16):
  parts, c = [conv(hw * hw, 3, 3, root, bias=False)], root
  for out, mid, stride in units:
    o = (hw // stride) ** 2
    parts += [norm(c)]
    if stride != 1 or c != out:
      parts += [conv(o, 1, c, out, bias=False)]
    parts += [conv(hw * hw, 1, c, mid, bias=False), norm(mid), conv(o, 3, mid, mid, bias=False),
              norm(mid), conv(o, 1, mid, out, bias=False)]
    c, hw = out, hw // stride
  parts += [norm(c), dense(1, c, CLASSES)]
  return total(parts)


# ================================================================== 2. ViT, CLS + MAP head

class EncoderBlock(nn.Module):
  heads: int = HEADS
  mlp: int = MLP

  @nn.compact
  def __call__(self, x, mask=None):
    y = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(y, y, mask=mask)
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.Dense(self.mlp, name="mlp1")(y)
    return x + nn.Dense(x.shape[-1], name="mlp2")(nn.gelu(y))


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""
  heads: int = HEADS
  mlp: int = MLP

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.normal(0.02), (1, 1, d))
    x = nn.MultiHeadDotProductAttention(self.heads, name="attn")(jnp.tile(probe, (n, 1, 1)), x)
    y = nn.LayerNorm(name="ln")(x)
    y = nn.Dense(d, name="mlp2")(nn.gelu(nn.Dense(self.mlp, name="mlp1")(y)))
    return (x + y)[:, 0]


class ViTMAP(nn.Module):
  width: int = WIDTH
  depth: int = LAYERS
  patch: int = 4
  num_classes: int = CLASSES

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, name="embed")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    for i in range(self.depth):
      x = EncoderBlock(name=f"block{i}")(x)
    x = nn.LayerNorm(name="ln")(x)
    return nn.Dense(self.num_classes, name="head")(MAPHead(name="map")(x))


def vit_map_count(d=WIDTH, depth=LAYERS, mlp=MLP, patch=4, hw=16):
  p = (hw // patch) ** 2
  t = p + 1
  parts = [conv(p, patch, 3, d), (0, d), (0, t * d)]  # embed, cls, pos
  for _ in range(depth):
    parts += [norm(d), *mha(t, t, d), norm(d), dense(t, d, mlp), dense(t, mlp, d)]
  parts += [norm(d), (0, d), *mha(1, t, d), norm(d), dense(1, d, mlp), dense(1, mlp, d),
            dense(1, d, CLASSES)]
  return total(parts)


# ================================================================== 3. ViT with nn.scan

class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return EncoderBlock(name="block")(x), None


class ViTScan(nn.Module):
  """big_vision's scan option: the encoder blocks' parameters stacked on a leading axis."""
  width: int = WIDTH
  depth: int = LAYERS
  patch: int = 4
  num_classes: int = CLASSES

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, name="embed")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, c))
    x, _ = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=self.depth)(name="encoder")(x, None)
    x = nn.LayerNorm(name="ln")(x)
    return nn.Dense(self.num_classes, name="head")(x.mean(1))


def vit_scan_count(d=WIDTH, depth=LAYERS, mlp=MLP, patch=4, hw=16):
  t = (hw // patch) ** 2
  parts = [conv(t, patch, 3, d), (0, t * d)]
  for _ in range(depth):
    parts += [norm(d), *mha(t, t, d), norm(d), dense(t, d, mlp), dense(t, mlp, d)]
  parts += [norm(d), dense(1, d, CLASSES)]
  return total(parts)


# ================================================================== 4. BERT encoder

class BERT(nn.Module):
  """Post-LN encoder: word + position + token-type embeddings, padding mask, tanh pooler."""
  vocab: int = VOCAB
  width: int = WIDTH
  depth: int = LAYERS
  heads: int = HEADS
  mlp: int = MLP
  max_len: int = 16
  types: int = 2
  num_classes: int = 2

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids):
    positions = jnp.arange(input_ids.shape[1])[None]
    x = (nn.Embed(self.vocab, self.width, name="word")(input_ids)
         + nn.Embed(self.max_len, self.width, name="position")(positions)
         + nn.Embed(self.types, self.width, name="token_type")(token_type_ids))
    x = nn.LayerNorm(name="ln_embed")(x)
    mask = nn.make_attention_mask(attention_mask > 0, attention_mask > 0)
    for i in range(self.depth):
      x = nn.LayerNorm(name=f"layer{i}_ln1")(
          x + nn.MultiHeadDotProductAttention(self.heads, name=f"layer{i}_attn")(x, x, mask=mask))
      y = nn.Dense(self.width, name=f"layer{i}_out")(
          nn.gelu(nn.Dense(self.mlp, name=f"layer{i}_inter")(x)))
      x = nn.LayerNorm(name=f"layer{i}_ln2")(x + y)
    pooled = jnp.tanh(nn.Dense(self.width, name="pooler")(x[:, 0]))
    return nn.Dense(self.num_classes, name="classifier")(pooled)


def bert_count(v=VOCAB, d=WIDTH, depth=LAYERS, mlp=MLP, t=TOKENS, max_len=16, types=2):
  parts = [(0, v * d), (0, max_len * d), (0, types * d), norm(d)]
  for _ in range(depth):
    parts += [*mha(t, t, d), norm(d), dense(t, d, mlp), dense(t, mlp, d), norm(d)]
  parts += [dense(1, d, d), dense(1, d, 2)]
  return total(parts)


# ================================================================== 5. GPT decoder, tied

class GPT(nn.Module):
  """Pre-LN decoder: learned positions, causal mask, LM head tied to the token embedding."""
  vocab: int = VOCAB
  width: int = WIDTH
  depth: int = LAYERS
  heads: int = HEADS
  mlp: int = 4 * WIDTH
  max_len: int = 16

  @nn.compact
  def __call__(self, input_ids):
    wte = nn.Embed(self.vocab, self.width, name="wte")
    x = wte(input_ids) + nn.Embed(self.max_len, self.width, name="wpe")(
        jnp.arange(input_ids.shape[1])[None])
    mask = nn.make_causal_mask(input_ids)
    for i in range(self.depth):
      y = nn.LayerNorm(name=f"h{i}_ln1")(x)
      x = x + nn.MultiHeadDotProductAttention(self.heads, name=f"h{i}_attn")(y, y, mask=mask)
      y = nn.LayerNorm(name=f"h{i}_ln2")(x)
      x = x + nn.Dense(self.width, name=f"h{i}_proj")(
          nn.gelu(nn.Dense(self.mlp, name=f"h{i}_fc")(y)))
    return wte.attend(nn.LayerNorm(name="ln_f")(x))


def gpt_count(v=VOCAB, d=WIDTH, depth=LAYERS, mlp=4 * WIDTH, t=TOKENS, max_len=16):
  parts = [(0, v * d), (0, max_len * d)]
  for _ in range(depth):
    parts += [norm(d), *mha(t, t, d), norm(d), dense(t, d, mlp), dense(t, mlp, d)]
  parts += [norm(d), (t * d * v, 0)]  # tied head: no parameters of its own
  return total(parts)


# ================================================================== 6. NNX Llama-style decoder

def rope(x, positions, base=10000.0):
  """Rotary embedding on the last axis of x (.., tokens, heads, head_dim), rotate-half form."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None, None].astype(jnp.float32) * freq
  x1, x2 = x[..., :half], x[..., half:]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class GQAttention(nnx.Module):
  def __init__(self, width, heads, kv_heads, head_dim, *, rngs):
    self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
    self.q = nnx.Linear(width, heads * head_dim, use_bias=False, rngs=rngs)
    self.k = nnx.Linear(width, kv_heads * head_dim, use_bias=False, rngs=rngs)
    self.v = nnx.Linear(width, kv_heads * head_dim, use_bias=False, rngs=rngs)
    self.o = nnx.Linear(heads * head_dim, width, use_bias=False, rngs=rngs)

  def __call__(self, x):
    n, t, _ = x.shape
    g = self.heads // self.kv_heads
    positions = jnp.arange(t)
    q = rope(self.q(x).reshape(n, t, self.heads, self.head_dim), positions)
    k = rope(self.k(x).reshape(n, t, self.kv_heads, self.head_dim), positions)
    v = self.v(x).reshape(n, t, self.kv_heads, self.head_dim)
    q = q.reshape(n, t, self.kv_heads, g, self.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(self.head_dim)
    causal = jnp.tril(jnp.ones((t, t), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(n, t, self.heads * self.head_dim)
    return self.o(out)


class LlamaBlock(nnx.Module):
  def __init__(self, width, heads, kv_heads, head_dim, hidden, *, rngs):
    self.attn_norm = nnx.RMSNorm(width, rngs=rngs)
    self.attn = GQAttention(width, heads, kv_heads, head_dim, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(width, rngs=rngs)
    self.gate = nnx.Linear(width, hidden, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(width, hidden, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(hidden, width, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.attn_norm(x))
    y = self.mlp_norm(x)
    return x + self.down(nnx.silu(self.gate(y)) * self.up(y))


class Llama(nnx.Module):
  """RMSNorm, rotary positions, grouped-query attention (heads share KV heads), SwiGLU MLP."""

  def __init__(self, vocab=VOCAB, width=WIDTH, depth=LAYERS, heads=4, kv_heads=2, head_dim=8,
               hidden=MLP, *, rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.layers = nnx.List([LlamaBlock(width, heads, kv_heads, head_dim, hidden, rngs=rngs)
                            for _ in range(depth)])
    self.norm = nnx.RMSNorm(width, rngs=rngs)
    self.lm_head = nnx.Linear(width, vocab, use_bias=False, rngs=rngs)

  def __call__(self, input_ids):
    x = self.embed(input_ids)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.norm(x))


def llama_count(v=VOCAB, d=WIDTH, depth=LAYERS, heads=4, kv=2, hd=8, hidden=MLP, t=TOKENS):
  parts = [(0, v * d)]
  for _ in range(depth):
    parts += [norm(d, bias=False), dense(t, d, heads * hd, False), dense(t, d, kv * hd, False),
              dense(t, d, kv * hd, False), (2 * heads * t * t * hd, 0),
              dense(t, heads * hd, d, False), norm(d, bias=False),
              dense(t, d, hidden, False), dense(t, d, hidden, False), dense(t, hidden, d, False)]
  parts += [norm(d, bias=False), dense(t, d, v, False)]
  return total(parts)


# ================================================================== 7. lm1b Transformer LM

def sinusoid_table(max_len, width):
  """Flax lm1b's fixed position table (1, max_len, width), computed from the config."""
  pos = np.arange(max_len)[:, None]
  div = np.exp(np.arange(0, width, 2) * -(np.log(10000.0) / width))
  table = np.zeros((max_len, width), np.float32)
  table[:, 0::2], table[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
  return jnp.asarray(table[None])


class LM1B(nn.Module):
  """lm1b-style decoder: inputs shifted right, sinusoidal table, causal & padding mask."""
  vocab: int = VOCAB
  width: int = WIDTH
  depth: int = LAYERS
  heads: int = HEADS
  mlp: int = MLP
  max_len: int = 16

  @nn.compact
  def __call__(self, input_ids):
    mask = nn.combine_masks(nn.make_attention_mask(input_ids > 0, input_ids > 0),
                            nn.make_causal_mask(input_ids))
    shifted = jnp.pad(input_ids, ((0, 0), (1, 0)))[:, :-1]
    x = nn.Embed(self.vocab, self.width, name="embed")(shifted)
    x = x + sinusoid_table(self.max_len, self.width)[:, :x.shape[1]]
    for i in range(self.depth):
      y = nn.LayerNorm(name=f"dec{i}_ln1")(x)
      x = x + nn.MultiHeadDotProductAttention(self.heads, name=f"dec{i}_attn")(y, y, mask=mask)
      y = nn.LayerNorm(name=f"dec{i}_ln2")(x)
      x = x + nn.Dense(self.width, name=f"dec{i}_mlp2")(
          nn.relu(nn.Dense(self.mlp, name=f"dec{i}_mlp1")(y)))
    return nn.Dense(self.vocab, name="logits")(nn.LayerNorm(name="ln_f")(x))


def lm1b_count(v=VOCAB, d=WIDTH, depth=LAYERS, mlp=MLP, t=TOKENS):
  parts = [(0, v * d)]
  for _ in range(depth):
    parts += [norm(d), *mha(t, t, d), norm(d), dense(t, d, mlp), dense(t, mlp, d)]
  parts += [norm(d), dense(t, d, v)]
  return total(parts)


# ================================================================== 8. ResNet, branch submodule

class Branch(nn.Module):
  """The residual function as its own module (HF ResNet's ``layer``): conv-BN-ReLU-conv-BN."""
  mid: int
  out: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Conv(self.mid, (3, 3), use_bias=False, name="conv1")(x)
    y = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(y))
    y = nn.Conv(self.out, (3, 3), use_bias=False, name="conv2")(y)
    return nn.BatchNorm(use_running_average=not train, name="bn2")(y)


class BranchBlock(nn.Module):
  mid: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.relu(x + Branch(self.mid, x.shape[-1], name="layer")(x, train))


class BranchResNet(nn.Module):
  width: int = 16
  mids: tuple = (8, 8, 8)
  num_classes: int = CLASSES

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
    for i, mid in enumerate(self.mids):
      x = BranchBlock(mid, name=f"block{i}")(x, train)
    return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


def branch_resnet_count(width=16, mids=(8, 8, 8), hw=16):
  parts = [conv(hw * hw, 3, 3, width, bias=False), norm(width)]
  for mid in mids:
    parts += [conv(hw * hw, 3, width, mid, bias=False), norm(mid),
              conv(hw * hw, 3, mid, width, bias=False), norm(width)]
  parts += [dense(1, width, CLASSES)]
  return total(parts)


# ================================================================== 9. dead output (logits_2d)

class DeadOutputViT(nn.Module):
  """big_vision ViT's return: (logits, {"logits_2d": per-position logits, ...}); users keep [0]."""
  width: int = WIDTH
  patch: int = 4
  num_classes: int = CLASSES

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, name="embed")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c) + self.param("pos_embedding", nn.initializers.normal(0.02),
                                            (1, h * w, c))
    x = nn.LayerNorm(name="ln")(EncoderBlock(name="block0")(x))
    head = nn.Dense(self.num_classes, name="head")
    out = {"pre_logits_2d": x.reshape(n, h, w, c)}
    out["logits_2d"] = head(out["pre_logits_2d"])
    out["logits"] = head(x.mean(1))
    return out["logits"], out


def dead_output_count(d=WIDTH, mlp=MLP, patch=4, hw=16):
  t = (hw // patch) ** 2
  return total([conv(t, patch, 3, d), (0, t * d), norm(d), *mha(t, t, d), norm(d),
                dense(t, d, mlp), dense(t, mlp, d), norm(d), dense(1, d, CLASSES)])


# ================================================================== 10. BatchNorm(axis_name)

class PmapResNet(nn.Module):
  """Flax ImageNet example's pattern: BatchNorm(axis_name='batch') statistics over devices."""
  widths: tuple = (16, 32)
  num_classes: int = CLASSES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm_ = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                              epsilon=1e-5, axis_name="batch")
    x = nn.relu(norm_(name="bn_init")(nn.Conv(self.widths[0], (3, 3), use_bias=False,
                                              dtype=self.dtype, name="conv_init")(x)))
    y = nn.relu(norm_(name="bn1")(nn.Conv(self.widths[0], (3, 3), use_bias=False,
                                          dtype=self.dtype, name="conv1")(x)))
    x = nn.relu(x + norm_(name="bn2", scale_init=nn.initializers.zeros)(
        nn.Conv(self.widths[0], (3, 3), use_bias=False, dtype=self.dtype, name="conv2")(y)))
    x = nn.relu(norm_(name="bn3")(nn.Conv(self.widths[1], (3, 3), (2, 2), use_bias=False,
                                          dtype=self.dtype, name="conv3")(x)))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x.mean((1, 2)))


def pmap_resnet(num_classes=CLASSES, dtype=jnp.float32):
  """Factory for ``--config.model.name=zoo_models:pmap_resnet``."""
  return PmapResNet(num_classes=num_classes, dtype=dtype)


def pmap_resnet_count(widths=(16, 32), hw=16):
  a, b = widths
  return total([conv(hw * hw, 3, 3, a, False), norm(a), conv(hw * hw, 3, a, a, False), norm(a),
                conv(hw * hw, 3, a, a, False), norm(a), conv(hw * hw // 4, 3, a, b, False),
                norm(b), dense(1, b, CLASSES)])


# ================================================================== 11. StdConv after BatchNorm

class StdConvNet(nn.Module):
  """Weight-standardised convs behind BatchNorm (no GroupNorm): removing a conv's input
  channels changes the standardisation of every remaining weight."""
  widths: tuple = (16, 24)
  num_classes: int = CLASSES

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, w in enumerate(self.widths):
      x = StdConv(w, 3, name=f"conv{i}")(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x))
    return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


def stdconv_count(widths=(16, 24), hw=16):
  a, b = widths
  return total([conv(hw * hw, 3, 3, a, False), norm(a), conv(hw * hw, 3, a, b, False), norm(b),
                dense(1, b, CLASSES)])


# ================================================================== the zoo

_IMG = jax.ShapeDtypeStruct(IMAGE, jnp.float32)
_IDS = jax.ShapeDtypeStruct((TOKENS,), jnp.int32)
_BERT_IN = {"input_ids": _IDS, "attention_mask": _IDS, "token_type_ids": _IDS}


def _bert_args(inputs):
  return inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]


ZOO = [
    ZooModel("bit", "big_vision BiT: ResNetV2, GroupNorm, weight-standardised convs", "linen",
             lambda seed: _linen(BiT(), _IMG, seed), _IMG, bit_count, (CLASSES,)),
    ZooModel("vit_map", "ViT: CLS token, learned position embedding, MAP head", "linen",
             lambda seed: _linen(ViTMAP(), _IMG, seed), _IMG, vit_map_count, (CLASSES,)),
    ZooModel("vit_scan", "big_vision ViT with nn.scan over the encoder blocks", "linen",
             lambda seed: _linen(ViTScan(), _IMG, seed), _IMG, vit_scan_count, (CLASSES,)),
    ZooModel("bert", "BERT encoder: 3 embeddings, padding mask, pooler", "linen",
             lambda seed: _linen(BERT(), _BERT_IN, seed), _BERT_IN, bert_count, (2,),
             args=_bert_args, vocab=VOCAB, plain=False),
    ZooModel("gpt", "GPT-2 decoder: causal mask, LM head tied to the embedding", "linen",
             lambda seed: _linen(GPT(), {"input_ids": _IDS}, seed), {"input_ids": _IDS},
             gpt_count, (TOKENS, VOCAB), args=lambda i: (i["input_ids"],), vocab=VOCAB,
             plain=False),
    ZooModel("llama", "NNX Llama/Gemma decoder: RMSNorm, rotary, grouped-query attention", "nnx",
             lambda seed: (Llama(rngs=nnx.Rngs(seed)), None), {"input_ids": _IDS}, llama_count,
             (TOKENS, VOCAB), args=lambda i: (i["input_ids"],), vocab=VOCAB, plain=False),
    ZooModel("lm1b", "Flax lm1b Transformer LM: sinusoidal position table, shift-right", "linen",
             lambda seed: _linen(LM1B(), {"input_ids": _IDS}, seed), {"input_ids": _IDS},
             lm1b_count, (TOKENS, VOCAB), args=lambda i: (i["input_ids"],), vocab=VOCAB,
             plain=False),
    ZooModel("branch_resnet", "HF ResNet: block parameters in a branch submodule", "linen",
             lambda seed: _linen(BranchResNet(), _IMG, seed), _IMG, branch_resnet_count,
             (CLASSES,)),
    ZooModel("dead_output", "big_vision ViT's unused logits_2d next to the logits", "linen",
             lambda seed: _linen(DeadOutputViT(), _IMG, seed), _IMG, dead_output_count,
             (CLASSES,), pick=lambda out: out[0], plain=False),
    ZooModel("pmap_resnet", "Flax ImageNet example: BatchNorm(axis_name='batch')", "linen",
             lambda seed: _linen(PmapResNet(), _IMG, seed), _IMG, pmap_resnet_count,
             (CLASSES,)),
    ZooModel("stdconv", "weight-standardised convs (BiT's StdConv) behind BatchNorm", "linen",
             lambda seed: _linen(StdConvNet(), _IMG, seed), _IMG, stdconv_count, (CLASSES,)),
]
BY_NAME = {m.name: m for m in ZOO}


def overrides_for(name, graph, keep):
  """What the user passes for attributes the rebuild must not guess: the zoo llama's
  GQAttention reads its head counts from ints, set from the kept KV groups (each keeps
  its heads // kv_heads = 2 query heads). None for the other models."""
  if name != "llama":
    return None
  out = {}
  for g in graph.groups:
    if g.kind == "heads":
      (q,) = [m for m in g.members if m.path.endswith("/q/kernel")]
      layer = q.path.rsplit("/", 2)[0]
      kv = len(keep.get(g.id, range(g.width)))
      out[layer] = {"heads": 2 * kv, "kv_heads": kv}
  return out


def param_entries(model, variables) -> int:
  """Trainable entries by leaf count (Linen ``params``, NNX ``nnx.Param``)."""
  tree = variables["params"] if variables is not None else nnx.state(model, nnx.Param)
  return int(sum(math.prod(np.shape(v)) for v in jax.tree.leaves(tree)))
