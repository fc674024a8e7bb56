r"""TAS search speed: one search iteration, its weight and architecture steps, peak RSS, CWI.

For each CIFAR ResNet depth, in a fresh subprocess (so peak RSS is per model), on the
default backend (CPU here; GPU/TPU where present, unchanged):
- ms per search iteration (weight step on a D_train batch + architecture step on a
  D_val batch, the recipe's own jitted step) at the iteration batch (default 256);
- ms per weight step and per architecture step alone at batches 64 and 128;
- peak resident memory of the process;
- the projected time of a ``--project_epochs``-epoch CIFAR-10 search (default 600, the
  reference's): iteration ms x (25,000 D_train images / batch) iterations per epoch (the
  authors: 3.83 h for ResNet-32 on one V100).
Then CWI forward+backward for (128, 32, 32, 64) -> 48 channels (NHWC; the official
release's layout is NCHW (128, 64, 32, 32)). Prints a table and the command.

Anchors (the official PyTorch release, 2-core CPU, torch 2.13): search iteration at batch
256 — ResNet-20 1680 ms, ResNet-32 2548 ms, ResNet-56 4408 ms (peak RSS 1.8 / 2.4 / 3.6 GB);
CWI forward+backward 54 ms.

  python benchmarks/tas_search.py
  python benchmarks/tas_search.py --depths 20 --batch 128 --repeats 3
  # The rebuttal's table (the authors: time and memory linear in |I|):
  python benchmarks/tas_search.py --depths 20 --num_picks 1 2 3 5 8 --batch 128
  # Mixed precision (model.dtype=bfloat16) next to float32, e.g. on a GPU:
  python benchmarks/tas_search.py --dtypes float32 bfloat16
"""
import argparse
import json
import os
import resource
import subprocess
import sys


from jaxprune.engine import runtime
import timing  # benchmarks/timing.py  # pylint: disable=g-bad-import-order

runtime.configure()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position


def _median_ms(fn, repeats):
  return timing.median_ms(fn, repeats, warmup=True)  # the first call compiles


def one_depth(depth: int, batch: int, small_batches, repeats: int, num_picks: int = 2,
              dtype: str = "float32") -> dict:
  """Times the search step of ResNet-``depth`` with |I| = ``num_picks`` and compute
  ``dtype`` in this process."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from jaxprune import data, optim  # pylint: disable=g-import-not-at-top
  from jaxprune.methods import tas  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(root, "configs",
                                                                    "tas_resnet.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(f"depth={depth}").tas
  input_shape = (32, 32, 3)
  net = tas.resnet_space(depth, 10, num_picks, input_shape, "cifar", jnp.dtype(dtype))
  flops_max = net.flops_max
  weight_tx, _ = optim.sgd(cfg, 100, 100 * cfg.epochs)
  arch_tx = tas.arch_optimizer(cfg)
  state = jax.jit(tas.init_search_state(net, weight_tx, arch_tx))(jax.random.key(0))
  kwargs = dict(cfg=cfg, seed=0, flops_max=flops_max, steps_per_epoch=100,
                epochs=cfg.epochs)
  ds = data.synthetic(num_train=max(batch, *small_batches), num_test=8, seed=0)["train"]
  batches = {b: jax.device_put(data.batch_at(ds, 0, b, seed=0, train=True))
             for b in {batch, *small_batches}}
  holder = {"state": state}

  def timed(step_fn, b):
    def run():
      holder["state"], metrics = step_fn(holder["state"], b)
      jax.block_until_ready(metrics)
    return _median_ms(run, repeats)

  iteration = jax.jit(tas.make_search_step(net, weight_tx, arch_tx, **kwargs),
                      donate_argnums=0)
  weight_step, arch_step = (jax.jit(f, donate_argnums=0) for f in
                            tas.search_steps(net, weight_tx, arch_tx, **kwargs))
  out = {"depth": depth, "num_picks": num_picks, "dtype": dtype, "iteration_ms": timed(
      iteration, {"train": batches[batch], "val": batches[batch]})}
  for b in small_batches:
    out[f"weight_ms_{b}"] = timed(weight_step, batches[b])
    out[f"arch_ms_{b}"] = timed(arch_step, batches[b])
  out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
  return out


def cwi_ms(repeats: int) -> float:
  from jaxprune import kernels  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (128, 32, 32, 64), jnp.float32)
  cot = jax.random.normal(jax.random.key(1), (128, 32, 32, 48), jnp.float32)
  fwd_bwd = jax.jit(jax.value_and_grad(lambda x_: jnp.vdot(kernels.cwi(x_, 48), cot)))
  return _median_ms(lambda: jax.block_until_ready(fwd_bwd(x)), repeats)


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", type=int, nargs="+", default=[20, 32, 56])
  parser.add_argument("--batch", type=int, default=256, help="search-iteration batch")
  parser.add_argument("--small_batches", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--num_picks", type=int, nargs="+", default=[2],
                       help="|I| values: the rebuttal's table of time and memory against "
                       "|I| (1 is measured here; the recipe refuses it)")
  parser.add_argument("--project_epochs", type=int, default=600,
                      help="epochs of the projected CIFAR-10 search (25,000 D_train images)")
  parser.add_argument("--dtypes", nargs="+", default=["float32"],
                      choices=["float32", "bfloat16"],
                      help="compute dtypes of the search model (config model.dtype)")
  parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--picks", type=int, default=2, help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.one:
    print(json.dumps(one_depth(args.one, args.batch, args.small_batches, args.repeats,
                               args.picks, args.dtype)))
    return
  timing.print_header([sys.argv[0], *argv])
  sb = args.small_batches
  print()
  print(f"| model | \\|I\\| | dtype | iteration ms (batch {args.batch}) | " +
        " | ".join(f"weight ms ({b}) | arch ms ({b})" for b in sb) +
        f" | peak RSS GB | {args.project_epochs}-epoch search h |")
  print("|---" * (6 + 2 * len(sb)) + "|")
  per_epoch = 25_000 // args.batch
  for depth in args.depths:
    for k in args.num_picks:
      for dtype in args.dtypes:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one", str(depth), "--batch",
             str(args.batch), "--repeats", str(args.repeats), "--picks", str(k),
             "--dtype", dtype, "--small_batches", *map(str, sb)],
            capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| ResNet-{depth} | {k} | {dtype} | {r['iteration_ms']:.0f} | " +
              " | ".join(f"{r[f'weight_ms_{b}']:.0f} | {r[f'arch_ms_{b}']:.0f}" for b in sb) +
              f" | {r['peak_rss_gb']:.2f} | "
              f"{r['iteration_ms'] * per_epoch * args.project_epochs / 3.6e6:.2f} |",
              flush=True)
  print(f"\nCWI forward+backward (128, 32, 32, 64) -> 48: {cwi_ms(args.repeats * 4):.1f} ms")


if __name__ == "__main__":
  main(sys.argv[1:])
