"""Dependency-graph cost and what a 50%-FLOPs L1 pruning buys in measured speed.

Prints three tables:
1. ``graph.trace`` time (jaxpr trace + propagation + grouping) for an ImageNet
   ResNet-50, a ViT-B/16-sized encoder (12 blocks, width 768, 12 heads, MLP 3072,
   197 tokens) and a 1B-parameter-shaped Llama-style decoder (16 layers, width 2048,
   32 query / 8 KV heads, SwiGLU MLP 8192, vocabulary 32,000, 128 tokens), from
   shapes only (``jax.eval_shape``), median of ``--repeats`` after one warm-up;
   target under 10 s each.
2. ``surgery.prune_to(flops_ratio=0.5)`` on the ViT-B encoder and the decoder: the
   planning from shapes only, step by step (trace, random criterion scores, channel
   selection, predicted counts), and the whole call (L1 scores, rebuild included)
   with real weights (the ViT-B always; the decoder's 4.4 GB with
   ``--decoder_weights``); target under 10 s each.
3. A ResNet-50 pruned by ``surgery.prune_to(criterion="l1", flops_ratio=0.5)`` with
   ``round_to`` 1 and 8: FLOPs, params, and the eval forward's time at batch
   ``--batch`` against the unpruned network, the programs alternated in one run.

  python benchmarks/graph.py                     # all tables
  python benchmarks/graph.py --skip_speed        # the trace and prune_to times only
"""
import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import graph, models, surgery
from jaxprune.surgery import importance, targets
from jaxprune.engine import runtime  # noqa: F401  (the XLA:CPU settings of every run)
import timing


class ViTEncoder(nn.Module):
  """A ViT-B/16-shaped encoder classifier written with stock Linen layers."""
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp: int = 3072
  patch: int = 16
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, name="embed")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, c)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    for i in range(self.depth):
      y = nn.LayerNorm(name=f"block{i}_ln1")(x)
      x = x + nn.MultiHeadDotProductAttention(self.heads, name=f"block{i}_attn")(y, y)
      y = nn.LayerNorm(name=f"block{i}_ln2")(x)
      y = nn.Dense(self.mlp, name=f"block{i}_fc1")(y)
      x = x + nn.Dense(c, name=f"block{i}_fc2")(nn.gelu(y))
    x = nn.LayerNorm(name="ln")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])


class GQAttention(nn.Module):
  """Grouped-query causal self-attention: `heads` query heads share `kv_heads` K/V heads."""
  heads: int
  kv_heads: int
  head_dim: int

  @nn.compact
  def __call__(self, x):
    n, t, d = x.shape
    dense = lambda h, name: nn.DenseGeneral((h, self.head_dim), use_bias=False, name=name)
    q, k, v = dense(self.heads, "q")(x), dense(self.kv_heads, "k")(x), dense(self.kv_heads, "v")(x)
    q = q.reshape(n, t, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) * self.head_dim ** -0.5
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, -1), v)
    return nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, name="o")(
        o.reshape(n, t, self.heads, self.head_dim))


class Decoder(nn.Module):
  """A 1.1B-parameter Llama-shaped decoder: RMSNorm, GQA, SwiGLU, untied LM head."""
  vocab: int = 32000
  width: int = 2048
  depth: int = 16
  heads: int = 32
  kv_heads: int = 8
  mlp: int = 8192

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(self.vocab, self.width, name="embed")(ids)
    for i in range(self.depth):
      y = nn.RMSNorm(name=f"layer{i}_norm1")(x)
      x = x + GQAttention(self.heads, self.kv_heads, self.width // self.heads,
                          name=f"layer{i}_attn")(y)
      y = nn.RMSNorm(name=f"layer{i}_norm2")(x)
      gate = nn.Dense(self.mlp, use_bias=False, name=f"layer{i}_gate")(y)
      up = nn.Dense(self.mlp, use_bias=False, name=f"layer{i}_up")(y)
      x = x + nn.Dense(self.width, use_bias=False, name=f"layer{i}_down")(nn.silu(gate) * up)
    return nn.Dense(self.vocab, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(x))


TOKENS = 128


def _models():
  """(name, model, input spec, abstract variables) of the benchmarked networks."""
  image = jax.ShapeDtypeStruct((224, 224, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((TOKENS,), jnp.int32)
  out = []
  for name, model, spec in (("ResNet-50", models.imagenet_resnet(50), image),
                            ("ViT-B/16", ViTEncoder(), image),
                            ("decoder 1.1B (GQA)", Decoder(), ids)):
    example = jnp.zeros((1, *spec.shape), spec.dtype)
    out.append((name, model, spec,
                jax.eval_shape(lambda m=model, e=example: m.init(jax.random.key(0), e))))
  return out


def _spec_arg(spec):
  """The input spec as graph.trace takes it: a plain shape for float inputs."""
  return spec.shape if spec.dtype == jnp.float32 else spec


def _first_line(e):
  return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def trace_table(repeats):
  rows = []
  for name, model, spec, variables in _models():
    shape = _spec_arg(spec)
    graph.trace(model, variables, shape)  # warm-up (imports, caches)
    times, g = [], None
    for _ in range(repeats):
      t = time.perf_counter()
      g = graph.trace(model, variables, shape)
      times.append(time.perf_counter() - t)
    rows.append((name, f"{np.median(times):.2f}", len(g.groups), len(g.prunable()),
                 f"{g.flops / 1e9:.2f}G", f"{g.params / 1e6:.1f}M"))
  print("| model | trace + grouping (s) | groups | prunable | FLOPs | params |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print("| " + " | ".join(str(v) for v in r) + " |")


def _prune_decoder(model, variables, shape):
  """prune_to's steps on the decoder, whose attention reads its head counts from int
  attributes: the rebuild takes them from ``overrides=`` (never guessed), set here from
  the kept KV groups (4 query heads each). Its one ``head_dim`` serves both q.k and v,
  which the graph finds as two groups: they stay whole here."""
  steps = [time.perf_counter()]
  g = graph.trace(model, variables, shape)
  steps.append(time.perf_counter())
  scores = importance.group_scores(g, graph.named_leaves(model, variables), "l1")
  scores = {gid: s for gid, s in scores.items() if g.groups[gid].kind != "head_dim"}
  steps.append(time.perf_counter())
  keep = targets.select_channels(g, scores, flops_ratio=0.5)
  steps.append(time.perf_counter())
  overrides = {}
  for grp in g.groups:
    if grp.kind == "heads":
      (k,) = [m for m in grp.members if m.path.endswith("/k/kernel")]
      n = len(keep.get(grp.id, range(grp.width)))
      overrides[k.path.split("/", 1)[1].rsplit("/", 2)[0]] = {
          "kv_heads": n, "heads": n * model.heads // model.kv_heads}
  small = surgery.prune(model, variables, shape, keep, graph=g, overrides=overrides)
  jax.block_until_ready(small.variables)
  steps.append(time.perf_counter())
  return small, g.predict(keep), np.diff(steps)


def prune_table(decoder_weights):
  """prune_to(flops_ratio=0.5) times: the planning from shapes, step by step, and the
  whole call (rebuild included) from real weights. (The whole call from shapes is
  refused in one line: pruning slices weights.)"""
  rows = []
  for name, model, spec, abstract in _models()[1:]:
    shape = _spec_arg(spec)
    steps, t = [], time.perf_counter()
    g = graph.trace(model, abstract, shape)
    steps.append(time.perf_counter() - t)
    scores = importance.group_scores(g, {}, "random", key=jax.random.key(0))
    steps.append(time.perf_counter() - t - sum(steps))
    keep = targets.select_channels(g, scores, flops_ratio=0.5)
    steps.append(time.perf_counter() - t - sum(steps))
    after = g.predict(keep)
    steps.append(time.perf_counter() - t - sum(steps))
    rows.append((name, "plan from shapes: trace / random scores / select / predict",
                 f"{sum(steps):.2f} ({' / '.join(f'{s:.2f}' for s in steps)})",
                 f"{after['flops'] / 1e9:.2f}G / {g.flops / 1e9:.2f}G",
                 f"{after['params'] / 1e6:.0f}M / {g.params / 1e6:.0f}M"))
    if "decoder" in name and not decoder_weights:
      continue
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *spec.shape), spec.dtype))
    jax.block_until_ready(variables)
    step = "prune_to (l1), weights" if "decoder" not in name else \
        "prune_to's steps (l1), weights, prune(overrides=head counts)"
    t = time.perf_counter()
    try:
      if "decoder" not in name:
        small, info = surgery.prune_to(model, variables, shape, criterion="l1",
                                       flops_ratio=0.5)
        after = info["after"]
      else:  # token ids with their batch of one: the rebuild reads a struct as a batch
        small, after, parts = _prune_decoder(
            model, variables, jax.ShapeDtypeStruct((1, *spec.shape), spec.dtype))
        step += (": trace / l1 scores / select / prune (slice, rebuild check) "
                 f"({' / '.join(f'{p:.2f}' for p in parts)})")
      jax.block_until_ready(small.variables)
      rows.append((name, step, f"{time.perf_counter() - t:.2f}",
                   f"{after['flops'] / 1e9:.2f}G", f"{after['params'] / 1e6:.0f}M"))
      del small
    except Exception as e:  # pylint: disable=broad-except  (a row of the table)
      rows.append((name, step, f"fails after {time.perf_counter() - t:.1f} s",
                   _first_line(e), ""))
    del variables
  print("\n| model | step (flops_ratio=0.5) | time (s) | FLOPs | params |")
  print("|---|---|---|---|---|")
  for r in rows:
    print("| " + " | ".join(str(v) for v in r) + " |")


def speed_table(batch, repeats):
  model = models.imagenet_resnet(50)
  shape = (224, 224, 3)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)
  nets = {"dense": (model, variables)}
  counts = {}
  for round_to in (1, 8):
    small, info = surgery.prune_to(model, variables, shape, criterion="l1", flops_ratio=0.5,
                                   round_to=round_to)
    nets[f"L1 50% FLOPs, round_to={round_to}"] = (small.model, small.variables)
    counts[f"L1 50% FLOPs, round_to={round_to}"] = info["after"]
  counts["dense"] = graph.trace(model, variables, shape).predict({})
  x = jax.random.normal(jax.random.key(1), (batch, *shape))
  fns = {k: jax.jit(lambda v, x, m=m: m.apply(v, x, train=False)) for k, (m, _) in nets.items()}
  for k, (m, v) in nets.items():
    jax.block_until_ready(fns[k](v, x))
  times = {k: [] for k in nets}
  for _ in range(repeats):  # alternate the programs: load drifts hit them alike
    for k, (m, v) in nets.items():
      times[k].append(timing.median_ms(lambda: jax.block_until_ready(fns[k](v, x)), 1))
  base = np.median(times["dense"])
  print(f"\n| network (batch {batch}) | FLOPs | params | ms / batch | speed-up | FLOPs ratio |")
  print("|---|---|---|---|---|---|")
  for k in nets:
    ms = np.median(times[k])
    print(f"| {k} | {counts[k]['flops'] / 1e9:.2f}G | {counts[k]['params'] / 1e6:.1f}M | "
          f"{ms:.1f} | {base / ms:.2f}x | {counts[k]['flops'] / counts['dense']['flops']:.3f} |")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--speed_repeats", type=int, default=7)
  parser.add_argument("--skip_speed", action="store_true")
  parser.add_argument("--skip_prune", action="store_true")
  parser.add_argument("--decoder_weights", action="store_true",
                      help="also prune_to the decoder with real weights (4.4 GB)")
  args = parser.parse_args()
  timing.print_header(sys.argv)
  trace_table(args.repeats)
  if not args.skip_prune:
    prune_table(args.decoder_weights)
  if not args.skip_speed:
    speed_table(args.batch, args.speed_repeats)


if __name__ == "__main__":
  main()
