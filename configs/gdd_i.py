"""Stable Diffusion 1.5 -> one-step generator by GDD-I: a GAN on real images, most convolutions frozen.

    python -m d2g_jax.main --config configs/gdd_i.py \
        --config.teacher.path=/models/stable-diffusion-v1-5 \
        --config.real.images=tfds:coco_captions/2014/train --config.real.tfds_data_dir=/data/tfds \
        --config.workdir=/runs/sd15_gdd_i

"Diffusion Models Are Innate One-Step Generators" (GDD / GDD-I, arXiv 2405.20750): no
teacher pairs and no regression loss. The real images are encoded once by the teacher's
VAE (stage `real_latents`; `captioned:<root>` folders of x.png + x.txt work too), then the
generator (the teacher's UNet at t = 999) is trained against the Diffusion2GAN
discriminator with the non-saturating GAN loss alone, the UNet's convolutions, attention
output projections and feed-forward layers frozen (`train.g_frozen = "gdd_i"`: 86% of SD
1.5's weights, no optimiser state for them). Optimiser settings: the GDD authors' ImageNet
64x64 runs (`config_defaults.gdd`). Variants:

  configs/gdd_i.py:gdd        the same without freezing (GDD)
  configs/gdd_i.py:demo       GDD-I on the digits demo (configs/demo.py): its teacher, its
                              training length, batch and learning rates, so that the numbers
                              compare with the demo's Diffusion2GAN run; run configs/demo.py first
  configs/gdd_i.py:demo_gdd   GDD on the digits demo

Stages: real_latents, train, export (each resumes; `--config.stages=train` runs one).
"""

import importlib.util
import os

from d2g_jax import config_defaults

HERE = os.path.dirname(os.path.abspath(__file__))


def _demo_config():
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(HERE, "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def demo(innate: bool):
  """The digits demo's teacher and training budget, trained by GDD(-I) on the real digits, and
  judged by the demo's report (demo_report: accuracy, diversity, distance to the teacher)."""
  base = _demo_config()
  config = config_defaults.gdd(config_defaults.base(), innate=innate)
  config.workdir = os.path.join(base.workdir, "gdd_i" if innate else "gdd")
  config.stages = "real_latents,train,export,demo_report"
  places = config_defaults.substitute(base)  # the demo's places, not ours
  config.teacher.path = places.teacher.path
  # The demo's training digits as class folders 0..9 (its stage digits_lpips_data writes
  # <digits.dir>/perceptual_data/train; the 300 held-out digits are not among them),
  # captioned with the demo's prompt.
  digits_dir = places.digits.dir
  config.real.images = "folder:" + os.path.join(digits_dir, "perceptual_data", "train")
  config.real.caption_template = base.digits.prompt
  config.real.batch_size = 64
  config.real.shard_size = 1024
  config.real.workers = 2
  for key in ("num_steps", "batch_size", "g_lr", "d_lr", "warmup_steps", "checkpoint_every",
              "log_every", "sample_every", "num_samples", "ema_decay"):
    config.train[key] = base.train[key]
  # What demo_report reads: the digits data and judge, its noises, the teacher's sampler
  # settings (its 50-step reference) and E-LatentLPIPS (the distance), all the demo's.
  config.digits = base.digits
  config.digits.dir = digits_dir
  config.demo = base.demo
  config.pairs.guidance_scale = base.pairs.guidance_scale
  config.pairs.num_steps = base.pairs.num_steps
  config.loss = base.loss
  config.loss.weights = places.loss.weights
  config.compilation_cache_dir = places.compilation_cache_dir
  return config


def get_config(arg: str | None = None):
  if arg in ("demo", "demo_gdd"):
    return demo(innate=arg == "demo")
  if arg not in (None, "gdd_i", "gdd"):
    raise ValueError(f"configs/gdd_i.py:{arg}: expected no variant, gdd, demo or demo_gdd")
  config = config_defaults.gdd(config_defaults.base(), innate=arg != "gdd")
  config.workdir = "/tmp/d2g_sd15_gdd_i" if arg != "gdd" else "/tmp/d2g_sd15_gdd"
  config.stages = "real_latents,train,export"
  config.real.caption_key = "captions/text"  # tfds coco_captions: the first of five captions
  config.real.batch_size = 64
  config.teacher.dtype = "bfloat16"
  config.mesh.data = -1
  config.mesh.fsdp = 8
  config.train.dtype = "bfloat16"
  config.train.checkpoint_every = 1000
  config.train.sample_every = 1000
  return config
