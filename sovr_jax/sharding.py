"""Data-parallel device mesh and the shardings of the train and eval steps.

One mesh axis, "data", over every device of every process. Parameters and
optimizer state are replicated; batches are split along their first axis.
Global batches are assembled from each process's local part with
``jax.make_array_from_process_local_data``, so the same code runs on one CPU,
one GPU, all TPU cores of a Colab, and several hosts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over ``devices`` (default: all), with an Auto axis.

  New jax defaults ``jax.make_mesh`` to Explicit axes; this code relies on
  Auto sharding propagation inside ``jax.jit``, so it asks for Auto.
  """
  devices = list(devices if devices is not None else jax.devices())
  axis_types = (jax.sharding.AxisType.Auto,)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=axis_types,
                       devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh, batch_axis: int = 0) -> NamedSharding:
  """Splits axis ``batch_axis`` over "data" (1 for [steps, batch, ...] stacks)."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, what: str) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} must be divisible by the number of devices ({n}); "
                     f"use a multiple of {n}.")


def process_slice(global_size: int) -> slice:
  """This process's contiguous part of a global batch of ``global_size``."""
  count, index = jax.process_count(), jax.process_index()
  if global_size % count:
    raise ValueError(f"Global batch {global_size} must be divisible by the number of "
                     f"processes ({count}).")
  per = global_size // count
  return slice(index * per, (index + 1) * per)


def global_batch(batch: Any, mesh: jax.sharding.Mesh, batch_axis: int = 0) -> Any:
  """Shards a global numpy batch over "data" along ``batch_axis``.

  Every process passes the same global batch (its index order is a pure
  function of seed and step) and contributes only its own slice, so a host
  never transfers another host's examples.
  """
  sharding = batch_sharded(mesh, batch_axis)

  def put(x):
    x = np.asarray(x)
    index = (slice(None),) * batch_axis + (process_slice(x.shape[batch_axis]),)
    return jax.make_array_from_process_local_data(sharding, x[index], x.shape)
  return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
