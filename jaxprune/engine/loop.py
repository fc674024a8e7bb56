"""The resumable training loop of one stage (``<workdir>/<name>/``): steps, logging, eval,
checkpoints; SIGINT/SIGTERM checkpoint and raise :class:`Interrupted`. Batches come from
a callback: it knows no dataset."""
import concurrent.futures
import contextlib
import dataclasses
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxprune.engine import checkpoint as ckpt_lib
from jaxprune.engine import distributed
from jaxprune.engine import mesh as mesh_lib
from jaxprune.engine import metrics as metrics_lib
from jaxprune.engine.state import TrainState
from jaxprune.errors import UserError


class Interrupted(Exception):
  """Raised after a signal-triggered checkpoint; rerunning the command resumes."""

  def __init__(self, signum: int, step: int, directory: str):
    super().__init__(
        f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved "
        f"in {directory}. Rerun the same command to resume.")
    self.signum, self.step = signum, step


@contextlib.contextmanager
def catch_signals(signums=(signal.SIGINT, signal.SIGTERM)):
  """Records the first SIGINT/SIGTERM in ``flag['signum']`` instead of dying.

  In a multi-process run SIGTERM belongs to JAX's coordination service, which
  agrees on one stop step for all processes (see
  :func:`jaxprune.engine.distributed.preemption_requested`); SIGINT (Ctrl-C) is
  handed to it as a SIGTERM, so both stop every process at the same step.
  """
  flag = {"signum": None}
  multiprocess = distributed.is_multiprocess()

  def handler(signum, frame):
    del frame
    if multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      flag["signum"] = flag["signum"] or signum

  if multiprocess:
    signums = [s for s in signums if s != signal.SIGTERM]
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


def _elapsed_before(records: list[dict], start_step: int) -> float:
  done = [r.get("elapsed_s") or 0.0 for r in records if r["step"] <= start_step]
  return float(done[-1]) if done else 0.0


PARTIAL_DIR = "partial_means"  # <stage>/partial_means/<step>.json: see _save_partial


def _encode(metrics: list) -> list[dict]:
  # float.hex: exact for every float32/float64 value, NaN and Inf included, in
  # standard JSON.
  return [{k: float(v).hex() for k, v in m.items()} for m in metrics]


def _decode(metrics: list[dict]) -> list[dict]:
  return [{k: float.fromhex(v) for k, v in m.items()} for m in metrics]


def _save_partial(stage_dir: str, step: int, pending: list, epoch_pending: list,
                  last_epoch: dict | None, keep_from: int | None):
  """Writes the step metrics not yet averaged into a record (``pending``: since the
  last log line; ``epoch_pending``: since the epoch began) and the last epoch's means
  next to the checkpoint of ``step``, before that checkpoint is written: a run resumed
  from it logs the same records and epoch means as an uninterrupted one. Files of steps
  older than ``keep_from`` (the oldest checkpoint kept) are removed. Process 0 writes."""
  if not distributed.is_main_process():
    return
  directory = os.path.join(stage_dir, PARTIAL_DIR)
  os.makedirs(directory, exist_ok=True)
  metrics_lib.write_json(os.path.join(directory, f"{step}.json"),
                         {"step": step, "log": _encode(pending),
                          "epoch": _encode(epoch_pending),
                          "last_epoch": last_epoch and {
                              **last_epoch, "means": _encode([last_epoch["means"]])[0]}})
  for f in os.listdir(directory):
    s = f.split(".")[0]
    if f.endswith(".json") and s.isdigit() and keep_from is not None and \
        int(s) < min(keep_from, step):
      with contextlib.suppress(OSError):
        os.remove(os.path.join(directory, f))


def _load_partial(stage_dir: str, step: int, log_every: int, steps_per_epoch: int,
                  log=print) -> tuple[list, list, dict | None]:
  """``(pending, epoch_pending, last_epoch)`` saved with the checkpoint of ``step`` (every
  process reads process 0's file). Without that file (a checkpoint of an older jaxprune) a
  step between log lines or inside an epoch says what its first record will cover."""
  if not step:
    return [], [], None
  path = os.path.join(stage_dir, PARTIAL_DIR, f"{step}.json")
  saved = metrics_lib.read_json(path) if os.path.exists(path) else None
  if isinstance(saved, dict) and saved.get("step") == step:
    last = saved.get("last_epoch")
    if last:
      last = {**last, "means": _decode([last["means"]])[0]}
    return _decode(saved["log"]), _decode(saved["epoch"]), last
  if step % log_every or step % steps_per_epoch:
    log(f"no {PARTIAL_DIR}/{step}.json next to the checkpoint: the first logged record "
        f"and this epoch's means cover only the steps after step {step}")
  return [], [], None


def _truncate_metrics(path: str, start_step: int) -> list[dict]:
  """Drops records logged after the checkpoint a run resumes from (process 0's file),
  and a cut-off last line; at step 0 the log starts empty."""
  if not distributed.is_main_process():
    return []
  records = metrics_lib.read_jsonl(path) if start_step else []
  kept = [r for r in records if r["step"] <= start_step]
  if os.path.exists(path):
    metrics_lib.rewrite_jsonl(path, kept)
  return kept


_TIME_IN_STAGES = [0.0]  # seconds this process spent inside run_stage


def time_in_stages(reset: bool = False) -> float:
  """Seconds this process has spent in :func:`run_stage` since the last reset (the
  report replaces them by the stages' times summed over every run)."""
  t = _TIME_IN_STAGES[0]
  if reset:
    _TIME_IN_STAGES[0] = 0.0
  return t


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class NonFinite(UserError):
  """The loss or the train state became NaN/Inf; the last good checkpoint is kept."""


def run_stage(name: str, workdir: str, *, init: Callable[[jax.Array], Any], seed: int,
              step_fn: Callable[[Any, Any], tuple[Any, dict]],
              load_batch: Callable[[int], Any], total_steps: int, steps_per_epoch: int,
              images_per_step: int, cfg: ml_collections.ConfigDict, mesh,
              evaluate: Callable[[Any], dict] | None = None,
              lr_schedule: Callable[[int], float] | None = None,
              on_start: Callable[[int], None] | None = None,
              on_epoch_end: Callable[[Any, int, int, dict], None] | None = None,
              on_step: Callable[[int, Any], None] | None = None) -> StageResult:
  """Runs ``step_fn`` from the latest checkpoint of stage ``name`` to ``total_steps``.

  The generic loop of every stage: resume, one-batch-ahead prefetch, logging,
  evaluation, checkpoints, signals, ``<stage>/summary.json``. A stage that already
  finished returns its summary without recompiling anything.

  Args:
    name: stage directory under ``workdir``.
    init: ``init(key) -> state`` (traced; ``jax.eval_shape`` gives the restore target).
    seed: the run's seed; ``init`` gets ``jax.random.key(seed)``.
    step_fn: compiled ``(state, global_batch) -> (state, metrics)``; metrics are
      replicated scalars averaged over the log interval.
    load_batch: ``step -> this process's slice of the batch`` (a pytree of arrays).
    total_steps, steps_per_epoch, images_per_step: the schedule and the img/s unit.
    cfg: the section with ``eval_every_epochs``, ``log_every_steps``,
      ``checkpoint_every_steps`` and ``keep_checkpoints``.
    mesh: the device mesh (state replicated, batches split on ``data``).
    evaluate: ``state -> metrics`` at evaluation epochs and at the end.
    lr_schedule: logged as ``lr`` when given.
    on_start: called with the first step this process will run (after a resume).
    on_epoch_end: ``(state, epoch, step, epoch_means)`` after every epoch, with the
      means of the step metrics over that epoch.
    on_step: ``(step, state)`` after every step (tests use it to interrupt).
  """
  t_enter = time.perf_counter()
  try:
    return _run_stage(name, workdir, init=init, seed=seed, step_fn=step_fn,
                      load_batch=load_batch, total_steps=total_steps,
                      steps_per_epoch=steps_per_epoch, images_per_step=images_per_step,
                      cfg=cfg, mesh=mesh, evaluate=evaluate, lr_schedule=lr_schedule,
                      on_start=on_start, on_epoch_end=on_epoch_end, on_step=on_step)
  finally:
    _TIME_IN_STAGES[0] += time.perf_counter() - t_enter


def _run_stage(name, workdir, *, init, seed, step_fn, load_batch, total_steps,
               steps_per_epoch, images_per_step, cfg, mesh, evaluate, lr_schedule,
               on_start, on_epoch_end, on_step) -> StageResult:
  stage_dir = os.path.join(workdir, name)
  key = jax.random.key(seed)
  abstract = jax.eval_shape(init, key)
  repl = mesh_lib.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: repl, abstract)
  ckpt = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"),
                               max_to_keep=cfg.keep_checkpoints)
  summary_path = os.path.join(stage_dir, "summary.json")
  progress = metrics_lib.Progress(name, total_steps, 0, images_per_step, steps_per_epoch)

  start, state = ckpt.restore(ckpt_lib.abstract_like(abstract, repl), log=progress.message)
  if start is None:
    start, state = 0, jax.jit(init, out_shardings=state_sharding)(key)

  if start >= total_steps and distributed.agreed(os.path.exists(summary_path)):
    try:
      summary = metrics_lib.read_json(summary_path)
    except UserError:  # damaged: this stage rewrites it below
      summary = {}
    if isinstance(summary, dict) and summary.get("steps") == total_steps:
      ckpt.close()  # already finished: nothing to redo
      return StageResult(state, summary)

  metrics_path = os.path.join(stage_dir, "metrics.jsonl")
  records = _truncate_metrics(metrics_path, start)
  elapsed_before = _elapsed_before(records, start)
  pending, epoch_pending, last_epoch = _load_partial(stage_dir, start, cfg.log_every_steps,
                                        steps_per_epoch, log=progress.message)
  if on_start is not None:
    on_start(start)
  writer = metrics_lib.MetricWriter(stage_dir)
  progress = metrics_lib.Progress(name, total_steps, start, images_per_step,
                                  steps_per_epoch)
  progress.message(f"{'resuming at' if start else 'starting from'} step {start} of "
                   f"{total_steps} ({steps_per_epoch} steps/epoch) on "
                   f"{mesh.devices.size} device(s)")

  def stop_non_finite(what: str):
    ckpt.close()  # let the last good checkpoint finish writing
    writer.close(quiet=True)
    good = ckpt.latest_step()
    raise NonFinite(
        f"[{name}] {what}; stopped. The last good checkpoint is "
        f"{f'step {good}' if good is not None else 'none'} in {ckpt.directory}. Lower the "
        "learning rate (or check the data) and use a new --workdir, or rerun to resume.")

  def save(step: int, force: bool = False):
    if not bool(jax.device_get(_all_finite(state))):
      stop_non_finite(f"the train state became NaN or Inf by step {step}")
    try:
      ckpt.check()  # an earlier asynchronous save's failure is the one to report
      try:
        _save_partial(stage_dir, step, jax.device_get(pending),
                      jax.device_get(epoch_pending), last_epoch, ckpt.oldest_step())
      except OSError as e:
        raise ckpt.save_error(step, e, own=True) from None
      ckpt.save(step, state, force=force)
    except UserError:
      writer.close(quiet=True)  # the disk may be full: the save's error is the one line
      raise

  t0 = time.perf_counter()
  eval_metrics = {}
  with catch_signals() as flag, \
       concurrent.futures.ThreadPoolExecutor(1) as pool:
    future = pool.submit(load_batch, start) if start < total_steps else None
    for step in range(start, total_steps):
      batch = future.result()
      if step + 1 < total_steps:
        future = pool.submit(load_batch, step + 1)  # overlaps with the device step
      state, m = step_fn(state, mesh_lib.global_batch(batch, mesh))
      pending.append(m)
      if on_epoch_end is not None:
        epoch_pending.append(m)
      done = step + 1
      if on_step is not None:
        on_step(done, state)
      epoch_end = done % steps_per_epoch == 0
      if epoch_end and on_epoch_end is not None:
        fetched = jax.device_get(epoch_pending)
        epoch_pending = []
        last_epoch = {"epoch": done // steps_per_epoch, "step": done, "means": {
            k: float(np.mean([float(p[k]) for p in fetched])) for k in fetched[0]}}
        on_epoch_end(state, last_epoch["epoch"], done, last_epoch["means"])
      log_now = done % cfg.log_every_steps == 0 or done == total_steps
      eval_now = evaluate is not None and (done == total_steps or (
          epoch_end and (done // steps_per_epoch) % cfg.eval_every_epochs == 0))
      if log_now or eval_now:
        fetched = jax.device_get(pending)
        pending = []
        for i, p in enumerate(fetched):
          bad = [k for k, v in p.items() if "loss" in k and not np.isfinite(float(v))]
          if bad:
            stop_non_finite(f"{bad[0]} is {float(p[bad[0]])} at step "
                            f"{done - len(fetched) + i + 1}")
        record = {f"train_{k}" if not k.startswith(("val_", "arch_")) else k:
                  float(np.mean([float(p[k]) for p in fetched])) for k in fetched[0]}
        if lr_schedule is not None:
          record["lr"] = float(lr_schedule(done - 1))
        if eval_now:
          eval_metrics = evaluate(state)
          record.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        rate = progress.rate(done)
        record["images_per_s"] = rate
        record["elapsed_s"] = elapsed_before + time.perf_counter() - t0
        writer.write(done, record)
        progress.line(done, {k: v for k, v in record.items()
                             if k not in ("images_per_s", "elapsed_s")}, rate)
      if done % cfg.checkpoint_every_steps == 0 and done < total_steps:
        save(done)
      else:
        try:
          ckpt.check()  # a failed asynchronous save stops the run at once
        except UserError:
          writer.close(quiet=True)
          raise
      if distributed.preemption_requested():  # SIGTERM on some process (multi-process)
        flag["signum"] = signal.SIGTERM
      if flag["signum"] is not None and done < total_steps:
        save(done, force=True)
        try:
          ckpt.close()
        finally:
          writer.close(quiet=True)
        raise Interrupted(flag["signum"], done, ckpt.directory)

  save(total_steps, force=True)
  if not eval_metrics and evaluate is not None:
    eval_metrics = evaluate(state)
  summary = {"steps": total_steps, "epochs": total_steps / steps_per_epoch,
             **{f"eval_{k}": v for k, v in eval_metrics.items()},
             "train_time_s": elapsed_before + time.perf_counter() - t0,
             # the means of the last epoch (on_epoch_end's): what a lost record is rebuilt from
             **({"last_epoch": last_epoch} if last_epoch else {})}
  try:
    ckpt.close()
    if distributed.is_main_process():
      metrics_lib.write_json(summary_path, summary)
  except OSError as e:  # the summary: the checkpoint is written, a rerun writes it
    writer.close(quiet=True)
    raise UserError(f"[{name}] writing {summary_path} failed ({type(e).__name__}: {e}). "
                    "Free disk space and rerun the same command.") from None
  except UserError:
    writer.close(quiet=True)
    raise
  writer.close()
  progress.message("done" + (f": eval accuracy {summary['eval_accuracy']:.4f}"
                             if "eval_accuracy" in summary else ""))
  return StageResult(state, summary)
