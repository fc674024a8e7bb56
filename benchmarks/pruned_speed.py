r"""Does a pruned ResNet-56 run as much faster as its FLOPs say? Measured latency at batch 1 and 128.

Networks (CIFAR ResNet-56, 10 classes, 32x32x3, eval-mode forward under jax.jit):
- ``base``: the unpruned ResNet-56 (125.75M FLOPs);
- ``tas``: the ResNet-56 the TAS authors' search derived with the FLOPs cost (their released
  C010-ResNet56 shape, jaxprune/resources/tas_released_shapes.json), widths as searched;
- ``tas round_to=8``: the same shape with every width rounded up to a multiple of 8;
- ``l1 round_to=8``: ``surgery.prune_to(criterion="l1", flops_ratio=0.5, round_to=8)`` of the
  base (the graph's groups, widths multiples of 8, the FLOPs target met);
- ``l1 round_to=1``: the same without rounding;
- ``tas graph flops``, ``tas graph flops round_to=8``, ``tas graph latency``: ResNet-56s
  derived by real, short TAS searches (``jaxprune.methods.tas.search``, the graph space
  with its depth search, target ratio 0.5) on the CIFAR-10 subset in ../shared/data: the
  FLOPs cost, the FLOPs cost with candidates rounded to multiples of 8, and the latency
  cost (``tas.cost=latency``, its per-op table timed at batch 128 on this machine). Each
  search runs ``--search_steps`` iterations (default 310 = 5 epochs of the 2000/2000
  split at batch 32; the reference runs 600 epochs at batch 256), derives from the best
  in-band epoch (the last if none is in the band) and is trained for nothing more: only
  the derived shape is timed. So these shapes are what the cost loss reaches in a short
  search, not converged TAS architectures; their accuracy is not measured here.
Programs are timed alternately (one call of each per round, median over rounds), so the
ratios come from one run on one machine. Prints a table and the command; the searches'
workdirs are kept under ``--workdir`` (a rerun with the same one reuses them).

  python benchmarks/pruned_speed.py
  python benchmarks/pruned_speed.py --rounds 30 --batches 1 128
  python benchmarks/pruned_speed.py --search_steps 0   # the fixed shapes only
"""
import argparse
import importlib.resources
import importlib.util
import json
import math
import os
import pathlib
import sys
import tempfile
import time

from jaxprune.engine import runtime
import timing  # benchmarks/timing.py  # pylint: disable=g-bad-import-order

runtime.configure()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxprune import data, flops, models, surgery  # pylint: disable=g-import-not-at-top
from jaxprune.engine import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
from jaxprune.methods import tas  # pylint: disable=g-import-not-at-top

SHAPE = (32, 32, 3)
REPO = pathlib.Path(__file__).resolve().parents[1]
SEARCHES = {"tas graph flops": dict(cost="flops", round_to=1),
            "tas graph flops round_to=8": dict(cost="flops", round_to=8),
            "tas graph latency": dict(cost="latency", round_to=1)}


def _round_up(widths, k):
  return [int(-(-w // k) * k) for w in widths]


def searched(name, workdir: str, steps: int, batch: int, cost: str, round_to: int):
  """``(derived model, history record, net)`` of a short TAS search of a ResNet-56 (the
  graph space) at target ratio 0.5 (see the module docstring)."""
  spec = importlib.util.spec_from_file_location("tas_cfg", REPO / "configs/tas_resnet.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("depth=56,dataset=cifar10_subset,ratio=0.5")
  config.tas.update(space="graph", cost=cost, round_to=round_to, batch_size=batch,
                    max_steps=steps, derive_epoch="best", log_every_steps=50,
                    checkpoint_every_steps=steps)
  datasets = data.load(config.dataset)
  steps_per_epoch = len(datasets["train"].labels) // 2 // batch
  config.tas.epochs = max(1, math.ceil(steps / steps_per_epoch))  # tau spans the steps
  tas.validate(config)
  print(f"[{name}] search: {steps} steps at batch {batch}, cost={cost}, round_to={round_to}",
        flush=True)
  found, history = tas.search(config, os.path.join(workdir, name.replace(" ", "_")),
                              datasets, mesh_lib.make_mesh(jax.devices()[:1]))
  chosen = tas.choose_epoch(history, "best")
  model, _ = found["net"].derived_network(chosen)
  return model, chosen, found["net"]


def networks(searches=None):
  """``{name: (model, variables)}`` of the compared networks (random weights: speed only);
  ``searches``: ``{name: derived model}`` of the searched rows."""
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
  for name, model in (searches or {}).items():
    out[name] = (model, init(model))
  return out


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--search_steps", type=int, default=310,
                      help="iterations of each TAS search (0: no searched rows)")
  parser.add_argument("--search_batch", type=int, default=32)
  parser.add_argument("--workdir", default="",
                      help="where the searches run (default: a new temporary folder)")
  args = parser.parse_args(argv)
  timing.print_header([sys.argv[0], *argv])
  workdir = args.workdir or tempfile.mkdtemp(prefix="pruned_speed_")
  found = {}
  if args.search_steps:
    for name, kw in SEARCHES.items():
      found[name] = searched(name, workdir, args.search_steps, args.search_batch, **kw)
  nets = networks({name: model for name, (model, _, _) in found.items()})
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
  print()
  for name, (_, record, net) in found.items():
    line = (f"{name}: search epoch {record['epoch']}, argmax FLOPs "
            f"{record['argmax_flops'] / 1e6:.2f}M (target {record['target_flops'] / 1e6:.2f}M), "
            f"blocks per stage {record['argmax_blocks']}")
    if net.latency is not None:
      line += (f"; latency table (batch {net.latency.batch_size}): full "
               f"{record['latency_max_ms']:.1f} ms, derived {record['argmax_latency_ms']:.1f} ms"
               f" (target {record['target_latency_ms']:.1f}), predicted speed-up "
               f"{record['latency_max_ms'] / record['argmax_latency_ms']:.2f}x")
    print(line, flush=True)
  print(f"searches: {workdir}")


if __name__ == "__main__":
  main(sys.argv[1:])
