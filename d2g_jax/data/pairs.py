"""The pair stage: (z, c, x) triples from a teacher, over every device and host, resumable.

Legend: B global batch, b = B / hosts (this host's rows), H/W/C latent.

For prompt i (0 <= i < N) the noise is `pair_noise(seed, i, latent_shape)`, so any pair
can be regenerated alone; the teacher runs on the whole mesh, the batch split over
its `data` axis. Shard s holds pairs [s*S, (s+1)*S) and is written by host
s % process_count. Batches never straddle shards, so a shard is always computed
from the same batches, whether or not the run was interrupted: resumed runs give
the same bits as uninterrupted ones (same command, same devices).

Killed at any moment (SIGKILL included) and started again with the same command,
`generate_pairs` keeps the shards whose sidecar exists, discards unfinished temp
files and regenerates only the missing shards; no pair is lost or repeated. A run
with a different config (teacher, guidance, steps, seed, prompts, record layout)
into the same folder is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from d2g_jax import log, parallel
from d2g_jax.data import shards as fmt

logger = log.get_logger(__name__)

# generate_fn(params, z_BxHxWxC, cond) -> {"x": x_BxHxWxC, ...}: traceable, every output
# batched on axis 0; jitted once by the stage with the batch split over the mesh.
GenerateFn = Callable[[Any, jax.Array, dict[str, jax.Array]], dict[str, jax.Array]]
# encode_fn(prompts) -> {name: array_bx...}: host-side (a tokenizer, say), fixed shapes.
EncodeFn = Callable[[list[str]], Mapping[str, np.ndarray]]

RESERVED_KEYS = ("index", "seed", "prompt", "z")
NOISE = "jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), latent_shape, float32)"


# ------------------------------------------------------------------ noise
def pair_noise(seed: int, index, latent_shape: Sequence[int]) -> jax.Array:
  """The initial noise z_HxWxC of pair `index`; the same bits inside or outside a batch."""
  key = jax.random.fold_in(jax.random.key(seed), index)
  return jax.random.normal(key, tuple(latent_shape), jnp.float32)


def batch_noise(seed: int, index_B: jax.Array, latent_shape: Sequence[int]) -> jax.Array:
  return jax.vmap(lambda i: pair_noise(seed, i, latent_shape))(index_B)


# --------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True)
class Chunk:
  """One host-local batch: pairs [start, stop) of `shard`."""
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


# ----------------------------------------------------------------- config
def prompts_sha256(prompts: Sequence[str]) -> str:
  h = hashlib.sha256()
  for p in prompts:
    b = p.encode("utf-8")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  return h.hexdigest()


def _sha256_json(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _check_config(path: str, found: Mapping[str, Any], expected: Mapping[str, Any]):
  """Raises ValueError listing every differing key unless the two configs are equal."""
  if _sha256_json(found) == _sha256_json(expected):
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


# ------------------------------------------------------------------ stage
def _step(generate_fn: GenerateFn, seed: int, latent_shape: tuple[int, ...], store_noise: bool,
          params: Any, index_B: jax.Array, cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
  z_BxHxWxC = batch_noise(seed, index_B, latent_shape)
  out = dict(generate_fn(params, z_BxHxWxC, cond))
  clash = set(out) & (set(RESERVED_KEYS) | set(cond))
  if clash:
    raise ValueError(f"generate_fn outputs {sorted(clash)}, which clash with the reserved keys "
                     f"{RESERVED_KEYS} or encode_fn's {sorted(cond)}")
  return {"z": z_BxHxWxC, **out} if store_noise else out


def _encode(encode_fn: EncodeFn | None, prompts: list[str]) -> dict[str, np.ndarray]:
  if encode_fn is None:
    return {}
  cond = {k: np.asarray(v) for k, v in encode_fn(prompts).items()}
  for k, v in cond.items():
    if v.ndim == 0 or v.shape[0] != len(prompts):
      raise ValueError(f"encode_fn output {k!r} has shape {v.shape}; expected {len(prompts)} "
                       "rows, one per prompt")
  bad = set(cond) & set(RESERVED_KEYS)
  if bad:
    raise ValueError(f"encode_fn outputs {sorted(bad)}, which are reserved record keys")
  return cond


def _record_spec(out: Mapping[str, Any], cond: Mapping[str, Any]) -> dict[str, str]:
  """{key: "dtype[shape]"} of one record's arrays (the batch axis dropped)."""
  spec = {"index": "int", "seed": "int", "prompt": "str"}
  for k, v in {**cond, **out}.items():
    spec[k] = f"{np.dtype(v.dtype).name}{list(v.shape[1:])}"
  return spec


def _barrier(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _start_manifest(out_dir: str, config: dict, num_shards: int) -> dict:
  """Checks the folder against this run's config; process 0 writes the first manifest."""
  path = os.path.join(out_dir, fmt.MANIFEST)
  if os.path.exists(path):  # every host checks, so every host fails alike
    _check_config(path, fmt.read_manifest(out_dir)["config"], config)
  if os.path.isdir(out_dir):
    suffix = fmt.shard_name(0, num_shards).split("-of-")[1].split(".")[0]
    foreign = sorted(f for f in os.listdir(out_dir) if f.startswith("pairs-")
                     and f.split("-of-")[-1].split(".")[0] != suffix)
    if foreign:
      raise fmt.ShardError(f"{out_dir} holds shards of another run ({', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}; this run writes "
                           f"{num_shards} shards). Use another output folder.")
  if jax.process_index() == 0 and not os.path.exists(path):
    os.makedirs(out_dir, exist_ok=True)
    fmt.write_json(_manifest(config, num_shards, "in_progress", []), path)
  _barrier("d2g_pairs_manifest")
  manifest = fmt.read_manifest(out_dir)
  _check_config(path, manifest["config"], config)
  return manifest


def _manifest(config: dict, num_shards: int, status: str, shard_infos: list[dict]) -> dict:
  return {
      "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION, "status": status,
      "config": config, "config_sha256": _sha256_json(config),
      "num_examples": config["num_examples"], "shard_size": config["shard_size"],
      "num_shards": num_shards, "record": config["record"],
      "total_bytes": sum(s["bytes"] for s in shard_infos), "shards": shard_infos,
  }


def _completed(out_dir: str, shard: int, num_shards: int, config_sha: str) -> dict | None:
  """A shard's sidecar if the shard is complete (size checked), else None."""
  info = fmt.read_sidecar(out_dir, shard, num_shards)
  if info is None:
    return None
  side = os.path.join(out_dir, fmt.sidecar_name(shard, num_shards))
  if info.get("config_sha256") != config_sha:
    raise fmt.ShardError(f"{side} belongs to a run with another config (config_sha256 "
                         f"{info.get('config_sha256')}, this run {config_sha}). Use another "
                         "output folder, or delete the folder's pairs-* files.")
  fmt.check_shard(out_dir, info, "size")
  return info


def _pending_shards(out_dir: str, num_shards: int, config_sha: str) -> tuple[list[int], list[int]]:
  """(this host's shards, those not complete); removes their unfinished temp files."""
  mine = owned_shards(num_shards, jax.process_index(), jax.process_count())
  stems = {fmt.shard_name(s, num_shards).split(".")[0] for s in mine}
  for f in os.listdir(out_dir):  # .pairs-SSSSS-of-NNNNN.array_record.tmp, .pairs-...json.*.tmp
    if f.startswith(".pairs-") and f.endswith(".tmp") and f[1:].split(".")[0] in stems:
      os.remove(os.path.join(out_dir, f))
  return mine, [s for s in mine if _completed(out_dir, s, num_shards, config_sha) is None]


def _finish_manifest(out_dir: str, config: dict, num_shards: int) -> dict:
  """Process 0 lists every shard (all must be complete) in the final manifest."""
  _barrier("d2g_pairs_done")
  if jax.process_index() == 0:
    config_sha = _sha256_json(config)
    infos, missing = [], []
    for s in range(num_shards):
      info = _completed(out_dir, s, num_shards, config_sha)
      if info is None:
        missing.append(fmt.shard_name(s, num_shards))
      else:
        infos.append({k: info[k] for k in ("shard", "name", "first_index", "num_records",
                                           "bytes", "sha256")})
    if missing:
      raise fmt.ShardError(f"{out_dir}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} "
                           f"({len(missing)} in all) are not complete; with several hosts, "
                           "out_dir must be one folder that every host sees")
    fmt.write_json(_manifest(config, num_shards, "complete", infos),
                   os.path.join(out_dir, fmt.MANIFEST))
  _barrier("d2g_pairs_manifest_final")
  return fmt.read_manifest(out_dir)


class _ShardSink:
  """Appends finished rows to their shards; a full shard is committed, then its sidecar."""

  def __init__(self, out_dir: str, num_shards: int, config: dict, writer_options: str):
    self.out_dir, self.num_shards, self.options = out_dir, num_shards, writer_options
    self.n, self.shard_size, self.seed = (config["num_examples"], config["shard_size"],
                                          config["seed"])
    self.config_sha = _sha256_json(config)
    self.writers: dict[int, fmt.ShardWriter] = {}

  def write(self, chunk: Chunk, texts: list[str], cond: Mapping[str, np.ndarray],
            out: Mapping[str, np.ndarray]):
    s = chunk.shard
    if s not in self.writers:
      self.writers[s] = fmt.ShardWriter(self.out_dir, fmt.shard_name(s, self.num_shards),
                                        self.options)
    w = self.writers[s]
    for r in range(chunk.stop - chunk.start):
      record = {"index": chunk.start + r, "seed": self.seed, "prompt": texts[r]}
      record.update({k: v[r] for k, v in cond.items()})
      record.update({k: v[r] for k, v in out.items()})
      w.write(fmt.encode_record(record))
    lo, hi = shard_range(s, self.shard_size, self.n)
    if w.num_records == hi - lo:
      info = {"shard": s, "first_index": lo, **self.writers.pop(s).commit(),
              "config_sha256": self.config_sha, "host": jax.process_index()}
      fmt.write_json(info, os.path.join(self.out_dir, fmt.sidecar_name(s, self.num_shards)))

  def abort(self):
    """Drops unfinished shards' temp files (a kill leaves them; the next run removes them)."""
    for w in self.writers.values():
      w.abort()


def generate_pairs(out_dir: str, prompts: Sequence[str], generate_fn: GenerateFn, *,
                   latent_shape: Sequence[int], seed: int, batch_size: int,
                   shard_size: int = 1024, manifest_meta: Mapping[str, Any],
                   params: Any = None, encode_fn: EncodeFn | None = None,
                   mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                   writer_options: str = fmt.WRITER_OPTIONS, store_noise: bool = True) -> dict:
  """Generates pair i for every prompt i into ArrayRecord shards in `out_dir`; resumable.

  Args:
    out_dir: the dataset folder (shared by all hosts).
    prompts: every prompt, the same list on every host; pair i uses prompts[i].
    generate_fn: `(params, z_BxHxWxC, cond) -> {"x": ..., ...}`, e.g. text encoder plus
      50-step DDIM with CFG; every output is stored per pair under its key.
    latent_shape: (H, W, C) of z.
    seed: noise seed; z of pair i is `pair_noise(seed, i, latent_shape)`.
    batch_size: global batch, a multiple of the batch devices and of the hosts.
    shard_size: pairs per shard; best a multiple of batch_size / hosts (else the last
      batch of each shard is padded, wasted work).
    manifest_meta: JSON-able description of the data (teacher, guidance, steps,
      resolution, ...). Every key is part of the config a resume must match.
    params: pytree passed to generate_fn (leaves not yet on devices are replicated).
    encode_fn: `(prompts) -> {name: array_bx...}` on the host (e.g. token ids); the
      arrays are passed to generate_fn as `cond` and stored in each record.
    mesh: defaults to `parallel.make_mesh()` (all devices on `data`).
    progress: tqdm bar (pairs/s, time left) on process 0.
    writer_options: ArrayRecord writer options (must keep `group_size:1`).
    store_noise: store z in each record (False: it is `pair_noise(seed, index)`, e.g. for
      evaluation samples, where only the outputs are needed).

  Returns:
    The final manifest (also written to out_dir/manifest.json).
  """
  prompts = list(prompts)
  n = len(prompts)
  if n == 0:
    raise ValueError("no prompts: the prompt source is empty")
  if shard_size < 1 or batch_size < 1:
    raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be positive")
  if "group_size:1" not in writer_options.replace(" ", "").split(","):
    raise ValueError(f"writer_options {writer_options!r} must contain group_size:1 "
                     "(grain reads records at random)")
  latent_shape = tuple(int(d) for d in latent_shape)
  mesh = mesh or parallel.make_mesh()
  b = parallel.local_batch_size(batch_size, mesh)
  num_shards = -(-n // shard_size)
  if shard_size % b and num_shards > 1:
    logger.warning("shard_size %d is not a multiple of the per-host batch %d: the last batch "
                   "of every shard is padded.", shard_size, b)

  # One jit for the whole step; z is drawn on the devices from the pair indices.
  sharding = parallel.batch_sharding(mesh)
  params = jax.tree.map(
      lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, parallel.replicated(mesh)),
      params)
  step = jax.jit(parallel.under_mesh(functools.partial(_step, generate_fn, seed, latent_shape,
                                                       store_noise), mesh),
                 in_shardings=(None, sharding, sharding), out_shardings=sharding)

  probe_cond = _encode(encode_fn, [prompts[0]] * b)
  glob = lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype, sharding=sharding)
  out_shapes = jax.eval_shape(step, params, glob(np.zeros((b,), np.int32)),
                              jax.tree.map(glob, probe_cond))
  config = {
      "meta": dict(manifest_meta), "seed": int(seed), "num_examples": n,
      "shard_size": int(shard_size), "latent_shape": list(latent_shape), "noise": NOISE,
      "prng_impl": str(jax.config.jax_default_prng_impl),
      "prompts_sha256": prompts_sha256(prompts), "record": _record_spec(out_shapes, probe_cond),
  }
  try:  # JSON-normalised (tuples -> lists), so a reread compares equal
    config = json.loads(json.dumps(config))
  except TypeError as e:
    raise ValueError(f"manifest_meta must be JSON-serialisable: {e}") from e
  _start_manifest(out_dir, config, num_shards)

  mine, todo = _pending_shards(out_dir, num_shards, _sha256_json(config))
  chunks = plan_chunks(todo, shard_size, n, b)
  num_steps = len(chunks)
  if jax.process_count() > 1:  # every host runs the same number of (maybe padding) steps
    num_steps = int(np.max(multihost_utils.process_allgather(np.int64(num_steps))))
  total = sum(hi - lo for lo, hi in (shard_range(s, shard_size, n) for s in mine))
  left = sum(c.stop - c.start for c in chunks)
  logger.info("%d prompts in %d shards of %d; this host owns %d shards (%d to do); "
              "%d steps of global batch %d", n, num_shards, shard_size, len(mine), len(todo),
              num_steps, batch_size)

  from tqdm import tqdm
  bar = tqdm(total=total, initial=total - left, unit="pair", smoothing=0.1,
             desc=f"pairs (host {jax.process_index()}/{jax.process_count()})",
             disable=not progress or jax.process_index() != 0)
  sink = _ShardSink(out_dir, num_shards, config, writer_options)

  def write(chunk, texts, cond, out):
    if chunk is not None:
      sink.write(chunk, texts, cond, parallel.global_to_host(out, mesh))
      bar.update(chunk.stop - chunk.start)

  try:
    in_flight = None  # step i+1 is dispatched before step i is written: host and devices overlap
    for i in range(num_steps):
      chunk = chunks[i] if i < len(chunks) else None
      rows = range(chunk.start, chunk.stop) if chunk else range(0)
      index_b = np.zeros((b,), np.int32)
      index_b[:len(rows)] = rows
      texts = [prompts[j] for j in rows] + [""] * (b - len(rows))
      cond = _encode(encode_fn, texts)
      out = step(params, parallel.host_to_global(index_b, mesh),
                 parallel.host_to_global(cond, mesh))
      if in_flight:
        write(*in_flight)
      in_flight = (chunk, texts, cond, out)
    if in_flight:
      write(*in_flight)
  finally:
    sink.abort()
    bar.close()
  return _finish_manifest(out_dir, config, num_shards)
