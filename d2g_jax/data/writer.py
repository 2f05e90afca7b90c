"""A resumable, sharded, data-parallel pass: N examples -> one jitted function over the mesh
-> ArrayRecord shards (`data.shards`). The pair stage and the latent caches are built on it.

Legend: B global batch, b = B / hosts (this host's rows).

Example i (0 <= i < N) is loaded on the host by `load_fn`, computed by `compute_fn` on the
whole mesh (the batch split over its `data` axis) and stored as record i. Shard s holds
examples [s*S, (s+1)*S) and is written by host s % process_count. Batches never straddle
shards, so a shard is always computed from the same batches, whether or not the run was
interrupted: resumed runs give the same bits as uninterrupted ones (same command, same
devices).

Killed at any moment (SIGKILL included) and started again with the same command,
`write_shards` keeps the shards whose sidecar exists, discards unfinished temp files and
computes only the missing shards; no example is lost or repeated. A run with a different
config into the same folder is refused, listing what differs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from d2g_jax import files, parallel
from d2g_jax.data import shards as fmt
from d2g_jax.log import get_logger

_log = get_logger(__name__)

# load_fn(indices, rows) -> (stored, inputs), on the host:
#   stored: {name: one value per index} (int, float, str or numpy array), kept in the records;
#   inputs: {name: array with `rows` >= len(indices) rows}, fed to compute_fn (pad the tail).
LoadFn = Callable[[list[int], int], tuple[Mapping[str, Sequence], Mapping[str, np.ndarray]]]
# compute_fn(params, inputs) -> {name: array_Bx...}: traceable; `inputs` also holds "index"
# (int32, B); every output is stored per example under its name.
ComputeFn = Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]

INDEX = "index"
WRITER_CONFIG_KEYS = ("num_examples", "shard_size", "record")


# --------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True)
class Chunk:
  """One host-local batch: examples [start, stop) of `shard`."""
  shard: int
  start: int
  stop: int


def shard_range(shard: int, shard_size: int, num_examples: int) -> tuple[int, int]:
  return shard * shard_size, min((shard + 1) * shard_size, num_examples)


def owned_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
  """The shards host `process_index` writes: s % process_count == process_index."""
  return list(range(process_index, num_shards, process_count))


def plan_chunks(shard_ids: Sequence[int], shard_size: int, num_examples: int,
                local_batch: int) -> list[Chunk]:
  """Host-local batches covering `shard_ids`, each inside one shard (the last one short)."""
  chunks = []
  for s in shard_ids:
    lo, hi = shard_range(s, shard_size, num_examples)
    chunks += [Chunk(s, a, min(a + local_batch, hi)) for a in range(lo, hi, local_batch)]
  return chunks


def pad_rows(arrays: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Each array zero-padded along axis 0 to `rows` rows (a short last batch)."""
  out = {}
  for k, v in arrays.items():
    v = np.asarray(v)
    out[k] = np.concatenate([v, np.zeros((rows - len(v),) + v.shape[1:], v.dtype)]) \
        if len(v) < rows else v
  return out


# ----------------------------------------------------------------- config
def sha256_json(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def check_config(path: str, found: Mapping[str, Any], expected: Mapping[str, Any]):
  """Raises ValueError listing every differing key unless the two configs are equal."""
  if sha256_json(found) == sha256_json(expected):
    return
  absent = "<absent>"
  diffs = []
  for k in sorted(set(found) | set(expected)):
    a, b = found.get(k, absent), expected.get(k, absent)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += [f"{k}.{kk}: folder has {a.get(kk, absent)!r}, this run {b.get(kk, absent)!r}"
                for kk in sorted(set(a) | set(b)) if a.get(kk, absent) != b.get(kk, absent)]
    elif a != b:
      diffs.append(f"{k}: folder has {a!r}, this run {b!r}")
  raise ValueError(f"{path} was written by a run with a different config:\n  "
                   + "\n  ".join(diffs)
                   + "\nUse another output folder, or rerun with the folder's config to resume.")


def _value_spec(v: Any) -> str:
  if isinstance(v, (bool, np.bool_)):
    return "bool"
  if isinstance(v, (int, np.integer)) and not isinstance(v, np.ndarray):
    return "int"
  if isinstance(v, (float, np.floating)) and not isinstance(v, np.ndarray):
    return "float"
  if isinstance(v, str):
    return "str"
  v = np.asarray(v)
  return f"{v.dtype.name}{list(v.shape)}"


def record_spec(stored: Mapping[str, Sequence], outputs: Mapping[str, Any]) -> dict[str, str]:
  """{key: "int" | "float" | "str" | "dtype[shape]"} of one record (the batch axis dropped)."""
  spec = {INDEX: "int"}
  spec.update({k: _value_spec(v[0]) for k, v in stored.items()})
  spec.update({k: f"{np.dtype(v.dtype).name}{list(v.shape[1:])}" for k, v in outputs.items()})
  return spec


# ---------------------------------------------------------------- manifest
def _barrier(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _manifest(layout: fmt.Layout, config: dict, num_shards: int, status: str,
              shard_infos: list[dict]) -> dict:
  return {
      "format": layout.format, "format_version": fmt.FORMAT_VERSION, "status": status,
      "config": config, "config_sha256": sha256_json(config),
      "num_examples": config["num_examples"], "shard_size": config["shard_size"],
      "num_shards": num_shards, "record": config["record"],
      "total_bytes": sum(s["bytes"] for s in shard_infos), "shards": shard_infos,
  }


def _start_manifest(out_dir: str, layout: fmt.Layout, config: dict, num_shards: int) -> dict:
  """Checks the folder against this run's config; process 0 writes the first manifest."""
  path = os.path.join(out_dir, fmt.MANIFEST)
  if os.path.exists(path):  # every host checks, so every host fails alike
    check_config(path, fmt.read_manifest(out_dir, layout)["config"], config)
  if os.path.isdir(out_dir):
    suffix = fmt.shard_name(0, num_shards, layout).split("-of-")[1].split(".")[0]
    foreign = sorted(f for f in os.listdir(out_dir) if f.startswith(layout.prefix + "-")
                     and f.split("-of-")[-1].split(".")[0] != suffix)
    if foreign:
      raise fmt.ShardError(f"{out_dir} holds shards of another run ({', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}; this run writes "
                           f"{num_shards} shards). Use another output folder.")
  if jax.process_index() == 0 and not os.path.exists(path):
    os.makedirs(out_dir, exist_ok=True)
    files.save_json(_manifest(layout, config, num_shards, "in_progress", []), path)
  _barrier(f"d2g_{layout.prefix}_manifest")
  manifest = fmt.read_manifest(out_dir, layout)
  check_config(path, manifest["config"], config)
  return manifest


def _completed(out_dir: str, layout: fmt.Layout, shard: int, num_shards: int,
               config_sha: str) -> dict | None:
  """A shard's sidecar if the shard is complete (size checked), else None."""
  info = fmt.read_sidecar(out_dir, shard, num_shards, layout)
  if info is None:
    return None
  side = os.path.join(out_dir, fmt.sidecar_name(shard, num_shards, layout))
  if info.get("config_sha256") != config_sha:
    raise fmt.ShardError(f"{side} belongs to a run with another config (config_sha256 "
                         f"{info.get('config_sha256')}, this run {config_sha}). Use another "
                         f"output folder, or delete the folder's {layout.prefix}-* files.")
  fmt.check_shard(out_dir, info, "size", layout)
  return info


def _pending_shards(out_dir: str, layout: fmt.Layout, num_shards: int,
                    config_sha: str) -> tuple[list[int], list[int]]:
  """(this host's shards, those not complete); removes their unfinished temp files."""
  mine = owned_shards(num_shards, jax.process_index(), jax.process_count())
  stems = {fmt.shard_name(s, num_shards, layout).split(".")[0] for s in mine}
  for f in os.listdir(out_dir):  # .pairs-SSSSS-of-NNNNN.array_record.tmp, .pairs-...json.*.tmp
    if f.startswith(f".{layout.prefix}-") and f.endswith(".tmp") and f[1:].split(".")[0] in stems:
      os.remove(os.path.join(out_dir, f))
  return mine, [s for s in mine
                if _completed(out_dir, layout, s, num_shards, config_sha) is None]


def _finish_manifest(out_dir: str, layout: fmt.Layout, config: dict, num_shards: int) -> dict:
  """Process 0 lists every shard (all must be complete) in the final manifest."""
  _barrier(f"d2g_{layout.prefix}_done")
  if jax.process_index() == 0:
    config_sha = sha256_json(config)
    infos, missing = [], []
    for s in range(num_shards):
      info = _completed(out_dir, layout, s, num_shards, config_sha)
      if info is None:
        missing.append(fmt.shard_name(s, num_shards, layout))
      else:
        infos.append({k: info[k] for k in ("shard", "name", "first_index", "num_records",
                                           "bytes", "sha256")})
    if missing:
      raise fmt.ShardError(f"{out_dir}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} "
                           f"({len(missing)} in all) are not complete; with several hosts, "
                           "out_dir must be one folder that every host sees")
    files.save_json(_manifest(layout, config, num_shards, "complete", infos),
                   os.path.join(out_dir, fmt.MANIFEST))
  _barrier(f"d2g_{layout.prefix}_manifest_final")
  return fmt.read_manifest(out_dir, layout)


def existing_manifest(out_dir: str, layout: fmt.Layout, expected: Mapping[str, Any]) -> dict | None:
  """The folder's manifest if a run of this config completed it; None if there is nothing
  or work is left (a shard and its sidecar deleted, say); raises if another config made
  it, listing the differences. `expected`: the manifest config keys known up front."""
  path = os.path.join(out_dir, fmt.MANIFEST)
  if not os.path.exists(path):
    return None
  manifest = fmt.read_manifest(out_dir, layout)
  found = {k: manifest["config"].get(k) for k in expected}
  check_config(path, found, expected)
  if manifest["status"] != "complete":
    return None
  for s in range(manifest["num_shards"]):
    info = fmt.read_sidecar(out_dir, s, manifest["num_shards"], layout)
    if info is None:
      return None
    fmt.check_shard(out_dir, info, "size", layout)
  return manifest


class _ShardSink:
  """Appends finished rows to their shards; a full shard is committed, then its sidecar."""

  def __init__(self, out_dir: str, layout: fmt.Layout, num_shards: int, config: dict,
               writer_options: str):
    self.out_dir, self.layout, self.num_shards = out_dir, layout, num_shards
    self.options = writer_options
    self.n, self.shard_size = config["num_examples"], config["shard_size"]
    self.config_sha = sha256_json(config)
    self.writers: dict[int, fmt.ShardWriter] = {}

  def write(self, chunk: Chunk, stored: Mapping[str, Sequence], out: Mapping[str, np.ndarray]):
    s, layout = chunk.shard, self.layout
    if s not in self.writers:
      self.writers[s] = fmt.ShardWriter(self.out_dir, fmt.shard_name(s, self.num_shards, layout),
                                        self.options)
    w = self.writers[s]
    for r in range(chunk.stop - chunk.start):
      record = {INDEX: chunk.start + r}
      record.update({k: v[r] for k, v in stored.items()})
      record.update({k: v[r] for k, v in out.items()})
      w.write(fmt.encode_record(record))
    lo, hi = shard_range(s, self.shard_size, self.n)
    if w.num_records == hi - lo:
      info = {"shard": s, "first_index": lo, **self.writers.pop(s).commit(),
              "config_sha256": self.config_sha, "host": jax.process_index()}
      files.save_json(info, os.path.join(self.out_dir,
                                        fmt.sidecar_name(s, self.num_shards, layout)))

  def abort(self):
    """Drops unfinished shards' temp files (a kill leaves them; the next run removes them)."""
    for w in self.writers.values():
      w.abort()


# ------------------------------------------------------------------ the pass
def _load(load_fn: LoadFn, indices: list[int], rows: int):
  stored, inputs = load_fn(indices, rows)
  stored = {k: list(v) for k, v in stored.items()}
  inputs = {k: np.asarray(v) for k, v in inputs.items()}
  for k, v in stored.items():
    if len(v) != len(indices):
      raise ValueError(f"load_fn stored {k!r} holds {len(v)} values for {len(indices)} examples")
  for k, v in inputs.items():
    if v.ndim == 0 or v.shape[0] != rows:
      raise ValueError(f"load_fn input {k!r} has shape {v.shape}; expected {rows} rows "
                       "(pad a short batch, e.g. with writer.pad_rows)")
  clash = ({INDEX} & (set(stored) | set(inputs)))
  if clash:
    raise ValueError(f"load_fn outputs {sorted(clash)}, a reserved key")
  return stored, inputs


def _step(compute_fn: ComputeFn, stored_keys: frozenset, params: Any,
          inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
  out = dict(compute_fn(params, inputs))
  clash = set(out) & (stored_keys | {INDEX})
  if clash:
    raise ValueError(f"compute_fn outputs {sorted(clash)}, which clash with the reserved key "
                     f"{INDEX!r} or the stored values {sorted(stored_keys)}")
  return out


def write_shards(out_dir: str, num_examples: int, load_fn: LoadFn, compute_fn: ComputeFn, *,
                 layout: fmt.Layout, config: Mapping[str, Any], batch_size: int,
                 shard_size: int, params: Any = None, mesh: jax.sharding.Mesh | None = None,
                 progress: bool = True, writer_options: str = fmt.WRITER_OPTIONS) -> dict:
  """Computes record i for every example i into ArrayRecord shards in `out_dir`; resumable.

  Args:
    out_dir: the dataset folder (shared by all hosts).
    num_examples: N; examples are 0..N-1 on every host.
    load_fn: `(indices, rows) -> (stored, inputs)` on the host (see `LoadFn`); called with
      `indices=[]` for the padding steps of a host with no work left.
    compute_fn: `(params, inputs) -> {name: array_Bx...}` (see `ComputeFn`), jitted once with
      the batch split over the mesh.
    layout: file prefix and manifest format (`shards.PAIRS`, `shards.LATENTS`).
    config: JSON-able description of the data (sources, models, seeds, ...); with the
      example count, shard size and record layout it is the config a resume must match.
    batch_size: global batch, a multiple of the batch devices and of the hosts.
    shard_size: examples per shard; best a multiple of batch_size / hosts (else the last
      batch of each shard is padded, wasted work).
    params: pytree passed to compute_fn (leaves not yet on devices are replicated).
    mesh: defaults to `parallel.make_mesh()` (all devices on `data`).
    progress: tqdm bar (examples/s, time left) on process 0.
    writer_options: ArrayRecord writer options (must keep `group_size:1`).

  Returns:
    The final manifest (also written to out_dir/manifest.json).
  """
  n = int(num_examples)
  if n < 1:
    raise ValueError(f"no examples to write to {out_dir} (num_examples={n})")
  if shard_size < 1 or batch_size < 1:
    raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be positive")
  if "group_size:1" not in writer_options.replace(" ", "").split(","):
    raise ValueError(f"writer_options {writer_options!r} must contain group_size:1 "
                     "(grain reads records at random)")
  bad = set(config) & set(WRITER_CONFIG_KEYS)
  if bad:
    raise ValueError(f"config keys {sorted(bad)} are set by write_shards itself")
  mesh = mesh or parallel.make_mesh()
  b = parallel.local_batch_size(batch_size, mesh)
  num_shards = -(-n // shard_size)
  if shard_size % b and num_shards > 1:
    _log.warning("shard_size %d is not a multiple of the per-host batch %d: the last batch "
                   "of every shard is padded.", shard_size, b)

  sharding = parallel.batch_sharding(mesh)
  params = jax.tree.map(
      lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, parallel.replicated(mesh)),
      params)
  probe_stored, probe_inputs = _load(load_fn, [0], b)
  step = jax.jit(parallel.under_mesh(functools.partial(_step, compute_fn,
                                                       frozenset(probe_stored)), mesh),
                 in_shardings=(None, sharding), out_shardings=sharding)
  glob = lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype, sharding=sharding)
  index_b = np.zeros((b,), np.int32)
  out_shapes = jax.eval_shape(step, params, jax.tree.map(glob, {INDEX: index_b, **probe_inputs}))
  full = {**config, "num_examples": n, "shard_size": int(shard_size),
          "record": record_spec(probe_stored, out_shapes)}
  try:  # JSON-normalised (tuples -> lists), so a reread compares equal
    full = json.loads(json.dumps(full))
  except TypeError as e:
    raise ValueError(f"the dataset config must be JSON-serialisable: {e}") from e
  _start_manifest(out_dir, layout, full, num_shards)

  mine, todo = _pending_shards(out_dir, layout, num_shards, sha256_json(full))
  chunks = plan_chunks(todo, shard_size, n, b)
  num_steps = len(chunks)
  if jax.process_count() > 1:  # every host runs the same number of (maybe padding) steps
    num_steps = int(np.max(multihost_utils.process_allgather(np.int64(num_steps))))
  total = sum(hi - lo for lo, hi in (shard_range(s, shard_size, n) for s in mine))
  left = sum(c.stop - c.start for c in chunks)
  _log.info("%s: %d examples in %d shards of %d; this host owns %d shards (%d to do); "
              "%d steps of global batch %d", layout.prefix, n, num_shards, shard_size,
              len(mine), len(todo), num_steps, batch_size)

  from tqdm import tqdm
  bar = tqdm(total=total, initial=total - left, unit=layout.unit, smoothing=0.1,
             desc=f"{layout.prefix} (host {jax.process_index()}/{jax.process_count()})",
             disable=not progress or jax.process_index() != 0)
  sink = _ShardSink(out_dir, layout, num_shards, full, writer_options)

  def write(chunk, stored, out):
    if chunk is not None:
      sink.write(chunk, stored, parallel.global_to_host(out, mesh))
      bar.update(chunk.stop - chunk.start)

  try:
    in_flight = None  # step i+1 is dispatched before step i is written: host and devices overlap
    for i in range(num_steps):
      chunk = chunks[i] if i < len(chunks) else None
      rows = list(range(chunk.start, chunk.stop)) if chunk else []
      index_b = np.zeros((b,), np.int32)
      index_b[:len(rows)] = rows
      stored, inputs = _load(load_fn, rows, b)
      out = step(params, parallel.host_to_global({INDEX: index_b, **inputs}, mesh))
      if in_flight:
        write(*in_flight)
      in_flight = (chunk, stored, out)
    if in_flight:
      write(*in_flight)
  finally:
    sink.abort()
    bar.close()
  return _finish_manifest(out_dir, layout, full, num_shards)
