"""The `latent_cache` stage: every latent the E-LatentLPIPS training stages need, encoded once.

    config.latent_vgg.cache.train / .eval   classification images -> <out>/cache/{train,eval}
    config.latent_vgg.cache.bapps           BAPPS 2AFC train / val -> <out>/cache/bapps_{train,val}

Each is a resumable sharded pass (`data.latents`); a finished cache is checked and kept
without loading the VAE. `paths(config)` is where every E-LatentLPIPS stage reads and writes.
"""

from __future__ import annotations

import os

from d2g_jax import dtypes
from d2g_jax.convert.core import load_json
from d2g_jax.convert.vae import load_vae
from d2g_jax.data import bapps, images, latents, writer
from d2g_jax.data import shards as fmt
from d2g_jax.log import get_logger
from d2g_jax.models.latent_vgg import ENCODERS
from d2g_jax.models.vae import VAEConfig

_log = get_logger(__name__)

BAPPS_SPLITS = ("train", "val")


def paths(config) -> dict[str, str]:
  """Folders and files of the E-LatentLPIPS stages, under config.latent_vgg.out_dir."""
  lv = config.latent_vgg
  out = lv.out_dir
  enc = lv.encoder
  return {
      "out": out,
      "train": os.path.join(out, "cache", "train"),
      "eval": os.path.join(out, "cache", "eval"),
      **{f"bapps_{s}": os.path.join(out, "cache", f"bapps_{s}") for s in BAPPS_SPLITS},
      "classifier": os.path.join(out, "classifier"),      # checkpoints, TensorBoard
      "trunk": os.path.join(out, "trunk"),                # trained trunk, uncalibrated heads
      "calibrate": os.path.join(out, "calibrate"),        # features, checkpoints, TensorBoard
      "official": os.path.join(out, "ckpt"),              # the official package's file layout
      "weights": os.path.join(out, f"{enc}_elatentlpips.safetensors"),  # the calibrated loss
      "vae": lv.vae,
  }


def run_latent_cache(config) -> dict[str, dict]:
  """Encodes the configured sources; returns {name: manifest}."""
  lv, c = config.latent_vgg, config.latent_vgg.cache
  p = paths(config)
  jobs = []
  for name, spec, num in (("train", c.train, c.num_train), ("eval", c.eval, c.num_eval)):
    if spec:
      jobs.append((name, "images", spec, num))
  if c.bapps:
    jobs += [(f"bapps_{s}", "bapps", s, c.num_bapps) for s in BAPPS_SPLITS]
  if not jobs:
    raise ValueError("config.latent_vgg.cache has nothing to encode: set cache.train and "
                     "cache.eval (folder:<root> or tfds:<name>/<split>) and/or cache.bapps "
                     "(a BAPPS root holding 2afc/train and 2afc/val)")
  vae_dtype = dtypes.get(lv.vae_dtype, "config.latent_vgg.vae_dtype")
  vae_cfg = VAEConfig.from_diffusers(load_json(os.path.join(p["vae"], "config.json"),
                                               "VAE config"))
  channels = ENCODERS[lv.encoder][0] if lv.encoder in ENCODERS else None
  if channels != vae_cfg.latent_channels:
    raise ValueError(f"config.latent_vgg.encoder={lv.encoder!r} expects {channels}-channel "
                     f"latents, but the VAE at {p['vae']} makes {vae_cfg.latent_channels}; "
                     f"choose an encoder with {vae_cfg.latent_channels} channels: "
                     f"{ {k: v[0] for k, v in ENCODERS.items()} }")
  meta = latents.vae_meta(p["vae"], vae_cfg, lv.vae_dtype)
  vae = vae_params = None
  results = {}
  for name, kind, spec, num in jobs:
    if kind == "images":
      src = images.open_images(spec, data_dir=c.tfds_data_dir or None, image_key=c.image_key,
                               label_key=c.label_key)
      size = c.image_size
    else:
      src = bapps.TwoAFC(c.bapps, spec)
      size = c.bapps_image_size
    out_dir = p[name]
    _log.info("%s: %s examples from %s -> %s", name, len(src), spec, out_dir)
    expected = latents.cache_config(meta, src, size, num, c.dtype)
    done = writer.existing_manifest(out_dir, fmt.LATENTS, expected)
    if done is not None:
      _log.info("%s: already complete (%s latents)", name, done['num_examples'])
      results[name] = done
      continue
    if vae is None:  # loaded only when there is work
      vae, vae_params = load_vae(p["vae"], dtype=vae_dtype)
    write = latents.write_image_latents if kind == "images" else latents.write_bapps_latents
    m = write(out_dir, src, vae, vae_params, image_size=size, batch_size=c.batch_size,
              shard_size=c.shard_size, meta=meta, num=num, dtype=c.dtype, workers=c.workers)
    _log.info("%s: complete, %s latents (%s), %.1f MiB",
              name, m['num_examples'], m['record'], m['total_bytes'] / 2**20)
    results[name] = m
  return results
