"""Dependency-graph cost and what a 50%-FLOPs L1 pruning buys in measured speed.

Prints two tables:
1. ``graph.trace`` time (jaxpr trace + propagation + grouping) for an ImageNet
   ResNet-50 and a ViT-B/16-sized encoder (12 blocks, width 768, 12 heads, MLP 3072,
   197 tokens), median of ``--repeats`` after one warm-up; target under 10 s each.
2. A ResNet-50 pruned by ``surgery.prune_to(criterion="l1", flops_ratio=0.5)`` with
   ``round_to`` 1 and 8: FLOPs, params, and the eval forward's time at batch
   ``--batch`` against the unpruned network, the programs alternated in one run.

  python benchmarks/graph.py                     # both tables
  python benchmarks/graph.py --skip_speed        # the trace times only
"""
import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import graph, models, surgery
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


def trace_table(repeats):
  rows = []
  for name, model in (("ResNet-50", models.imagenet_resnet(50)), ("ViT-B/16", ViTEncoder())):
    shape = (224, 224, 3)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))
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
  args = parser.parse_args()
  timing.print_header(sys.argv)
  trace_table(args.repeats)
  if not args.skip_speed:
    speed_table(args.batch, args.speed_repeats)


if __name__ == "__main__":
  main()
