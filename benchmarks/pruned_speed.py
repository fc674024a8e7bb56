r"""Does a pruned ResNet-56 run as much faster as its FLOPs say? Measured latency at batch 1 and 128.

Networks (CIFAR ResNet-56, 10 classes, 32x32x3, eval-mode forward under jax.jit):
- ``base``: the unpruned ResNet-56 (125.75M FLOPs);
- ``tas``: the ResNet-56 the TAS authors' search derived with the FLOPs cost (their released
  C010-ResNet56 shape, jaxprune/resources/tas_released_shapes.json), widths as searched;
- ``tas round_to=8``: the same shape with every width rounded up to a multiple of 8;
- ``l1 round_to=8``: ``surgery.prune_to(criterion="l1", flops_ratio=0.5, round_to=8)`` of the
  base (the graph's groups, widths multiples of 8, the FLOPs target met);
- ``l1 round_to=1``: the same without rounding.
Programs are timed alternately (one call of each per round, median over rounds), so the
ratios come from one run on one machine. Prints a table and the command. The TAS latency
cost (``tas.cost=latency``) is not built yet, so there is no latency-searched row.

  python benchmarks/pruned_speed.py
  python benchmarks/pruned_speed.py --rounds 30 --batches 1 128
"""
import argparse
import importlib.resources
import json
import sys
import time

from jaxprune.engine import runtime
import timing  # benchmarks/timing.py  # pylint: disable=g-bad-import-order

runtime.configure()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxprune import flops, models, surgery  # pylint: disable=g-import-not-at-top

SHAPE = (32, 32, 3)


def _round_up(widths, k):
  return [int(-(-w // k) * k) for w in widths]


def networks():
  """``{name: (model, variables)}`` of the compared networks (random weights: speed only)."""
  x = jnp.zeros((1, *SHAPE))
  init = lambda m, seed=0: jax.device_get(m.init(jax.random.key(seed), x, train=False))
  base = models.cifar_resnet(56, 10)
  out = {"base": (base, init(base))}
  text = importlib.resources.files("jaxprune").joinpath(
      "resources/tas_released_shapes.json").read_text(encoding="utf-8")
  shape = json.loads(text)["C010-ResNet56"]
  tas = models.cifar_resnet_from_shape(shape["xchannels"], shape["xblocks"], 10)
  out["tas"] = (tas, init(tas))
  rounded = models.cifar_resnet_from_shape(
      [shape["xchannels"][0]] + _round_up(shape["xchannels"][1:], 8), shape["xblocks"], 10)
  out["tas round_to=8"] = (rounded, init(rounded))
  for k in (8, 1):
    small, _ = surgery.prune_to(base, out["base"][1], SHAPE, criterion="l1",
                                flops_ratio=0.5, round_to=k)
    out[f"l1 round_to={k}"] = (small.model, jax.device_get(small.variables))
  return out


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
  parser.add_argument("--rounds", type=int, default=20)
  args = parser.parse_args(argv)
  timing.print_header([sys.argv[0], *argv])
  nets = networks()
  counts = {n: flops.count(m, v, SHAPE)["flops"] for n, (m, v) in nets.items()}
  ms = {}
  for b in args.batches:
    x = jax.random.normal(jax.random.key(1), (b, *SHAPE))
    fns = {}
    for name, (m, v) in nets.items():
      f = jax.jit(lambda v_, x_, m=m: m.apply(v_, x_, train=False))
      v = jax.device_put(v)
      jax.block_until_ready(f(v, x))  # compile
      fns[name] = (f, v)
    times = {n: [] for n in nets}
    for _ in range(args.rounds):
      for name, (f, v) in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(f(v, x))
        times[name].append(time.perf_counter() - t)
    for name, t in times.items():
      ms[(name, b)] = float(np.median(t)) * 1e3
  print()
  head = " | ".join(f"ms (batch {b}) | speed-up (batch {b})" for b in args.batches)
  print(f"| network | MFLOPs | FLOPs reduction | {head} | speed-up / FLOPs reduction |")
  print("|---" * (4 + 2 * len(args.batches)) + "|")
  for name in nets:
    reduction = counts["base"] / counts[name]
    cells = []
    for b in args.batches:
      cells.append(f"{ms[(name, b)]:.2f} | {ms[('base', b)] / ms[(name, b)]:.2f}x")
    ratio = " / ".join(f"{ms[('base', b)] / ms[(name, b)] / reduction:.2f}"
                       for b in args.batches)
    print(f"| {name} | {counts[name] / 1e6:.2f} | {reduction:.2f}x | " + " | ".join(cells)
          + f" | {ratio} |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
