"""Device mesh and batch sharding, the same code on 1 CPU, 8 fake CPUs, a GPU node or a pod.

A batch is a pytree whose leaves have the example on axis 0. Each host holds its own
rows (`process_index` of `process_count`, contiguous, in process order); the global
batch is the concatenation of the hosts' rows, split over the mesh's batch axes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Mesh axes the batch is split over, in this order; `data` is always present.
BATCH_AXES = ("data", "fsdp")


def make_mesh(axes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with named axes; one size may be -1.

  `make_mesh()` is the pure data-parallel mesh `{"data": n_devices}`. Axes are
  `AxisType.Auto` (sharding follows jit in/out shardings and constraints).
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = dict(axes or {"data": -1})
  if "data" not in axes:
    raise ValueError(f"mesh axes {axes} have no 'data' axis")
  sizes = list(axes.values())
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh axes {axes}: at most one size may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh axes {axes} do not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh axes {dict(zip(axes, sizes))} need {int(np.prod(sizes))} devices; "
                     f"there are {len(devices)}")
  return jax.make_mesh(tuple(sizes), tuple(axes), axis_types=(AxisType.Auto,) * len(sizes),
                       devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_size_divisor(mesh: Mesh) -> int:
  """A global batch size must be a multiple of this (devices along the batch axes)."""
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Axis 0 split over the batch axes, other axes replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Rows of a global batch that this host holds; checks divisibility with a clear error."""
  div, hosts = batch_size_divisor(mesh), jax.process_count()
  if global_batch_size % div or global_batch_size % hosts:
    raise ValueError(f"batch size {global_batch_size} must be a multiple of the {div} devices "
                     f"along mesh axes {batch_axes(mesh)} and of the {hosts} hosts")
  return global_batch_size // hosts


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Global arrays, split over the batch axes, from this host's rows (numpy pytree)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def global_to_host(batch: Any, mesh: Mesh) -> Any:
  """This host's rows of globally batch-sharded arrays, as numpy (blocks until ready)."""
  if jax.process_count() == 1:
    return jax.device_get(batch)
  local = multihost_utils.global_array_to_host_local_array(batch, mesh, P(batch_axes(mesh)))
  return jax.device_get(local)
