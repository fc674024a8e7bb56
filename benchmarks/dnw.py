r"""DNW speed: training step of the tiny static graph, top-k cost, exported-graph inference.

Times, on the default backend:
- the training step (forward on the top-k edges, straight-through backward, SGD with
  weight decay on every edge) of the tiny static CIFAR-10 graph, DNW and random graph;
- ``kernels.topk_ste`` alone on the tiny graph's 800x800 matrix and on the largest
  edge matrix of the MobileNetV1-like x0.225 network (2816 x 3072);
- eval-mode inference of the dense masked network (the learned graph baked into a
  fixed mask, every DAG slot multiplied) against the exported dead-node-free network
  (:func:`jaxprune.models.dnw.compact_static`), next to their FLOPs (docs/methods/dnw.md §2);
- one graph layer as a dense matmul vs a ``jax.experimental.sparse`` BCOO matmul that
  does only the edges' multiply-adds (irregular wiring on real hardware).

With ``--workdir`` of a finished static DNW run (``configs/dnw_cifar.py``) the trained
variables are used; otherwise a freshly initialised graph (where every node is live).

  python benchmarks/dnw.py
  python benchmarks/dnw.py --workdir /tmp/dnw/subset_static_dnw --batch 128 --steps 10
"""
import argparse
import os
import sys

import jax
from jax.experimental import sparse as jsparse
import jax.numpy as jnp
import numpy as np

from jaxprune import config_lib, data, kernels, optim
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import mesh as mesh_lib, report, runtime, steps
from jaxprune.engine.state import init_train_state
from jaxprune.methods import dnw as recipe
from jaxprune.models import dnw
import timing  # benchmarks/timing.py  # pylint: disable=g-bad-import-order

SHAPE = (32, 32, 3)


def train_step_ms(graph: str, batch_size: int, repeats: int) -> float:
  model = dnw.static_graph(graph=graph)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  repl = mesh_lib.replicated(mesh)
  ds = data.synthetic(num_train=batch_size, num_test=8, image_shape=SHAPE, seed=0)["train"]
  batch = mesh_lib.global_batch(data.batch_at(ds, 0, batch_size, seed=0, train=True), mesh)
  cfg = config_lib.train_config(epochs=1, warmup_epochs=0, schedule="constant",
                                weight_decay=1e-4, nesterov=False)
  tx, _ = optim.sgd(cfg, 100, 100)
  init = init_train_state(model, tx, SHAPE)
  shard = jax.tree.map(lambda _: repl, jax.eval_shape(init, jax.random.key(0)))
  step = steps.make_train_step(model, tx, seed=0, mesh=mesh, state_sharding=shard)
  holder = {"state": jax.jit(init, out_shardings=shard)(jax.random.key(0))}

  def one():
    holder["state"], m = step(holder["state"], batch, None)
    jax.block_until_ready(m)

  one()  # compile
  return timing.median_ms(one, repeats, warmup=True)


def topk_ms(shape, prune_rate, repeats):
  w = jax.random.normal(jax.random.key(0), shape)
  f = jax.jit(lambda w: kernels.topk_ste(w, prune_rate))
  return timing.median_ms(lambda: jax.block_until_ready(f(w)), repeats, warmup=True)


def sparse_layer_ms(batch: int, repeats: int) -> tuple[float, float, int]:
  """The static graph's layer 4 (608 sources -> 192 targets at 8x8) with the k/4 edges of
  one layer: dense matmul vs a BCOO sparse matmul that does only the edges' MACs."""
  rng = np.random.default_rng(0)
  k_src, k_dst, rows = 608, 192, batch * 64
  w = np.zeros((k_src, k_dst), np.float32)
  idx = rng.choice(w.size, 8000, replace=False)
  w.ravel()[idx] = rng.normal(size=idx.size)
  x = jnp.asarray(rng.normal(size=(rows, k_src)), jnp.float32)
  dense = jax.jit(lambda x, w: x @ w)
  sparse_mm = jax.jit(lambda x, w: (w.T @ x.T).T)
  w_dense, w_sparse = jnp.asarray(w), jsparse.BCOO.fromdense(jnp.asarray(w))
  dense_ms = timing.median_ms(lambda: jax.block_until_ready(dense(x, w_dense)), repeats,
                              warmup=True)
  sparse_ms = timing.median_ms(lambda: jax.block_until_ready(sparse_mm(x, w_sparse)),
                               repeats, warmup=True)
  return dense_ms, sparse_ms, idx.size


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128, help="training batch")
  parser.add_argument("--inference-batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5, help="timed repeats (median)")
  parser.add_argument("--workdir", default=None,
                      help="a finished static DNW run whose train/final variables to export")
  args = parser.parse_args(argv)
  runtime.configure()
  timing.print_header([sys.argv[0], *argv])
  print()
  print("| what | shape / batch | ms |")
  print("|---|---|---|")
  for graph in ("dnw", "random"):
    ms = train_step_ms(graph, args.batch, args.steps)
    print(f"| train step, static graph ({graph}) | batch {args.batch} | {ms:.1f} |", flush=True)
  block = max(dnw.mobilenet_graph(width=0.225).graph_blocks((224, 224, 3)),
              key=lambda b: b["valid"].size)
  rate = 1 - block["k"] / block["valid"].size
  for shape, pr in (((800, 800), 0.95), (block["valid"].shape, rate)):
    print(f"| topk_ste (prune rate {pr:.3f}) | {shape[0]}x{shape[1]} | "
          f"{topk_ms(shape, pr, args.steps):.1f} |", flush=True)

  model = dnw.static_graph()
  variables = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))
  source = "fresh init"
  if args.workdir:
    variables = ckpt_lib.load_variables(os.path.join(args.workdir, "train", "final"),
                                        jax.eval_shape(lambda: variables))
    source = args.workdir
  export = dnw.export_wiring(model, variables, SHAPE, with_edges=False)
  dense_model, dense_vars = recipe.fixed_mask_network(model, variables, SHAPE)
  compact_model, compact_vars = dnw.compact_static(model, variables)
  b = args.inference_batch
  dense_ms = report.measure_inference(dense_model, dense_vars, SHAPE, b,
                                      repeats=args.steps)["ms_per_batch"]
  compact_ms = report.measure_inference(compact_model, compact_vars, SHAPE, b,
                                        repeats=args.steps)["ms_per_batch"]
  print()
  print(f"Inference of the static graph ({source}), eval mode, batch {b}:")
  print()
  print("| network | nodes | edges | MFLOPs (per image) | ms / batch |")
  print("|---|---|---|---|---|")
  print(f"| dense masked (every DAG slot) | 800 | {export['edges']:,} | "
        f"{export['flops_dense_masked'] / 1e6:.2f} | {dense_ms:.1f} |")
  print(f"| exported, dead nodes removed | {sum(compact_model.block_sizes)} | "
        f"{export['executed_edges']:,} | {export['flops_executed'] / 1e6:.2f} (§2 formula) | "
        f"{compact_ms:.1f} |")
  dense_ms, sparse_ms, nnz = sparse_layer_ms(b, args.steps)
  print()
  print(f"One graph layer (608 -> 192 nodes, {nnz:,} edges, batch {b} at 8x8): dense "
        f"matmul {dense_ms:.1f} ms, BCOO sparse matmul (only the edges' MACs) "
        f"{sparse_ms:.1f} ms.")


if __name__ == "__main__":
  main(sys.argv[1:])
