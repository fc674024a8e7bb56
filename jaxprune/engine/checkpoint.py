"""Orbax checkpoints, the one place that reads and writes them: ``<stage>/checkpoints/``
(train states) and ``<stage>/final/`` (variables), restored through abstract targets."""
import logging
import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxprune.engine import distributed
from jaxprune.errors import UserError


def _in_orbax(filename) -> bool:
  return "/orbax/" in (filename or "").replace(os.sep, "/")


ORBAX_TMP = ".orbax-checkpoint-tmp"  # the suffix of a checkpoint being written


class _DropOrbaxErrors(logging.Filter):
  """Drops records logged by orbax, and asyncio's reports of orbax's failed tasks (e.g.
  "_GatheringFuture exception was never retrieved" when a background write failed)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if _in_orbax(record.pathname):
      return False
    # A failed background write's tensorstore future, reported by asyncio at exit: its
    # traceback has no orbax frame, its text names the checkpoint's temporary directory.
    if record.name == "asyncio" and ORBAX_TMP in str(record.msg) + str(record.args) + str(
        record.exc_info[1] if record.exc_info else ""):
      return False
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
      if _in_orbax(tb.tb_frame.f_code.co_filename):
        return False
      tb = tb.tb_next
    return True


def quiet_orbax_errors():
  """Drops orbax's own log records (a failed background save logs several tracebacks);
  :class:`Checkpointer` reports every failure itself, in one line. The CLI calls this
  unless ``--verbosity`` is given."""
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_DropOrbaxErrors())
  for name in ("absl", "asyncio"):  # whichever handler is added later
    logging.getLogger(name).addFilter(_DropOrbaxErrors())
  previous = sys.unraisablehook

  def hook(unraisable):
    # After a failed write, tensorstore's late callbacks find orbax's event loop closed,
    # and orbax's unfinished write coroutines are collected at exit (after a full disk).
    if "Event loop is closed" in str(unraisable.exc_value):
      return
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and _in_orbax(code.co_filename):
      return
    tb = unraisable.exc_traceback
    while tb is not None:
      if _in_orbax(tb.tb_frame.f_code.co_filename):
        return
      tb = tb.tb_next
    previous(unraisable)
  sys.unraisablehook = hook


def _first_line(e: BaseException, limit: int = 160) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _path(path) -> str:
  # Field, key and index alike: a NamedTuple's field reads back from orbax metadata
  # as a dict key of the same name.
  return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
                  for k in path)


def tree_mismatch(abstract: Any, stored: Any) -> str | None:
  """The first difference between two trees of arrays (paths and shapes), or None."""
  want = {_path(p): tuple(getattr(x, "shape", ()))
          for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  have = {_path(p): tuple(getattr(x, "shape", ()))
          for p, x in jax.tree_util.tree_leaves_with_path(stored)}
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"{len(missing)} entries missing there, e.g. {missing[0]}")
    if extra:
      parts.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
    return "; ".join(parts)
  for k in want:
    if want[k] != have[k]:
      n = sum(want[j] != have[j] for j in want)
      return (f"{k} has shape {have[k]} there and {want[k]} here "
              f"({n} of {len(want)} arrays differ)")
  return None


class Checkpointer:
  """Saves and restores the train state of one stage.

  A checkpoint that does not restore (a damaged file, a crash mid-write) is moved to
  ``<stage>/checkpoints_damaged/`` and the next older one is used; a checkpoint whose
  arrays do not match the run's state (another config) is an error.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._max_to_keep = max_to_keep
    try:
      self._manager = self._open()
    except OSError as e:
      raise UserError(f"Cannot write checkpoints to {self.directory} ({_first_line(e)}); "
                      "use a writable --workdir.") from None
    self._saved = set(self._manager.all_steps())

  def _open(self):
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def oldest_step(self) -> int | None:
    steps = self._manager.all_steps()
    return min(steps) if steps else None

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves ``state`` as ``step`` unless that step is already saved (returns whether).

    A failure of an earlier asynchronous save surfaces here as a :class:`UserError`.
    """
    step = int(step)
    self.check()
    if step in self._saved:
      return False
    try:
      saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self.save_error(step, e) from None
    if saved:
      self._saved.add(step)
      self._last_requested = step
    return saved

  def save_error(self, step: int, e: BaseException, *, own: bool = False) -> UserError:
    """The one-line error of a failed save of ``step`` (unless ``own``, the failure may
    be the save's before it)."""
    # The failure may be the previous (asynchronous) save's, reported by this call.
    try:
      finalized = sorted(int(d) for d in os.listdir(self.directory) if d.isdigit())
    except OSError:
      finalized = []
    failed = getattr(self, "_last_requested", None)
    if own or failed is None or failed in finalized:
      failed = step
    last = f"step {finalized[-1]}" if finalized else "none yet"
    return UserError(
        f"Saving the checkpoint of step {failed} to {self.directory} failed "
        f"({_first_line(e)}); the last good checkpoint is {last}. Free disk space (or fix "
        "the storage) and rerun the same command to resume from it.")

  def check(self):
    """Raises a :class:`UserError` if an asynchronous save has failed."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self.save_error(getattr(self, "_last_requested", None), e) from None

  def restore(self, abstract_state: Any, step: int | None = None,
              log=print) -> tuple[int | None, Any]:
    """The newest checkpoint (or ``step``) that restores: ``(step, state)``, or
    ``(None, None)`` when there is none."""
    steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    damaged, misfit = [], None
    for s in steps:
      try:
        stored = self._manager.item_metadata(s)
        stored = getattr(stored, "tree", stored)
      except Exception:  # pylint: disable=broad-except
        stored = None
      if stored is not None:
        try:
          mismatch = tree_mismatch(abstract_state, stored)
        except Exception:  # pylint: disable=broad-except
          mismatch = None
        if mismatch:
          misfit = misfit or (s, mismatch)
          continue
      try:
        state = self._manager.restore(s, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((s, _first_line(e)))
        continue
      if damaged:
        self._set_aside([d for d, _ in damaged])
        skipped = ", ".join(f"step {d} ({why})" for d, why in damaged)
        log(f"skipped damaged checkpoint(s) {skipped}; moved to {self._damaged_dir}; "
            f"resuming from step {s}")
      return s, state
    if misfit is not None:
      raise UserError(
          f"The checkpoint at {self.directory}/{misfit[0]} does not fit this run's model or "
          f"optimizer ({misfit[1]}). Use a new --workdir, or rerun with the config that "
          "wrote it.")
    if damaged:
      raise UserError(
          f"No checkpoint in {self.directory} restores (step "
          f"{damaged[0][0]}: {damaged[0][1]}). Delete {os.path.dirname(self.directory)} "
          "to restart this stage.")
    return None, None

  @property
  def _damaged_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), "checkpoints_damaged")

  def _set_aside(self, steps):
    """Moves damaged step directories out of orbax's sight (process 0), then reopens."""
    distributed.barrier("checkpoint_set_aside:before")
    if distributed.is_main_process():
      os.makedirs(self._damaged_dir, exist_ok=True)
      for s in steps:
        src = os.path.join(self.directory, str(s))
        dst = os.path.join(self._damaged_dir, str(s))
        if os.path.exists(dst):
          shutil.rmtree(dst)
        if os.path.exists(src):
          os.replace(src, dst)
    distributed.barrier("checkpoint_set_aside:after")
    self._manager.close()
    self._manager = self._open()
    self._saved = set(self._manager.all_steps())

  def wait(self):
    self._manager.wait_until_finished()
    self.check()

  def close(self):
    try:
      self._manager.wait_until_finished()
      self.check()
    finally:
      self._manager.close()


def abstract_like(tree: Any, sharding) -> Any:
  """Shape/dtype/sharding structs of ``tree`` (itself abstract or concrete)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def save_variables(directory: str, variables: Any):
  """Writes final variables (a dict of collections) for later stages."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(directory), variables, force=True)
  ckptr.wait_until_finished()


def save_variables_once(directory: str, variables: Any) -> bool:
  """Writes ``variables`` unless ``directory`` already holds them; returns whether it wrote.

  The one way a stage writes its product: the write is collective, so every process
  takes process 0's view of "already there" (a rerun of a finished stage skips it).
  """
  if distributed.agreed(os.path.isdir(directory)):
    return False
  save_variables(directory, variables)
  return True


def load_variables(directory: str, abstract_variables: Any | None = None) -> Any:
  """Reads variables written by :func:`save_variables`.

  With ``abstract_variables`` (from ``jax.eval_shape(model.init, ...)``) the shapes
  are checked against the model that will use them; without, they come from the
  checkpoint. Either way the variables load on any device topology, whatever the
  topology of the run that saved them.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise UserError(f"No saved variables at {directory}: run the stage that writes "
                    "them first, or point the config at an existing checkpoint.")
  ckptr = ocp.StandardCheckpointer()
  try:
    stored = ckptr.metadata(directory).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"The variables at {directory} cannot be read ({_first_line(e)}).") \
        from None
  if abstract_variables is None:
    abstract_variables = stored
  else:
    mismatch = tree_mismatch(abstract_variables, stored)
    if mismatch:
      raise UserError(f"The variables at {directory} do not fit the model they are "
                      f"loaded into: {mismatch}. Point at variables of the same "
                      "architecture (and number of classes).")
  # Unless a target says otherwise, load onto this process's first device: the run that
  # wrote the variables may have had another device topology (e.g. several processes).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  def target(a):
    sharding = getattr(a, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
      sharding = device
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

  abstract_variables = jax.tree.map(target, abstract_variables)
  try:
    return ckptr.restore(directory, abstract_variables)
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"The variables at {directory} do not fit the model they are "
                    f"loaded into ({_first_line(e)}).") from e
