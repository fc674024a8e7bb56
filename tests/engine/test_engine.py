"""Engine: 8 devices equal 1 device; an interrupted run resumes to the same params."""
import os
import signal

import jax
import numpy as np
import optax
import pytest

from jaxprune import config_lib, data, models
from jaxprune.engine import loop, mesh as mesh_lib, steps
from jaxprune.engine.checkpoint import load_variables
from jaxprune.engine.metrics import read_jsonl
from jaxprune.engine.state import init_train_state
from jaxprune.methods import common

SEED = 3


def _datasets():
  return data.synthetic(num_train=96, num_test=40, image_shape=(16, 16, 3),
                        num_classes=4, seed=np.random.default_rng().integers(1 << 30))


def _model():
  # A ResNet-8 (one basic block per stage) with narrow convs: BN, shortcuts, strides.
  return models.cifar_resnet(8, num_classes=4, widths=[8, 8, 8, 8, 8, 16, 16])


def _run_steps(mesh, ds, n, batch_size=16):
  model = _model()
  tx = optax.sgd(0.1, momentum=0.9)
  init = init_train_state(model, tx, ds.image_shape)
  repl = mesh_lib.replicated(mesh)
  abstract = jax.eval_shape(init, jax.random.key(SEED))
  state_sharding = jax.tree.map(lambda _: repl, abstract)
  state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(SEED))
  step = steps.make_train_step(model, tx, seed=SEED, mesh=mesh,
                               state_sharding=state_sharding)
  losses = []
  for i in range(n):
    batch = data.batch_at(ds, i, batch_size, seed=SEED, train=True)
    state, m = step(state, mesh_lib.global_batch(batch, mesh), None)
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state.variables)


def test_train_steps_on_8_devices_equal_1_device():
  assert jax.device_count() == 8
  ds = _datasets()["train"]
  losses1, vars1 = _run_steps(mesh_lib.make_mesh(jax.devices()[:1]), ds, 3)
  losses8, vars8 = _run_steps(mesh_lib.make_mesh(), ds, 3)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  # The loss moved, so the comparison is not between two untouched inits.
  assert losses1[0] != losses1[-1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               vars8, vars1)


def _train_cfg(**kw):
  cfg = config_lib.train_config(epochs=2, warmup_epochs=1, batch_size=16,
                                eval_batch_size=16, log_every_steps=2,
                                checkpoint_every_steps=4, keep_checkpoints=2)
  cfg.update(kw)
  return cfg


def _stage(workdir, datasets, cfg, on_step=None):
  model = _model()
  spe = data.steps_per_epoch(datasets["train"], cfg.batch_size)
  from jaxprune import optim  # pylint: disable=g-import-not-at-top
  tx, sched = optim.sgd(cfg, spe, cfg.epochs * spe)
  return common.train_classifier("stage", str(workdir), model=model, tx=tx,
                                 lr_schedule=sched, train_ds=datasets["train"],
                                 eval_ds=datasets["test"], cfg=cfg, seed=SEED,
                                 on_step=on_step)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_params(tmp_path):
  datasets = _datasets()
  cfg = _train_cfg()
  full = _stage(tmp_path / "full", datasets, cfg)

  def interrupt(step, state):
    del state
    if step == 7:  # not a checkpoint step: the signal path must save its own
      os.kill(os.getpid(), signal.SIGINT)

  with pytest.raises(loop.Interrupted) as info:
    _stage(tmp_path / "cut", datasets, cfg, on_step=interrupt)
  assert info.value.step == 7
  resumed = _stage(tmp_path / "cut", datasets, cfg)
  assert resumed.summary["steps"] == full.summary["steps"] == 12
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.variables),
               jax.device_get(full.state.variables))
  assert resumed.summary["eval_accuracy"] == full.summary["eval_accuracy"]
  # The log has each step once, as the uninterrupted run's does.
  steps_cut = [r["step"] for r in read_jsonl(tmp_path / "cut/stage/metrics.jsonl")]
  steps_full = [r["step"] for r in read_jsonl(tmp_path / "full/stage/metrics.jsonl")]
  assert steps_cut == steps_full
  # The final variables are what a later stage loads (e.g. as the KD teacher).
  abstract = jax.eval_shape(lambda: resumed.state.variables)
  loaded = load_variables(str(tmp_path / "cut/stage/final"), abstract)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded),
               jax.device_get(full.state.variables))
  # A rerun of a finished stage does no work and returns the same summary.
  again = _stage(tmp_path / "cut", datasets, cfg)
  assert again.summary == resumed.summary
