"""Prompts and seeds (or noise) -> images and latents, from a student or a teacher folder.

Legend: B batch, H/W image height/width, h/w/C latent height/width/channels.

    student = load_student("/runs/sd15/export")            # or a training workdir
    out = student(["a photo of a cat", "a red car"], seeds=[0, 1])
    out.images        # uint8 BxHxWx3
    out.latents       # float32 BxhxwxC: the latents the VAE decoded
    teacher = load_teacher_sampler("/models/sd15", num_steps=50, guidance_scale=3.0)
    ref = teacher(["a photo of a cat", "a red car"], seeds=[0, 1])   # the same noise

`load_student(path)` reads either an exported diffusers folder (the `export` stage's output:
the UNet once at the one-step scheduler's timestep) or a training workdir (its
`run_config.json` names the teacher folder and the checkpoints; the EMA weights of the latest
checkpoint by default). `load_teacher_sampler(path)` is a diffusers pipeline folder sampled
with DDIM and classifier-free guidance, as the pairs stage samples it. Both are the eval
stage's samplers (`d2g_jax.evaluate.samplers`) wrapped in an `ImageSampler`:

  - the noise of seed s is `data.pairs.pair_noise(s, 0, latent_shape)`, whatever the batch,
    so one seed gives one image, alone or among others, from any sampler of the same latent
    shape; or pass the noise itself (`noise=`, BxhxwxC, what diffusers takes as `latents=` in
    NHWC);
  - prompts are tokenised on the host; text encoders, UNet(s) and VAE decoder run in one jitted
    function, compiled once per batch size (ahead of time, so a call's `seconds` never
    includes compiling: that is `compile_seconds`);
  - a call of B images runs in chunks of at most `batch_size`, each padded to a multiple of
    the number of devices and split over them (`d2g_jax.parallel`: a data-parallel mesh of this
    process's devices), the parameters replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax import dtypes, parallel, student
from d2g_jax.data.pairs import pair_noise
from d2g_jax.data.teacher_pairs import latent_shape as latent_shape_of
from d2g_jax.evaluate import samplers
from d2g_jax.teacher import Teacher

DEFAULT_BATCH = 8           # images per compiled call at most
DEFAULT_GUIDANCE = 3.0      # the teacher's CFG scale by default: the pairs stage's (SD-CFG-3)
DEFAULT_TEACHER_STEPS = 50  # the teacher's DDIM steps by default: the pairs stage's
MAX_SEED = 2 ** 31          # seeds are in [0, MAX_SEED)


@dataclasses.dataclass(frozen=True)
class Samples:
  """What a call of an `ImageSampler` returns (rows in the order of the prompts)."""
  prompts: list[str]
  seeds: list[int] | None     # None when the noise was given
  images: np.ndarray          # uint8 BxHxWx3, as diffusers writes images
  latents: np.ndarray         # float32 BxhxwxC, the sampler's output before the VAE
  seconds: float              # wall time of the call, tokenising and copying back included
  compile_seconds: float      # compiling batch sizes this sampler had not run yet (else 0)

  @property
  def images_per_second(self) -> float:
    return len(self.images) / self.seconds if self.seconds > 0 else float("inf")


def seed_noise(seeds: Sequence[int], latent_shape: Sequence[int]) -> np.ndarray:
  """float32 BxhxwxC: row i is `pair_noise(seeds[i], 0, latent_shape)`."""
  bad = [s for s in seeds if not 0 <= int(s) < MAX_SEED]
  if bad:
    raise ValueError(f"seeds {bad[:5]} are out of range; seeds are integers in [0, {MAX_SEED})")
  return np.asarray(_seed_noise(jnp.asarray([int(s) for s in seeds], jnp.int32),
                                tuple(int(d) for d in latent_shape)))


@functools.partial(jax.jit, static_argnums=1)
def _seed_noise(seeds_B: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
  return jax.vmap(lambda s: pair_noise(s, 0, latent_shape))(seeds_B)


class ImageSampler:
  """A `samplers.Sampler` (latents from noise and tokens) with its VAE, jitted and sharded:
  `sampler(prompts, seeds=...)` or `sampler(prompts, noise=...)` -> `Samples`.

  One prompt goes with every seed (or noise row); otherwise give one prompt per row.
  `name` and `meta` say what it samples (meta is the eval stage's description: path,
  fingerprint, steps, guidance...).
  """

  def __init__(self, sampler: samplers.Sampler, name: str, batch_size: int = DEFAULT_BATCH,
               devices: Sequence[jax.Device] | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}; expected at least 1")
    self.sampler, self.name, self.meta = sampler, name, sampler.meta
    self.latent_shape = tuple(sampler.latent_shape)
    self.batch_size = batch_size
    self.mesh = parallel.make_mesh(devices=list(devices or jax.local_devices()))
    params = {"sampler": sampler.params, "vae": sampler.teacher.vae_params}
    self.params = jax.device_put(params, parallel.replicated(self.mesh))
    self._jit = jax.jit(parallel.under_mesh(self._sample, self.mesh))
    self._compiled = {}  # chunk size -> compiled executable

  def _sample(self, params, z_BxhxwxC, tokens):
    x_BxhxwxC = self.sampler.generate_fn(params["sampler"], z_BxhxwxC, tokens)["x"]
    pixels = samplers.decode_pixels(self.sampler, params["vae"], x_BxhxwxC)
    return {"latents": x_BxhxwxC.astype(jnp.float32), "images": pixels.astype(jnp.uint8)}

  def chunk_size(self, n: int) -> int:
    """Rows per compiled call for a request of n images: min(n, batch_size), rounded up to a
    multiple of the devices (the padding rows are computed and dropped)."""
    div = parallel.batch_size_divisor(self.mesh)
    rows = min(n, self.batch_size)
    return -(-rows // div) * div

  def _inputs(self, prompts: list[str], z_BxhxwxC: np.ndarray, rows: int):
    pad = rows - len(prompts)
    prompts = prompts + prompts[-1:] * pad
    z = np.concatenate([z_BxhxwxC, np.zeros((pad,) + self.latent_shape, np.float32)])
    return parallel.host_to_global((z, self.sampler.encode_fn(prompts)), self.mesh)

  def compile(self, n: int) -> float:
    """Compiles the call for requests of n images (if not done yet); returns the seconds it
    took (0 when already compiled)."""
    rows = self.chunk_size(n)
    if rows in self._compiled:
      return 0.0
    t0 = time.perf_counter()
    z, tokens = self._inputs([""], np.zeros((1,) + self.latent_shape, np.float32), rows)
    self._compiled[rows] = self._jit.lower(self.params, z, tokens).compile()
    return time.perf_counter() - t0

  def noise(self, seeds: Sequence[int]) -> np.ndarray:
    return seed_noise(seeds, self.latent_shape)

  def __call__(self, prompts: str | Sequence[str], seeds: Sequence[int] | None = None,
               noise: np.ndarray | None = None) -> Samples:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if (seeds is None) == (noise is None):
      raise ValueError("give either seeds (one per image) or noise (BxhxwxC), not both or neither")
    if noise is not None:
      z = np.asarray(noise, np.float32)
      if z.ndim != 4 or z.shape[1:] != self.latent_shape:
        raise ValueError(f"noise of shape {z.shape}; {self.name} ({self.meta.get('path', '')}) "
                         f"takes Bx{'x'.join(map(str, self.latent_shape))} latents")
    else:
      seeds = [int(s) for s in seeds]
      z = self.noise(seeds)
    n = len(z)
    if len(prompts) == 1:
      prompts = prompts * n
    if n == 0 or len(prompts) != n:
      raise ValueError(f"{len(prompts)} prompts for {n} images; give one prompt, or one per "
                       "image (and at least one image)")
    compile_seconds = self.compile(n)
    rows = self.chunk_size(n)
    t0 = time.perf_counter()
    outs = []
    for a in range(0, n, rows):
      b = min(a + rows, n)
      z_chunk, tokens = self._inputs(prompts[a:b], z[a:b], rows)
      out = jax.device_get(self._compiled[rows](self.params, z_chunk, tokens))
      outs.append({k: v[:b - a] for k, v in out.items()})
    seconds = time.perf_counter() - t0
    return Samples(prompts, seeds, np.concatenate([o["images"] for o in outs]),
                   np.concatenate([o["latents"] for o in outs]), seconds, compile_seconds)


# ------------------------------------------------------------------ loading
def _folder(path: str, dtype: str, attention: str) -> Teacher:
  dt = dtypes.get(dtype, "dtype")
  return samplers.load_folder(path, dt, attention)


def is_exported_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "model_index.json"))


def load_student(path: str, *, weights: str = "ema", step: int | None = None,
                 dtype: str = "float32", attention: str = "auto", height: int | None = None,
                 width: int | None = None, batch_size: int = DEFAULT_BATCH,
                 devices: Sequence[jax.Device] | None = None) -> ImageSampler:
  """The student at `path`: an exported diffusers folder (model_index.json), or a training
  workdir (run_config.json; `weights` ema | generator of checkpoint `step`, default the
  latest). `height` / `width` in pixels (default: the folder's); `dtype` the compute and
  parameter dtype."""
  if is_exported_folder(path):
    if weights != "ema" or step is not None:
      raise ValueError(f"{path} is an exported folder: it holds one set of weights; weights= and "
                       "step= choose a checkpoint of a training workdir")
    folder = _folder(path, dtype, attention)
    shape = latent_shape_of(folder, height, width)
    try:
      sampler = samplers.folder_one_step_sampler(path, folder, shape)
    except ValueError as e:
      raise ValueError(f"{e} Here: give that folder as the teacher (--teacher, "
                       "load_teacher_sampler), and the student's exported folder or workdir as "
                       "the model.") from e
    return ImageSampler(sampler, "student", batch_size, devices)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"student {path!r} does not exist; give an exported pipeline folder "
                            "(the export stage's export.out_dir) or a training workdir")
  if not os.path.isfile(os.path.join(path, "run_config.json")):
    raise FileNotFoundError(f"{path!r} is neither an exported pipeline folder (no "
                            "model_index.json) nor a training workdir (no run_config.json); "
                            "give the export stage's export.out_dir or the run's workdir")
  config = student.workdir_config(path)
  teacher = _folder(config.teacher.path, dtype, attention)
  shape = latent_shape_of(teacher, height, width)
  sampler = samplers.trained_sampler(config, teacher, config.train.checkpoint_dir, shape,
                                     weights, step)
  return ImageSampler(sampler, "student", batch_size, devices)


def load_teacher_sampler(path: str, *, num_steps: int = DEFAULT_TEACHER_STEPS,
                         guidance_scale: float = DEFAULT_GUIDANCE, negative_prompt: str = "",
                         dtype: str = "float32", attention: str = "auto",
                         height: int | None = None, width: int | None = None,
                         batch_size: int = DEFAULT_BATCH,
                         devices: Sequence[jax.Device] | None = None) -> ImageSampler:
  """The diffusers pipeline folder at `path` sampled with `num_steps` DDIM steps (eta 0) and
  classifier-free guidance `guidance_scale` (the pairs stage's teacher)."""
  folder = _folder(path, dtype, attention)
  shape = latent_shape_of(folder, height, width)
  sampler = samplers.folder_ddim_sampler(path, folder, shape, num_steps=num_steps,
                                         guidance_scale=guidance_scale,
                                         negative_prompt=negative_prompt)
  return ImageSampler(sampler, "teacher", batch_size, devices)
