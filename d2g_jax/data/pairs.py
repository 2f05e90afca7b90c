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
into the same folder is refused. The sharded, resumable pass itself is
`data.writer.write_shards`, shared with the latent caches.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.data import shards as fmt
from d2g_jax.data import writer
from d2g_jax.data.writer import Chunk, owned_shards, plan_chunks, shard_range  # noqa: F401

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


def prompts_sha256(prompts: Sequence[str]) -> str:
  h = hashlib.sha256()
  for p in prompts:
    b = p.encode("utf-8")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  return h.hexdigest()


# ------------------------------------------------------------------ stage
def _step(generate_fn: GenerateFn, seed: int, latent_shape: tuple[int, ...], store_noise: bool,
          params: Any, inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
  cond = {k: v for k, v in inputs.items() if k != "index"}
  z_BxHxWxC = batch_noise(seed, inputs["index"], latent_shape)
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
      evaluation samples, where z would only take space).

  Returns:
    The final manifest (also written to out_dir/manifest.json).
  """
  prompts = list(prompts)
  if not prompts:
    raise ValueError("no prompts: the prompt source is empty")
  latent_shape = tuple(int(d) for d in latent_shape)

  def load_fn(indices: list[int], rows: int):
    # Padding rows get the empty prompt, so encode_fn always sees full batches.
    texts = [prompts[j] for j in indices] + [""] * (rows - len(indices))
    cond = _encode(encode_fn, texts)
    stored = {"seed": [int(seed)] * len(indices), "prompt": texts[:len(indices)],
              **{k: v[:len(indices)] for k, v in cond.items()}}
    return stored, cond

  config = {"meta": dict(manifest_meta), "seed": int(seed), "latent_shape": list(latent_shape),
            "noise": NOISE, "prng_impl": str(jax.config.jax_default_prng_impl),
            "prompts_sha256": prompts_sha256(prompts)}
  return writer.write_shards(
      out_dir, len(prompts), load_fn,
      functools.partial(_step, generate_fn, seed, latent_shape, store_noise),
      layout=fmt.PAIRS, config=config, batch_size=batch_size, shard_size=shard_size,
      params=params, mesh=mesh, progress=progress, writer_options=writer_options)
