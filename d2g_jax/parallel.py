"""Device mesh and batch sharding, the same code on 1 CPU, 8 fake CPUs, a GPU node or a pod.

A batch is a pytree whose leaves have the example on axis 0. Each host holds its own
rows (`process_index` of `process_count`, contiguous, in process order); the global
batch is the concatenation of the hosts' rows, split over the mesh's batch axes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
  types = (AxisType.Auto,) * len(sizes)
  try:
    return jax.make_mesh(tuple(sizes), tuple(axes), axis_types=types, devices=devices)
  except NotImplementedError:
    # A TPU torus whose axes do not factor into the mesh's (e.g. fsdp 8 on v5p 4x4x4):
    # split physical axes, still in ICI order.
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(grid, tuple(axes), axis_types=types)


def under_mesh(fn, mesh: Mesh):
  """`fn` traced with `mesh` as the context mesh (`jax.sharding.get_abstract_mesh()`), which
  kernels that run per shard read (attention="flash": a `shard_map` over the batch axes).
  Wrap every function jitted over a mesh with it; it changes nothing else."""
  import functools

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


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


# ------------------------------------------------------------------ parameter sharding
# Sharding as config data (big_vision's `sharding.py`): a list of (regex, strategy) rules
# over '/'-joined pytree paths, first match wins, every leaf must be covered.
#   "fsdp"       split the largest dimension divisible by the `fsdp` axis size over it
#                (leaves smaller than `min_size` elements, or with no divisible dimension,
#                are replicated)
#   "replicate"  a full copy on every device
STRATEGIES = ("fsdp", "replicate")
DEFAULT_RULES = ((".*", "fsdp"),)


def path_str(path) -> str:
  """'/'-joined names of a `tree_flatten_with_path` key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def fsdp_spec(shape: Sequence[int], axis_size: int, min_size: int, axis: str = "fsdp") -> P:
  """PartitionSpec splitting the largest dimension divisible by `axis_size` over `axis`."""
  if axis_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
  for d in dims:
    if shape[d] % axis_size == 0:
      return P(*([None] * d + [axis]))
  return P()


def infer_sharding(tree: Any, mesh: Mesh, rules: Sequence[Sequence[str]] = DEFAULT_RULES, *,
                   min_size: int = 2 ** 14, prefix: str = "") -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by `rules`.

  Paths are '/'-joined names (e.g. "g_params/down_blocks_0/resnets_0/conv1/kernel",
  "g_opt/0/mu/..."), prefixed by `prefix`. Raises if a leaf matches no rule.
  """
  import re
  compiled = []
  for rule in rules:
    if len(rule) != 2 or rule[1] not in STRATEGIES:
      raise ValueError(f"sharding rule {tuple(rule)!r}: expected (regex, strategy) with "
                       f"strategy one of {STRATEGIES}")
    compiled.append((re.compile(rule[0]), rule[1]))
  fsdp = mesh.shape.get("fsdp", 1)

  def one(path, leaf):
    name = prefix + path_str(path)
    shape = tuple(getattr(leaf, "shape", ()))
    for pattern, strategy in compiled:
      if pattern.search(name):
        spec = fsdp_spec(shape, fsdp, min_size) if strategy == "fsdp" else P()
        return NamedSharding(mesh, spec)
    raise ValueError(f"no sharding rule covers {name!r} (shape {shape}); rules: "
                     f"{[r[0] for r in rules]}. Add a rule, e.g. ('.*', 'replicate') last")
  return jax.tree_util.tree_map_with_path(one, tree)


def place(tree: Any, shardings: Any) -> Any:
  """Host (numpy) arrays into their shards: each device receives only its slice."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)
