"""The `real_latents` stage: real images with captions, encoded once by the teacher's VAE,
for the GDD recipe (`train.recipe = "gdd"`), which trains on real data instead of pairs.

    python -m d2g_jax.main --config configs/gdd_i.py --config.stages=real_latents \
        --config.real.images=tfds:coco_captions/2014/train --config.real.caption_key=captions/text

`config.real.images` is any `data.images` source that yields captions: `captioned:<root>`
(x.png + x.txt), a tfds dataset with `real.caption_key`, or a labelled source (class
folders, a tfds ClassLabel) with `real.caption_template`. Images are resized (shorter side)
and centre-cropped to `real.image_size` (0: the teacher's default resolution), encoded to
the VAE's scaled posterior mean (what the UNet sees), and written to `real.out_dir` as
ArrayRecord shards {"index", "caption", "key", "latent"} by the resumable sharded pass of
`data.latents` (killed and rerun, it continues; finished, it returns at once; another
config into the same folder is refused). The manifest records the VAE folder's
fingerprint, which the train stage checks against the teacher's.
"""

from __future__ import annotations

import os

from d2g_jax import dtypes
from d2g_jax.data import images, latents, writer
from d2g_jax.data import shards as fmt
from d2g_jax.log import get_logger

_log = get_logger(__name__)


def open_source(config):
  """The captioned image source of `config.real`."""
  r = config.real
  if not r.images:
    raise ValueError("config.real.images is empty; give the real images of the GDD recipe: "
                     "captioned:<root> (x.png + x.txt), tfds:<name>/<split> with "
                     "real.caption_key, or folder:<root> (class folders) with "
                     "real.caption_template")
  src = images.open_images(r.images, data_dir=r.tfds_data_dir or None, image_key=r.image_key,
                           label_key=r.label_key, caption_key=r.caption_key,
                           caption_template=r.caption_template)
  if src.target != "caption":
    raise ValueError(f"config.real.images={r.images!r} gives class labels, not captions; the "
                     "generator is text-conditioned: set real.caption_key (the tfds caption "
                     "feature) or real.caption_template (e.g. 'a photo of a {}')")
  return src


def run_real_latents(config) -> dict:
  """The stage: `config.real` images -> latents in `config.real.out_dir`; the manifest."""
  from d2g_jax.convert.vae import load_vae
  from d2g_jax.teacher import load_teacher
  r = config.real
  vae_dtype = dtypes.get(r.vae_dtype, "config.real.vae_dtype")
  teacher = load_teacher(config.teacher.path, components=())  # configs only
  vae_cfg = teacher.info.vae
  vae_dir = os.path.join(config.teacher.path, "vae")
  size = r.image_size or teacher.default_size[0]
  if size % vae_cfg.downscale:
    raise ValueError(f"config.real.image_size={size} must be a multiple of the VAE's downscale "
                     f"factor {vae_cfg.downscale}")
  src = open_source(config)
  meta = latents.vae_meta(vae_dir, vae_cfg, r.vae_dtype)
  out = r.out_dir
  print(f"[real_latents] {len(src)} captioned images from {r.images} -> {size}x{size} px -> "
        f"latents in {out}", flush=True)
  done = writer.existing_manifest(out, fmt.LATENTS,
                                  latents.cache_config(meta, src, size, r.num_examples, r.dtype))
  if done is not None:
    print(f"[real_latents] already complete ({done['num_examples']} latents)")
    return done
  vae, params = load_vae(vae_dir, dtype=vae_dtype)
  m = latents.write_image_latents(out, src, vae, params, image_size=size,
                                  batch_size=r.batch_size, shard_size=r.shard_size, meta=meta,
                                  num=r.num_examples, dtype=r.dtype, workers=r.workers)
  print(f"[real_latents] complete: {m['num_examples']} latents ({m['record']}), "
        f"{m['total_bytes'] / 2**20:.1f} MiB in {out}", flush=True)
  return m
