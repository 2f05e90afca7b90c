"""Latent caches: images -> the VAE posterior mean, scaled as the diffusion model sees
latents -> ArrayRecord shards, in the resumable sharded pass of the pair stage
(`data.writer.write_shards`, layout `shards.LATENTS`).

Legend: B batch, H/W pixels, h/w latent height/width, L latent channels.

Two record layouts:
  images (classification, or captioned for a GAN on real data):
    {"index", "label" (int) or "caption" (str), "key" (file name), "latent" (h x w x L)}
  BAPPS 2AFC triplets (calibration):
    {"index", "distortion", "key", "judge" (float: fraction preferring p1), "ref", "p0", "p1"}

Images are decoded and resized on the host by `workers` threads (Pillow releases the GIL),
while the devices encode the previous batch. The latent of an image is
`vae.config.scale_latents(mean)`: exactly what the diffusion model (and so the loss) sees.
`num` < N picks the evenly spaced examples `i * N // num`, so a small cache still covers
every class of a folder. Re-running with the same config keeps complete shards; a finished
cache returns at once; another config into the same folder is refused.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax import dtypes, files
from d2g_jax.data import shards as fmt
from d2g_jax.data import writer
from d2g_jax.data.images import resize_center_crop
from d2g_jax.models.vae import AutoencoderKL, VAEConfig

PREPROCESS = "RGB; shorter side to image_size (Pillow bicubic, antialiased); central square"
SCALING = "vae.config.scale_latents(posterior mean)"


def select(n: int, num: int) -> list[int]:
  """Source indices of a cache of `num` examples out of n (-1: all): evenly spaced."""
  if num == -1 or num == n:
    return list(range(n))
  if not 1 <= num <= n:
    raise ValueError(f"asked for {num} examples of a source holding {n}; use 1..{n} or -1")
  return [i * n // num for i in range(num)]


def encode_images(vae: AutoencoderKL, params: Any, images_BxHxWx3: jax.Array) -> jax.Array:
  """uint8 RGB images -> scaled latents (fp32) through the VAE posterior mean."""
  x = images_BxHxWx3.astype(jnp.float32) / 127.5 - 1.0
  mean_Bxhxwxl, _ = vae.apply({"params": params}, x.astype(vae.dtype), method=AutoencoderKL.encode)
  return vae.config.scale_latents(mean_Bxhxwxl.astype(jnp.float32))


def encoder_params(params: Any) -> dict:
  """The part of the VAE params `encode` uses (the decoder is not sent to the devices)."""
  return {k: v for k, v in params.items() if k in ("encoder", "quant_conv")}


def vae_meta(vae_path: str, cfg: VAEConfig, dtype: str) -> dict[str, Any]:
  """What identifies the encoder of a cache: the VAE folder's fingerprint, dtype, scaling."""
  return {"path": os.path.abspath(vae_path), "fingerprint": files.fingerprint(vae_path),
          "dtype": dtype, "latent_channels": cfg.latent_channels,
          "downscale": cfg.downscale, "scaling_factor": cfg.scaling_factor,
          "shift_factor": cfg.shift_factor, "latents_mean": cfg.latents_mean,
          "latents_std": cfg.latents_std, "scaling": SCALING}


def cache_config(meta: dict, source, image_size: int, num: int, dtype: str) -> dict[str, Any]:
  """The manifest config of a cache (the writer adds counts, shard size and record layout)."""
  n = len(source)
  config = {"meta": meta, "source": source.description(), "image_size": int(image_size),
            "preprocess": PREPROCESS, "latent_dtype": dtype,
            "selection": "all" if num in (-1, n) else f"i * {n} // {num}"}
  if hasattr(source, "class_names"):
    config["class_names"] = list(source.class_names)
  return config


def _threaded(workers: int) -> Callable[[Callable, Sequence], list]:
  pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 else None
  return (lambda fn, items: list(pool.map(fn, items))) if pool else \
      (lambda fn, items: [fn(i) for i in items])


def _write(out_dir, num, load_one, compute_fn, *, vae_params, config, batch_size,
           shard_size, workers, mesh, progress, image_keys):
  """The pass shared by both layouts: load_one(j) -> (stored dict, {name: uint8 image})."""
  run_many = _threaded(workers)

  def load_fn(indices, rows):
    items = run_many(load_one, indices)
    stored = {k: [it[0][k] for it in items] for k in items[0][0]} if items else {}
    size = config["image_size"]
    imgs = {k: np.stack([it[1][k] for it in items]) if items else
            np.zeros((0, size, size, 3), np.uint8) for k in image_keys}
    return stored, writer.pad_rows(imgs, rows)

  return writer.write_shards(out_dir, num, load_fn, compute_fn, layout=fmt.LATENTS,
                             config=config, batch_size=batch_size, shard_size=shard_size,
                             params=encoder_params(vae_params), mesh=mesh, progress=progress)


def _image_compute(vae: AutoencoderKL, dtype, params, inputs):
  return {"latent": encode_images(vae, params, inputs["image"]).astype(dtype)}


def write_image_latents(out_dir: str, images, vae: AutoencoderKL, vae_params: Any, *,
                        image_size: int, batch_size: int, shard_size: int, meta: dict,
                        num: int = -1, dtype: str = "float32", workers: int = 8,
                        mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> dict:
  """Caches the latents of `images` (an `images.open_images` source) in `out_dir`.

  `meta`: JSON-able description (the VAE: `vae_meta`); with the source's description,
  the class names, size, dtype and selection (`cache_config`) it is the config a resume
  must match.
  Returns the manifest.
  """
  dtypes.get(dtype, "the stored latents' dtype", dtypes.STORAGE)
  sel = select(len(images), num)
  target = images.target  # "label" or "caption"

  def load_one(j):
    image, value, key = images.item(sel[j])
    return {target: value, "key": key}, {"image": resize_center_crop(image, image_size)}

  config = cache_config(meta, images, image_size, num, dtype)
  return _write(out_dir, len(sel), load_one,
                functools.partial(_image_compute, vae, jnp.dtype(dtype)),
                vae_params=vae_params, config=config, batch_size=batch_size,
                shard_size=shard_size, workers=workers, mesh=mesh, progress=progress,
                image_keys=("image",))


def _triplet_compute(vae: AutoencoderKL, dtype, params, inputs):
  b = inputs["ref"].shape[0]
  both = jnp.concatenate([inputs["ref"], inputs["p0"], inputs["p1"]])  # one VAE call of 3B
  lat = encode_images(vae, params, both).astype(dtype)
  return {"ref": lat[:b], "p0": lat[b:2 * b], "p1": lat[2 * b:]}


def write_bapps_latents(out_dir: str, triplets, vae: AutoencoderKL, vae_params: Any, *,
                        image_size: int, batch_size: int, shard_size: int, meta: dict,
                        num: int = -1, dtype: str = "float32", workers: int = 8,
                        mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> dict:
  """Caches the latents of BAPPS 2AFC `triplets` (`bapps.TwoAFC`) in `out_dir`."""
  dtypes.get(dtype, "the stored latents' dtype", dtypes.STORAGE)
  sel = select(len(triplets), num)

  def load_one(j):
    ref, p0, p1, judge, dist, key = triplets.item(sel[j])
    crop = functools.partial(resize_center_crop, size=image_size)
    return ({"distortion": dist, "key": key, "judge": judge},
            {"ref": crop(ref), "p0": crop(p0), "p1": crop(p1)})

  config = cache_config(meta, triplets, image_size, num, dtype)
  return _write(out_dir, len(sel), load_one,
                functools.partial(_triplet_compute, vae, jnp.dtype(dtype)),
                vae_params=vae_params, config=config, batch_size=batch_size,
                shard_size=shard_size, workers=workers, mesh=mesh, progress=progress,
                image_keys=("ref", "p0", "p1"))
