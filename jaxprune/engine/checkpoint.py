"""Orbax checkpoints: the one place that reads and writes them.

``<stage>/checkpoints/<step>/`` holds the full train state (latest N kept);
``<stage>/final/`` holds the final variables (params + BN statistics) that later
stages load, e.g. as a teacher. Restores always go through an abstract target
(shapes, dtypes and shardings), so NamedTuple optimizer states come back as
NamedTuples and arrays land on the right devices.
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxprune.engine import distributed
from jaxprune.errors import UserError


class Checkpointer:
  """Saves and restores the train state of one stage."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    return self._manager.save(int(step), args=ocp.args.StandardSave(state), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    step = self.latest_step() if step is None else step
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(
          f"The checkpoint at {self.directory}/{step} does not fit this run's model or "
          f"optimizer ({type(e).__name__}: {str(e)[:300]}). Use a new --workdir, or "
          "rerun with the config that wrote it.") from e

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
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
  if abstract_variables is None:
    abstract_variables = ckptr.metadata(directory).item_metadata.tree
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
                    f"loaded into ({str(e)[:300]}).") from e
