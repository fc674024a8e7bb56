r"""ISTA: the prox transform's cost per training step, and the shrunk network's speed.

1. Overhead: the engine's jitted train step of CIFAR ResNet-20 (or the ConvNet) at batch
   128 with plain SGD (the official optimizer: no momentum, weight decay on conv kernels)
   vs the same SGD chained with ``optim.ista`` on the prunable BN gammas. The two steps
   are timed in alternating rounds (the median of each) so machine load affects both
   alike; the target is an overhead under 3%. The optimizer update alone is timed too.
2. Inference: eval-mode forward of the original network and of the network
   ``surgery.shrink`` makes from it, at batch 128. The gammas come from a finished ISTA
   run (``--workdir``, its ``sparsify`` stage) or, without one, a random fraction
   (``--zero_fraction``) of the prunable gammas is set to zero.

  python benchmarks/ista.py                                   # ResNet-20, 40% zero gammas
  python benchmarks/ista.py --model convnet --zero_fraction 0.5
  python benchmarks/ista.py --workdir /tmp/ista_r20_subset    # the run's own pruned net
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import data, flops, models, optim, surgery
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import mesh as mesh_lib, runtime, steps
from jaxprune.engine.state import init_train_state
import timing  # benchmarks/timing.py  # pylint: disable=g-bad-import-order

CONV_KERNELS = r"conv[^/]*/kernel$"


def build(name):
  return models.cifar_resnet(20) if name == "resnet20" else models.convnet()


def make_step(model, tx, mesh, batch):
  init = init_train_state(model, tx, (32, 32, 3))
  repl = mesh_lib.replicated(mesh)
  shardings = jax.tree.map(lambda _: repl, jax.eval_shape(init, jax.random.key(0)))
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  step = steps.make_train_step(model, tx, seed=0, mesh=mesh, state_sharding=shardings)
  holder = {"state": state}

  def one():
    holder["state"], metrics = step(holder["state"], batch, None)
    jax.block_until_ready(metrics)
  one()  # compile
  return one, holder


def bench_overhead(model, batch_size, rounds, repeats):
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  ds = data.synthetic(num_train=1024, num_test=16, seed=0)["train"]
  batch = mesh_lib.global_batch(data.batch_at(ds, 0, batch_size, seed=0, train=True), mesh)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, 32, 32, 3)), train=False))
  rho = surgery.ista_rho(model, variables, (32, 32, 3))
  decay = optax.add_decayed_weights(5e-4, mask=lambda p: optim.select(p, CONV_KERNELS))
  plain = optax.chain(decay, optax.sgd(0.1))
  with_ista = optax.chain(decay, optax.sgd(0.1), optim.ista(0.1, 0.005, rho=rho))
  step_plain, holder = make_step(model, plain, mesh, batch)
  step_ista, _ = make_step(model, with_ista, mesh, batch)
  plain_ms, ista_ms = [], []
  for _ in range(rounds):  # alternate, so load drifts hit both
    plain_ms.append(timing.median_ms(step_plain, repeats))
    ista_ms.append(timing.median_ms(step_ista, repeats))
  params = holder["state"].params
  grads = jax.tree.map(jnp.ones_like, params)
  upd = {}
  for name, tx in (("sgd", plain), ("sgd+ista", with_ista)):
    f = jax.jit(tx.update)
    s = tx.init(params)
    jax.block_until_ready(f(grads, s, params))
    upd[name] = timing.median_ms(lambda: jax.block_until_ready(f(grads, s, params)),
                                 repeats * 5)
  return float(np.median(plain_ms)), float(np.median(ista_ms)), upd


def gammas_for(model, args, rng):
  if args.workdir:  # the masked network the recipe saved after its sparsify stage
    return ckpt_lib.load_variables(os.path.join(args.workdir, "sparsify", "final"))
  v = jax.tree.map(np.array, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                        train=False))
  for path in surgery.ista_scales(model, v, (32, 32, 3)):
    node = v["params"]
    for part in path.split("/")[:-1]:
      node = node[part]
    zero = rng.random(node["scale"].shape) < args.zero_fraction
    node["scale"] = np.where(zero, 0, node["scale"]).astype(np.float32)
  return v


def bench_inference(model, variables, batch_size, repeats):
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x = jax.random.normal(jax.random.key(0), (batch_size, 32, 32, 3))
  variables = jax.device_put(jax.tree.map(jnp.asarray, variables))
  jax.block_until_ready(forward(variables, x))
  return timing.median_ms(lambda: jax.block_until_ready(forward(variables, x)), repeats)


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("resnet20", "convnet"), default="resnet20")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps per round")
  parser.add_argument("--zero_fraction", type=float, default=0.4)
  parser.add_argument("--workdir", default="", help="a finished ISTA run to take gammas from")
  args = parser.parse_args(argv)
  runtime.configure()
  timing.print_header([sys.argv[0], *argv])
  model = build(args.model)
  plain, with_ista, upd = bench_overhead(model, args.batch, args.rounds, args.repeats)
  print()
  print(f"| {args.model} train step, batch {args.batch} | ms/step | overhead |")
  print("|---|---|---|")
  print(f"| SGD (no momentum, wd on conv kernels) | {plain:.1f} | |")
  print(f"| SGD + optim.ista prox on BN gammas | {with_ista:.1f} | "
        f"{100 * (with_ista / plain - 1):+.2f}% |")
  print(f"| optimizer update alone: sgd / sgd+ista | {upd['sgd']:.3f} / "
        f"{upd['sgd+ista']:.3f} | {upd['sgd+ista'] - upd['sgd']:+.3f} ms |")

  rng = np.random.default_rng(0)
  variables = gammas_for(model, args, rng)
  small = surgery.shrink(model, variables, (32, 32, 3))
  before = flops.count(model, variables, (32, 32, 3))
  after = flops.count(small.model, small.variables, (32, 32, 3))
  t_before = bench_inference(model, variables, args.batch, args.repeats * args.rounds)
  t_after = bench_inference(small.model, small.variables, args.batch,
                            args.repeats * args.rounds)
  print()
  print(f"| inference, batch {args.batch} | channels removed | params | MFLOPs | ms/batch "
        f"| speed-up |")
  print("|---|---|---|---|---|---|")
  print(f"| original | 0% | {before['params']:,} | {before['flops'] / 1e6:.2f} | "
        f"{t_before:.1f} | |")
  print(f"| shrunk | {100 * small.removed_fraction:.1f}% | {after['params']:,} | "
        f"{after['flops'] / 1e6:.2f} | {t_after:.1f} | {t_before / t_after:.2f}x |")


if __name__ == "__main__":
  main(sys.argv[1:])
