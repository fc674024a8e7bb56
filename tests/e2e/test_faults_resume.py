"""Faults, second round: a resume inside an epoch and a log interval, a cut history line
after a finished search, a latency table from another machine, a full disk.

Each test compares the interrupted run with an uninterrupted one bit for bit (records,
epoch means, derived architecture, final variables), or checks the one-line error.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxprune.engine import loop, mesh as mesh_lib
from jaxprune.engine.metrics import read_jsonl

TOTAL, SPE, LOG = 12, 6, 4  # steps, steps per epoch, log interval (not a divisor of SPE)


def _stage():
  """``run(workdir, on_step=None) -> (StageResult, epoch means)`` of a fresh random
  regression stage that logs every 4 steps, averages each 6-step epoch and saves a
  checkpoint every 5 steps (so checkpoints fall inside log intervals and epochs)."""
  rng = np.random.default_rng()
  x = rng.normal(size=(TOTAL, 8, 5)).astype(np.float32)
  y = (x @ rng.normal(size=(5,)) + 0.1 * rng.normal(size=(TOTAL, 8))).astype(np.float32)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  cfg = ml_collections.ConfigDict(dict(eval_every_epochs=1, log_every_steps=LOG,
                                       checkpoint_every_steps=5, keep_checkpoints=2))

  def init(key):
    return {"w": jax.random.normal(key, (5,))}

  @jax.jit
  def step_fn(state, batch):
    err = batch["x"] @ state["w"] - batch["y"]
    loss, g = jax.value_and_grad(lambda w: jnp.mean((batch["x"] @ w - batch["y"]) ** 2))(
        state["w"])
    return {"w": state["w"] - 0.05 * g}, {"loss": loss, "val_abs": jnp.mean(jnp.abs(err))}

  def run(workdir, on_step=None):
    means = {}
    result = loop.run_stage(
        "stage", str(workdir), init=init, seed=3, step_fn=step_fn,
        load_batch=lambda s: {"x": x[s], "y": y[s]}, total_steps=TOTAL,
        steps_per_epoch=SPE, images_per_step=8, cfg=cfg, mesh=mesh,
        on_epoch_end=lambda state, epoch, step, m: means.update({epoch: m}),
        on_step=on_step)
    return result, means
  return run


def _log(workdir):
  return [{k: v for k, v in r.items() if k not in ("images_per_s", "elapsed_s")}
          for r in read_jsonl(os.path.join(workdir, "stage", "metrics.jsonl"))]


def test_resume_inside_an_epoch_and_a_log_interval_logs_the_same_records(tmp_path):
  """SIGINT at a random step that is neither a log step nor an epoch end (its checkpoint
  is saved there; a SIGKILL resumes from such a checkpoint too, see the TAS test below):
  every metrics record and every epoch's means equal the uninterrupted run's."""
  run = _stage()
  full, full_means = run(tmp_path / "full")
  inside = [s for s in range(1, TOTAL) if s % LOG and s % SPE]
  at = int(np.random.default_rng().choice(inside))

  def interrupt(step, state):
    del state
    if step == at:
      os.kill(os.getpid(), signal.SIGINT)

  with pytest.raises(loop.Interrupted):
    run(tmp_path / "cut", on_step=interrupt)

  resumed, means = run(tmp_path / "cut")
  np.testing.assert_array_equal(jax.device_get(resumed.state["w"]),
                                jax.device_get(full.state["w"]))
  assert _log(tmp_path / "cut") == _log(tmp_path / "full"), at
  assert means == {e: m for e, m in full_means.items() if e in means} and 2 in means, at


# --- The TAS search killed inside an epoch and a log interval (whole processes). --------

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_STAGE = os.path.join(TESTS, "fault_stage.py")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """One persistent XLA cache for this module's processes: they compile the same steps."""
  return str(tmp_path_factory.mktemp("xla_cache"))


def _tas(workdir, seed, cache, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.run([sys.executable, FAULT_STAGE, str(workdir), str(seed), "--tas",
                         *flags], capture_output=True, text=True, env=env, timeout=600)
  return proc.returncode, proc.stdout, proc.stderr


def _files(workdir):
  strip = lambda r: {k: v for k, v in r.items() if k not in ("images_per_s", "elapsed_s")}
  return {"metrics": [strip(r) for r in read_jsonl(f"{workdir}/search/metrics.jsonl")],
          "history": open(f"{workdir}/search/arch_history.jsonl", encoding="utf-8").read(),
          "architecture": json.loads(open(f"{workdir}/architecture.json",
                                          encoding="utf-8").read())}


def _variables(out):
  return json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:])


@pytest.fixture(scope="module")
def tas_reference(tmp_path_factory, compile_cache):
  """An uninterrupted run of fault_stage.py's TAS search: (seed, workdir, files, vars)."""
  seed = int(np.random.default_rng().integers(1 << 20))
  workdir = tmp_path_factory.mktemp("tas_reference")
  rc, out, err = _tas(workdir, seed, compile_cache)
  assert rc == 0, err[-3000:]
  files = _files(workdir)
  assert len(files["history"].splitlines()) == 3
  return seed, workdir, files, _variables(out)


@pytest.mark.e2e
def test_tas_search_killed_inside_an_epoch_and_a_log_interval_resumes_bit_identical(
    tmp_path, compile_cache, tas_reference):
  """SIGKILL of a TAS search (graph space on a user NNX model, derive_epoch=best; 3
  epochs of 5 steps, a log line every 4 and a checkpoint every 3 steps) at a random step
  inside an epoch and a log interval, then rerun: metrics.jsonl, arch_history.jsonl,
  architecture.json and the SHA-256 of every final search variable equal an
  uninterrupted run's. (Every epoch is inside the cost band, so the derived network is
  the one of the best epoch's val_accuracy: an epoch mean.)"""
  seed, _, want, want_vars = tas_reference
  # Checkpoints at 3, 6, 9 (inside both) and 12; from step 7 on that of step 3 is final
  # (orbax's save of step 6 waited for it), so the rerun resumes at 3, 6 or 9.
  at = int(np.random.default_rng().choice([7, 8, 11]))
  rc, _, _ = _tas(tmp_path / "cut", seed, compile_cache, "--kill_at", str(at))
  assert rc == -signal.SIGKILL
  rc, out, err = _tas(tmp_path / "cut", seed, compile_cache)
  assert rc == 0, err[-3000:]
  resumed_at = int(out.split("[search] resuming at step ")[1].split()[0])
  assert resumed_at % 4 and resumed_at % 5, resumed_at  # inside a log interval and an epoch
  assert _files(tmp_path / "cut") == want, (at, resumed_at)
  assert _variables(out) == want_vars, (at, resumed_at)


@pytest.mark.e2e
def test_cut_last_history_line_after_a_finished_search_is_rebuilt(
    tmp_path, compile_cache, tas_reference):
  """A finished search whose arch_history.jsonl lost part of its last line (at a random
  byte): the rerun rebuilds that epoch's record, val_accuracy included, rewrites the file
  byte for byte and derives the same network."""
  seed, reference, want, _ = tas_reference
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  os.remove(workdir / "architecture.json")
  path = workdir / "search" / "arch_history.jsonl"
  text = path.read_text()
  start = text.rstrip("\n").rindex("\n") + 1
  cut = int(np.random.default_rng().integers(start, len(text) - 1))  # keep < the newline
  path.write_text(text[:cut])
  rc, _, err = _tas(workdir, seed, compile_cache)
  assert rc == 0, err[-3000:]
  assert path.read_text() == text
  assert _files(workdir) == want


@pytest.mark.e2e
def test_lost_earlier_history_record_is_one_line(tmp_path, compile_cache, tas_reference):
  """A finished search whose arch_history.jsonl lost a whole earlier line (epoch 1 or 2)
  cannot rebuild it (only the last epoch's state is kept): one line naming the epoch,
  no architecture written."""
  seed, reference, _, _ = tas_reference
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  os.remove(workdir / "architecture.json")
  path = workdir / "search" / "arch_history.jsonl"
  lines = path.read_text().splitlines(keepends=True)
  lost = int(np.random.default_rng().integers(0, 2))
  path.write_text("".join(lines[:lost] + lines[lost + 1:]))
  rc, _, err = _tas(workdir, seed, compile_cache)
  last = [l for l in err.strip().splitlines() if l.strip()]
  assert rc == 2 and len(last) == 1, err[-3000:]
  assert f"has no record of search epoch {lost + 1}" in last[0], last[0]
  assert not (workdir / "architecture.json").exists()


# --- A disk that fills up while TensorBoard still holds unwritten events. ---------------

@pytest.mark.slow
def test_full_disk_under_tensorboard_events_is_one_line(tmp_path):
  """The checkpoint write fails (no file may grow past 64 KiB) and the TensorBoard event
  file's flush fails with ENOSPC (as with 30-100 KB left): one line naming the step and
  the last good checkpoint, no traceback (closing the writer in the error handler, or at
  exit, used to raise again); the rerun resumes and finishes."""
  from test_faults import _ckpt_steps, _finish, _launch  # pylint: disable=g-import-not-at-top
  seed = int(np.random.default_rng().integers(1 << 20))
  workdir = tmp_path / "run"
  rc, out, err = _finish(_launch(workdir, seed, "--fsize_limit_at", "10", "--tb_full_at",
                                 "10"))
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert rc == 2 and len(lines) == 1, err[-3000:]
  assert lines[0].startswith("error: Saving the checkpoint of step "), lines[0]
  failed = int(lines[0].split()[6])
  assert f"last good checkpoint is step {failed - 4}" in lines[0], lines[0]
  assert "[stage] step 24/" not in out and _ckpt_steps(workdir)[-1] == failed - 4
  rc, out, err = _finish(_launch(workdir, seed))
  assert rc == 0 and "RESULT " in out, err[-2000:]


# --- A latency table measured for another setting, on a search with progress. ---------

@pytest.mark.e2e
def test_foreign_latency_table_on_a_search_with_progress_is_refused_unless_remeasured(
    tmp_path, compile_cache):
  """tas.cost=latency, killed at a random search step after its first checkpoint; the
  table's fingerprint then says another host measured it. The rerun stops in one line
  naming the difference and keeps the table; with tas.remeasure_latency=true it measures
  a new table and restarts the search from step 0 (not from the checkpoint; killed
  there, to keep the test short)."""
  seed = int(np.random.default_rng().integers(1 << 20))
  latency = ["--set", "tas.cost='latency'", "--set", "tas.latency_batch=4"]
  rc, _, err = _tas(tmp_path, seed, compile_cache, *latency, "--kill_at",
                    # from step 7 on the checkpoint of step 3 is final (orbax's save
                    # of step 6 waited for it)
                    str(np.random.default_rng().integers(7, 9)))
  assert rc == -signal.SIGKILL, err[-3000:]
  path = tmp_path / "search" / "latency_table.json"
  table = json.loads(path.read_text())
  here = table["fingerprint"]["host"]
  table["fingerprint"]["host"] = "Another CPU, 3 cores"
  path.write_text(json.dumps(table))
  before = path.read_text()
  rc, out, err = _tas(tmp_path, seed, compile_cache, *latency)
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert rc == 2 and len(lines) == 1, err[-3000:]
  assert f"host: 'Another CPU, 3 cores' there, {here!r} here" in lines[0], lines[0]
  assert "--config.tas.remeasure_latency=true" in lines[0], lines[0]
  assert path.read_text() == before and "[search] step" not in out
  rc, out, err = _tas(tmp_path, seed, compile_cache, *latency,  # killed once restarted
                      "--set", "tas.remeasure_latency=True", "--kill_at", "2")
  assert rc == -signal.SIGKILL, err[-3000:]
  assert "restarting the search" in out and "[search] starting from step 0" in out, out
  assert json.loads(path.read_text())["fingerprint"]["host"] == here


def test_remeasure_latency_is_a_bool_and_needs_the_latency_cost():
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from jaxprune.errors import UserError  # pylint: disable=g-import-not-at-top
  from jaxprune.methods import tas  # pylint: disable=g-import-not-at-top

  def config(**tas_fields):  # a whole new section: a library caller's types unchecked
    c = load_config("configs/tas_resnet.py", "smoke")
    c.tas = ml_collections.ConfigDict({**c.tas.to_dict(), **tas_fields})
    return c

  for fields, needle in [({"cost": "latency", "remeasure_latency": "yes"}, "true or false"),
                         ({"remeasure_latency": True}, "only with")]:
    with pytest.raises(UserError, match="config tas.remeasure_latency=") as e:
      tas.validate(config(**fields))
    assert needle in str(e.value) and "\n" not in str(e.value)
  tas.validate(config(cost="latency", remeasure_latency=True))
