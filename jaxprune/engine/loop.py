"""The training loop of one stage: resume, steps, logging, eval, checkpoints, signals.

A stage lives in ``<workdir>/<name>/``. Rerunning the same command finds the
latest checkpoint there and continues at the same step; since batches and RNG keys
are pure functions of (seed, step), the resumed run computes exactly what the
uninterrupted one would have. SIGINT/SIGTERM finish the current step, save a
checkpoint and raise :class:`Interrupted` (the CLI turns it into a clean exit).
"""
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from jaxprune import data as data_lib
from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import mesh as mesh_lib
from jaxprune.engine import metrics as metrics_lib
from jaxprune.engine import steps as steps_lib
from jaxprune.engine.state import TrainState, init_train_state


class Interrupted(Exception):
  """Raised after a signal-triggered checkpoint; rerunning the command resumes."""

  def __init__(self, signum: int, step: int, directory: str):
    super().__init__(
        f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved "
        f"in {directory}. Rerun the same command to resume.")
    self.signum, self.step = signum, step


@contextlib.contextmanager
def catch_signals(signums=(signal.SIGINT, signal.SIGTERM)):
  """Records the first SIGINT/SIGTERM in ``flag['signum']`` instead of dying."""
  flag = {"signum": None}

  def handler(signum, frame):
    del frame
    flag["signum"] = flag["signum"] or signum

  previous = {}
  try:
    for s in signums:
      previous[s] = signal.signal(s, handler)
  except ValueError:  # not the main thread: leave the default handlers alone
    pass
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@dataclasses.dataclass
class StageResult:
  state: TrainState
  summary: dict  # final eval metrics, steps, wall time


def evaluate(eval_step, variables, ds, batch_size: int, mesh) -> dict:
  """Accuracy and mean loss over the whole split (padded rows masked out)."""
  totals = None
  for local in data_lib.eval_batches(ds, batch_size, process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    out = eval_step(variables, mesh_lib.global_batch(local, mesh))
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {"accuracy": float(totals["correct"]) / count,
          "loss": float(totals["loss_sum"]) / count}


def _elapsed_before(records: list[dict], start_step: int) -> float:
  done = [r.get("elapsed_s", 0.0) for r in records if r["step"] <= start_step]
  return float(done[-1]) if done else 0.0


def _truncate_metrics(path: str, start_step: int) -> list[dict]:
  """Drops records logged after the checkpoint a run resumes from."""
  records = metrics_lib.read_jsonl(path)
  kept = [r for r in records if r["step"] <= start_step]
  if len(kept) != len(records) and jax.process_index() == 0:
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
  return kept


def train_classifier(name: str, workdir: str, *, model, tx: optax.GradientTransformation,
                     lr_schedule: Callable[[int], float], train_ds, eval_ds,
                     cfg: ml_collections.ConfigDict, seed: int,
                     objective: steps_lib.Objective = steps_lib.cross_entropy,
                     aux: Any = None, mesh=None,
                     on_step: Callable[[int, TrainState], None] | None = None,
                     ) -> StageResult:
  """Trains ``model`` on ``train_ds`` as stage ``name`` and evaluates on ``eval_ds``.

  ``cfg`` is the ``train`` section of a config: ``epochs``, ``batch_size``,
  ``eval_batch_size``, ``eval_every_epochs``, ``log_every_steps``,
  ``checkpoint_every_steps``, ``keep_checkpoints`` and optionally ``max_steps``
  (a cap for smoke runs). Returns the final state and a summary dict that is also
  written to ``<stage>/summary.json``.
  """
  mesh = mesh or mesh_lib.make_mesh()
  stage_dir = os.path.join(workdir, name)
  batch_size = cfg.batch_size
  mesh_lib.check_batch_size(batch_size, mesh)
  mesh_lib.check_batch_size(cfg.eval_batch_size, mesh, "eval batch size")
  steps_per_epoch = data_lib.steps_per_epoch(train_ds, batch_size)
  total = cfg.epochs * steps_per_epoch
  if cfg.get("max_steps"):
    total = min(total, cfg.max_steps)

  init = init_train_state(model, tx, train_ds.image_shape)
  key = jax.random.key(seed)
  abstract = jax.eval_shape(init, key)
  repl = mesh_lib.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: repl, abstract)
  ckpt = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"),
                               max_to_keep=cfg.keep_checkpoints)
  summary_path = os.path.join(stage_dir, "summary.json")

  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(ckpt_lib.abstract_like(abstract, repl))
  else:
    start, state = 0, jax.jit(init, out_shardings=state_sharding)(key)

  if start >= total and os.path.exists(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
    if summary.get("steps") == total:  # already finished: nothing to redo
      ckpt.close()
      return StageResult(state, summary)

  metrics_path = os.path.join(stage_dir, "metrics.jsonl")
  records = _truncate_metrics(metrics_path, start) if start else []
  elapsed_before = _elapsed_before(records, start)
  writer = metrics_lib.MetricWriter(stage_dir)
  progress = metrics_lib.Progress(name, total, start, batch_size, steps_per_epoch)
  progress.message(f"{'resuming at' if start else 'starting from'} step {start} of "
                   f"{total} ({steps_per_epoch} steps/epoch) on {mesh.devices.size} "
                   f"device(s)")
  train_step = steps_lib.make_train_step(model, tx, seed=seed, mesh=mesh,
                                         state_sharding=state_sharding,
                                         objective=objective)
  eval_step = steps_lib.make_eval_step(model, mesh=mesh)
  aux = mesh_lib.replicate(aux, mesh) if aux is not None else None

  def load(step):
    return data_lib.batch_at(train_ds, step, batch_size, seed=seed, train=True,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())

  t0, pending = time.perf_counter(), []
  eval_metrics = {}
  with catch_signals() as flag, \
       concurrent.futures.ThreadPoolExecutor(1) as pool:
    future = pool.submit(load, start) if start < total else None
    for step in range(start, total):
      batch = future.result()
      if step + 1 < total:
        future = pool.submit(load, step + 1)  # overlaps with the device step
      state, m = train_step(state, mesh_lib.global_batch(batch, mesh), aux)
      pending.append(m)
      done = step + 1
      if on_step is not None:
        on_step(done, state)
      log_now = done % cfg.log_every_steps == 0 or done == total
      epoch_end = done % steps_per_epoch == 0
      eval_now = done == total or (
          epoch_end and (done // steps_per_epoch) % cfg.eval_every_epochs == 0)
      if log_now or eval_now:
        means = {k: float(np.mean([float(p[k]) for p in jax.device_get(pending)]))
                 for k in pending[0]}
        pending = []
        record = {f"train_{k}": v for k, v in means.items()}
        record["lr"] = float(lr_schedule(done - 1))
        if eval_now:
          eval_metrics = evaluate(eval_step, state.variables, eval_ds,
                                  cfg.eval_batch_size, mesh)
          record.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        rate = progress.rate(done)
        record["images_per_s"] = rate
        record["elapsed_s"] = elapsed_before + time.perf_counter() - t0
        writer.write(done, record)
        progress.line(done, {k: v for k, v in record.items()
                             if k not in ("images_per_s", "elapsed_s")}, rate)
      if done % cfg.checkpoint_every_steps == 0 and done < total:
        ckpt.save(done, state)
      if flag["signum"] is not None and done < total:
        ckpt.save(done, state, force=True)
        ckpt.close()
        writer.close()
        raise Interrupted(flag["signum"], done, ckpt.directory)

  ckpt.save(total, state, force=True)
  if not eval_metrics:
    eval_metrics = evaluate(eval_step, state.variables, eval_ds, cfg.eval_batch_size,
                            mesh)
  ckpt_lib.save_variables(os.path.join(stage_dir, "final"), state.variables)
  summary = {"steps": total, "epochs": total / steps_per_epoch,
             "eval_accuracy": eval_metrics["accuracy"], "eval_loss": eval_metrics["loss"],
             "train_time_s": elapsed_before + time.perf_counter() - t0}
  if jax.process_index() == 0:
    with open(summary_path, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
  ckpt.close()
  writer.close()
  progress.message(f"done: eval accuracy {summary['eval_accuracy']:.4f}")
  return StageResult(state, summary)
