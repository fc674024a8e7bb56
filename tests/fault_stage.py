"""A small resumable stage run as its own process by the fault tests (test_faults.py).

``python tests/fault_stage.py WORKDIR SEED [--fsize_limit_at STEP] [--kill_in_save STEP]``
runs a least-squares stage (a parameter vector plus a large array, so checkpoint writes
take a moment) through :func:`jaxprune.engine.loop.run_stage` and prints the final
weights as JSON. ``--fsize_limit_at`` caps the size of files this process may write
from that step on (a full disk: writes fail with EFBIG); ``--tb_full_at`` makes the
TensorBoard event file's flushes fail with ENOSPC from that step on (its events wait in
a buffer until then); ``--kill_in_save`` SIGKILLs the process just after the checkpoint
save of that step has started.

``python tests/fault_stage.py WORKDIR SEED --tas [--kill_at STEP] [--set KEY=VALUE]`` runs
instead a small TAS search (graph space on a user NNX model, ``derive_epoch=best``,
search only; ``--set`` overrides a config key) through the recipe
(:func:`jaxprune.methods.run`, as the CLI), SIGKILLs itself after search step
``--kill_at``, and prints the SHA-256 of every final search variable.
"""
import argparse
import errno
import json
import os
import resource
import signal
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from jaxprune.engine import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from jaxprune.engine import loop, mesh as mesh_lib  # pylint: disable=wrong-import-position
from jaxprune.errors import UserError  # pylint: disable=wrong-import-position

TOTAL, SPE, PAD = 24, 8, 1 << 18  # steps, steps per epoch, floats in the big array


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("seed", type=int)
  parser.add_argument("--fsize_limit_at", type=int, default=0)
  parser.add_argument("--kill_in_save", type=int, default=0)
  parser.add_argument("--step_sleep", type=float, default=0.0)
  parser.add_argument("--tb_full_at", type=int, default=0)
  parser.add_argument("--tas", action="store_true")
  parser.add_argument("--kill_at", type=int, default=0)
  parser.add_argument("--set", action="append", default=[],
                      help="KEY=VALUE: a config override of the TAS run (a Python literal)")
  args = parser.parse_args()
  if args.tas:
    return tas_search(args)

  rng = np.random.default_rng(args.seed)
  x = rng.normal(size=(TOTAL, 8, 5)).astype(np.float32)
  y = (x @ rng.normal(size=(5,)) + 0.1 * rng.normal(size=(TOTAL, 8))).astype(np.float32)
  cfg = ml_collections.ConfigDict(dict(eval_every_epochs=1, log_every_steps=2,
                                       checkpoint_every_steps=4, keep_checkpoints=2))

  def init(key):
    kw, kp = jax.random.split(key)  # random: the checkpoint does not compress away
    return {"w": jax.random.normal(kw, (5,)), "pad": jax.random.normal(kp, (PAD,)),
            "step": jnp.zeros((), jnp.int32)}

  @jax.jit
  def step_fn(state, batch):
    loss, g = jax.value_and_grad(
        lambda w: jnp.mean((batch["x"] @ w - batch["y"]) ** 2))(state["w"])
    return {"w": state["w"] - 0.05 * g, "pad": state["pad"] + g[0],
            "step": state["step"] + 1}, {"loss": loss}

  save = ckpt_lib.Checkpointer.save

  def save_then_maybe_die(self, step, state, **kw):
    out = save(self, step, state, **kw)
    if args.kill_in_save and step == args.kill_in_save:
      os.kill(os.getpid(), signal.SIGKILL)  # the async write has just started
    return out

  ckpt_lib.Checkpointer.save = save_then_maybe_die
  ckpt_lib.quiet_orbax_errors()  # as the CLI does

  def on_step(step, state):
    del state
    if args.fsize_limit_at and step == args.fsize_limit_at:
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
      resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
    if args.tb_full_at and step == args.tb_full_at:
      from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

      def no_space(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      record_writer.RecordWriter.flush = no_space
    if args.step_sleep:
      time.sleep(args.step_sleep)

  try:
    result = loop.run_stage(
        "stage", args.workdir, init=init, seed=args.seed, step_fn=step_fn,
        load_batch=lambda s: {"x": x[s], "y": y[s]}, total_steps=TOTAL,
        steps_per_epoch=SPE, images_per_step=8, cfg=cfg,
        mesh=mesh_lib.make_mesh(jax.devices()[:1]),
        evaluate=lambda state: {"w_norm": float(jnp.linalg.norm(state["w"]))},
        on_step=on_step)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  state = jax.device_get(result.state)
  print("RESULT " + json.dumps({"w": state["w"].tolist(), "pad0": float(state["pad"][0]),
                                "summary": {k: v for k, v in result.summary.items()
                                            if k != "train_time_s"}}))


TAS_FLAGS = dict(  # 3 epochs of 5 steps; a log line every 4, a checkpoint every 3 steps
    **{"model.name": "user_models:nnx_resnet", "model.kwargs": "{'features': 4, 'blocks': 2}",
       "dataset.synthetic.num_train": 160, "dataset.synthetic.num_test": 16,
       "dataset.synthetic.image_shape": (8, 8, 3), "dataset.synthetic.num_classes": 4,
       "tas.search_only": True, "tas.epochs": 3, "tas.batch_size": 16,
       "tas.log_every_steps": 4, "tas.checkpoint_every_steps": 3, "tas.derive_epoch": "best",
       # every epoch inside the cost band: the best val_accuracy picks the epoch
       "tas.ratio": 0.5, "tas.tolerance": 0.9, "tas.cost_mode": "paper"})


def tas_search(args):
  import hashlib  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from jaxprune import methods  # pylint: disable=g-import-not-at-top
  from jaxprune.engine import runtime  # pylint: disable=g-import-not-at-top
  from jaxprune.methods import tas  # pylint: disable=g-import-not-at-top
  import ast  # pylint: disable=g-import-not-at-top
  overrides = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.set)}
  config = load_config("configs/tas_resnet.py", "smoke",
                       {**TAS_FLAGS, "seed": args.seed, **overrides})
  run_stage, search, found = loop.run_stage, tas.search, {}

  def run_stage_then_maybe_die(name, *a, on_step=None, **kw):
    def on_step_or_die(step, state):
      if on_step is not None:
        on_step(step, state)
      if name == "search" and step == args.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return run_stage(name, *a, on_step=on_step_or_die, **kw)

  def search_and_keep(*a, **kw):
    out = search(*a, **kw)
    found.update(out[0])
    return out

  loop.run_stage, tas.search = run_stage_then_maybe_die, search_and_keep
  ckpt_lib.quiet_orbax_errors()  # as the CLI does
  runtime.configure(config.get("runtime") or {})
  try:
    methods.run(config, args.workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(found["state"]))
  print("RESULT " + json.dumps({jax.tree_util.keystr(p): hashlib.sha256(
      np.asarray(x).tobytes()).hexdigest() for p, x in leaves}))


if __name__ == "__main__":
  main()
