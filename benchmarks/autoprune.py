r"""Training-step overhead of AutoPrune vs plain training of the same model.

Times, on the default backend, the engine's plain train step (SGD + weight decay,
``jaxprune.engine.steps.make_train_step``) and the AutoPrune recipe's step
(``jaxprune.methods.autoprune.make_step``: forward on ``W * h(M)``, the autoprune
transform chained with the same SGD, plus the kept-fraction metric) on the same model
and batch, and prints a markdown table with the overhead and the command.

  python benchmarks/autoprune.py                                  # LeNet-300-100, LeNet-5
  python benchmarks/autoprune.py --models lenet5 vgg_like --batch 64 --steps 10
  python benchmarks/autoprune.py --granularity neuron --models lenet5
"""
import argparse
import sys

import jax
import jax.numpy as jnp

from jaxprune import config_lib, data, models, optim
from jaxprune.engine import mesh as mesh_lib, runtime, steps
from jaxprune.engine.state import TrainState, init_train_state, split_variables
from jaxprune.methods import autoprune as recipe
import timing  # benchmarks/timing.py  # pylint: disable=g-bad-import-order

SHAPES = {"lenet300_100": (28, 28, 1), "lenet5": (28, 28, 1), "vgg_like": (32, 32, 3)}


def _time_step(step, state, batch, repeats):
  holder = {"state": state}

  def one():
    holder["state"], m = step(holder["state"], batch)
    jax.block_until_ready(m)

  one()  # compile
  return timing.median_ms(one, repeats, warmup=True)


def bench(name, batch_size, repeats, granularity):
  shape = SHAPES[name]
  model = models.get_model(name, num_classes=10)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  repl = mesh_lib.replicated(mesh)
  ds = data.synthetic(num_train=batch_size, num_test=8, image_shape=shape, seed=0)["train"]
  batch = mesh_lib.global_batch(data.batch_at(ds, 0, batch_size, seed=0, train=True), mesh)

  cfg = config_lib.train_config(epochs=1, warmup_epochs=0, schedule="constant",
                                learning_rate=0.01)
  tx, _ = optim.sgd(cfg, 100, 100)
  init = init_train_state(model, tx, shape)
  shard = jax.tree.map(lambda _: repl, jax.eval_shape(init, jax.random.key(0)))
  plain = steps.make_train_step(model, tx, seed=0, mesh=mesh, state_sharding=shard)
  plain_ms = _time_step(lambda s, b: plain(s, b, None),
                        jax.jit(init, out_shardings=shard)(jax.random.key(0)), batch, repeats)

  config = ml_config(cfg, granularity, name)
  selector = (recipe.neuron_mask(name, "out", model, shape) if granularity == "neuron"
              else recipe.ap.DEFAULT_MASK)
  ap_tx, _ = recipe.transform(config, 100, 100, selector)

  def ap_init(key):
    params, model_state = split_variables(
        model.init(key, jnp.zeros((1, *shape)), train=False))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state=model_state, opt_state=ap_tx.init(params))

  ap_shard = jax.tree.map(lambda _: repl, jax.eval_shape(ap_init, jax.random.key(0)))
  ap_step = jax.jit(recipe.make_step(model, ap_tx, seed=0, selector=selector),
                    in_shardings=(ap_shard, mesh_lib.batch_sharding(mesh)),
                    out_shardings=(ap_shard, repl), donate_argnums=(0,))
  ap_ms = _time_step(ap_step, jax.jit(ap_init, out_shardings=ap_shard)(jax.random.key(0)),
                     batch, repeats)
  return plain_ms, ap_ms


def ml_config(train_cfg, granularity, name):
  config = config_lib.base_config("autoprune")
  config.model = {"name": name}
  config.train = train_cfg
  config.autoprune = recipe.autoprune_config(granularity=granularity, prune_epochs=1)
  return config


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["lenet300_100", "lenet5"],
                      choices=sorted(SHAPES))
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20, help="timed repeats (median)")
  parser.add_argument("--granularity", default="weight", choices=["weight", "neuron"])
  args = parser.parse_args(argv)
  runtime.configure()
  timing.print_header([sys.argv[0], *argv])
  print()
  print("| model | granularity | batch | plain step ms | AutoPrune step ms | overhead |")
  print("|---|---|---|---|---|---|")
  for name in args.models:
    plain_ms, ap_ms = bench(name, args.batch, args.steps, args.granularity)
    print(f"| {name} | {args.granularity} | {args.batch} | {plain_ms:.2f} | {ap_ms:.2f} | "
          f"{(ap_ms / plain_ms - 1) * 100:+.0f}% |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
