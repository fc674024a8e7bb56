r"""Training-step speed of the baseline CIFAR ResNets next to the input pipeline's.

Measures, on the default backend (CPU here, GPU/TPU where present), the engine's own
jitted train step (SGD momentum + weight decay, BN in train mode, state donated) and the
eval-mode forward pass of CIFAR ResNet-20/56 at batch 128, and the images/s of
``data.batch_at`` (CIFAR augmentation) for the same batch size. Prints a markdown table
and the command that produced it.

  python benchmarks/train_step.py                      # ResNet-20 and -56, batch 128
  python benchmarks/train_step.py --depths 20 --batch 256 --steps 20
  python benchmarks/train_step.py --dtype bfloat16   # config model.dtype=bfloat16
"""
import argparse
import sys
import time

import jax

from jaxprune import config_lib, data, models, optim
from jaxprune.engine import runtime
import timing  # benchmarks/timing.py  # pylint: disable=g-bad-import-order
from jaxprune.engine import mesh as mesh_lib, steps
from jaxprune.engine.state import init_train_state


_median_ms = timing.median_ms


def bench_model(depth, batch, repeats, ds, dtype="float32"):
  model = models.cifar_resnet(depth, num_classes=10, dtype=jax.numpy.dtype(dtype))
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  cfg = config_lib.train_config(epochs=1, warmup_epochs=0)
  tx, _ = optim.sgd(cfg, 100, 100)
  init = init_train_state(model, tx, (32, 32, 3))
  repl = mesh_lib.replicated(mesh)
  shardings = jax.tree.map(lambda _: repl, jax.eval_shape(init, jax.random.key(0)))
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  step = steps.make_train_step(model, tx, seed=0, mesh=mesh, state_sharding=shardings)
  batch = mesh_lib.global_batch(data.batch_at(ds, 0, batch, seed=0, train=True), mesh)
  t = time.perf_counter()
  state, m = step(state, batch, None)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], batch, None)
    jax.block_until_ready(metrics)

  train_ms = _median_ms(one_step, repeats)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  variables = holder["state"].variables
  jax.block_until_ready(forward(variables, batch["image"]))
  infer_ms = _median_ms(lambda: jax.block_until_ready(forward(variables, batch["image"])),
                        repeats)
  return {"train_ms": train_ms, "train_img_s": batch_size_rate(batch, train_ms),
          "infer_ms": infer_ms, "compile_s": compile_s}


def batch_size_rate(batch, ms):
  return batch["image"].shape[0] / ms * 1e3


def bench_pipeline(ds, batch, repeats):
  ms = _median_ms(lambda: data.batch_at(ds, 7, batch, seed=0, train=True), repeats)
  return batch / ms * 1e3


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", type=int, nargs="+", default=[20, 56])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10, help="timed repeats (median)")
  parser.add_argument("--stock_xla_flags", action="store_true",
                      help="skip jaxprune's XLA:CPU flags and allocator settings (for comparison)")
  parser.add_argument("--stock_layers", action="store_true",
                      help="run jaxprune.models.layers as the stock flax layers "
                      "(layers.use('stock'): lax's conv gradient, nn.max_pool), the default "
                      "on GPU/TPU, instead of the XLA:CPU-tuned ones (for comparison)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="compute dtype of the convs and matmuls (config model.dtype)")
  args = parser.parse_args(argv)
  if not args.stock_xla_flags:
    runtime.configure()
  from jaxprune.models import layers  # pylint: disable=g-import-not-at-top
  chosen = layers.use("stock" if args.stock_layers else "jaxprune")
  timing.print_header([sys.argv[0], *argv])
  ds = data.synthetic(num_train=4096, num_test=16, seed=0)["train"]
  pipe = bench_pipeline(ds, args.batch, max(args.steps, 20))
  print()
  print(f"layers: {chosen} (jaxprune.models.layers.use; backend {jax.default_backend()}), "
        f"compute dtype {args.dtype}")
  print("| model | batch | train step ms | train img/s | forward ms | input pipeline img/s "
        "| compile s |")
  print("|---|---|---|---|---|---|---|")
  for depth in args.depths:
    r = bench_model(depth, args.batch, args.steps, ds, args.dtype)
    print(f"| ResNet-{depth} | {args.batch} | {r['train_ms']:.0f} | {r['train_img_s']:.0f} | "
          f"{r['infer_ms']:.0f} | {pipe:.0f} | {r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
