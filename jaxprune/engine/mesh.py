"""The device mesh (one ``data`` axis) and the shardings of a run. Knows no models,
optimizers or datasets."""
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxprune.errors import UserError

DATA_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over all devices (of all processes by default)."""
  devices = list(devices) if devices is not None else jax.devices()
  # Auto axes: XLA propagates the batch sharding through reshapes and reductions.
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh, what: str = "batch size"):
  n = mesh.devices.size
  if global_batch_size % n:
    raise UserError(
        f"The {what} {global_batch_size} does not divide over the {n} devices of the "
        f"mesh; choose a multiple of {n}.")
  if global_batch_size % jax.process_count():
    raise UserError(f"The {what} {global_batch_size} does not divide over "
                    f"{jax.process_count()} processes.")


def global_batch(local_batch: Any, mesh) -> Any:
  """Assembles each process's slice of a batch (a pytree of arrays) into global arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
      local_batch)


def replicate(tree: Any, mesh) -> Any:
  """Places a host pytree on every device of the mesh (identical on all processes)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)
