"""Data-parallel device mesh and the shardings of the train and eval steps.

One mesh axis, "data", over every device of every process. Parameters and
optimizer state are replicated; batches are split along their first axis.
Global batches are assembled from each process's local part with
``jax.make_array_from_process_local_data``, so the same code runs on one CPU,
one GPU, all TPU cores of a Colab, and several hosts.

Several hosts (or several processes on one host): call
``initialize_distributed`` before anything else touches jax (``sovr_jax.main``
does, from its --distributed / --coordinator_address / --num_processes /
--process_id flags); see docs/multihost.md.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sovr_jax.errors import ConfigError

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
    raise ConfigError(f"{what}={batch_size} must be divisible by the number of devices ({n}); "
                     f"use a multiple of {n}.")


def sync_processes(name: str) -> None:
  """A barrier across processes (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def round_to_devices(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """``batch_size`` rounded down to a multiple of the device count (at least one per device)."""
  n = mesh.devices.size
  return max(n, batch_size - batch_size % n)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  return int(value) if value else None


def _launcher_processes() -> int:
  """Processes started by a known multi-process launcher (SLURM, Open MPI), else 1."""
  for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    n = _env_int(name)
    if n is not None:
      return n
  return 1


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           *, mode: str = "auto") -> bool:
  """Starts ``jax.distributed`` when this process is one of several; returns whether it did.

  Must run before any other jax call. Unset arguments fall back to the environment:
  ``JAX_COORDINATOR_ADDRESS`` (read by jax itself), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` (read here); whatever is still unset, ``jax.distributed.initialize``
  detects on Cloud TPU pod slices, SLURM, Open MPI and Kubernetes.

  mode: "on" always initializes (on a TPU pod slice with no arguments); "off" never;
  "auto" initializes if a coordinator address, process id or more than one process is
  given (arguments or environment) or a SLURM / Open MPI launch of several tasks is
  detected, and otherwise runs single-process.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode must be auto, on or off, got {mode!r}.")
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if mode == "off":
    return False
  if mode == "auto":
    explicit = (coordinator_address is not None or process_id is not None
                or (num_processes or 1) > 1)
    if not explicit and _launcher_processes() <= 1:
      return False
    if num_processes == 1:
      return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def global_batch(batch: Any, mesh: jax.sharding.Mesh, batch_axis: int = 0) -> Any:
  """Shards a global numpy batch over "data" along ``batch_axis``.

  Every process passes the same global batch (its index order is a pure
  function of seed and step) and contributes only the rows its own devices
  hold (``local_rows``), so a host never transfers another host's examples.
  """
  sharding = batch_sharded(mesh, batch_axis)

  def put(x):
    x = np.asarray(x)
    rows = local_rows(sharding, x.shape, batch_axis)
    index = (slice(None),) * batch_axis + (rows,)
    return jax.make_array_from_process_local_data(sharding, x[index], x.shape)
  return jax.tree.map(put, batch)


def local_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...],
               batch_axis: int = 0) -> slice | np.ndarray:
  """Indices along ``batch_axis`` of a global array of ``shape`` held by this process's
  devices, ascending: the layout ``jax.make_array_from_process_local_data`` expects
  of the local data. Read from the sharding, so it is right whatever order the mesh
  lists the devices in (a TPU mesh need not list them process by process)."""
  size = shape[batch_axis]
  spans = sorted({(s[batch_axis].start or 0,
                   size if s[batch_axis].stop is None else s[batch_axis].stop)
                  for s in sharding.addressable_devices_indices_map(shape).values()})
  if all(a == b_prev for (a, _), (_, b_prev) in zip(spans[1:], spans[:-1])):
    return slice(spans[0][0], spans[-1][1])
  return np.concatenate([np.arange(a, b) for a, b in spans])


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Replicates ``tree`` over ``mesh``. With several processes, arrays committed to
  one local device (e.g. restored from a checkpoint) go through the host, as jax
  cannot copy them to another process's devices; every process must pass equal values."""
  target = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, target)

  def put(x):
    if isinstance(x, jax.Array) and x.is_fully_addressable:
      x = np.asarray(x)
    return jax.device_put(x, target)
  return jax.tree.map(put, tree)
