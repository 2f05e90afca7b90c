"""Stable Diffusion 1.5 teacher, the paper's SD-CFG-3 pairs (50-step DDIM, guidance 3).

    python -m d2g_jax.main --config configs/sd15.py \
        --config.teacher.path=/models/stable-diffusion-v1-5 \
        --config.pairs.prompts=/data/coco_captions.txt --config.workdir=/runs/sd15

`teacher.path` is a diffusers pipeline folder on disk (nothing is downloaded).
For SD-CFG-8 add --config.pairs.guidance_scale=8. On GPUs/TPUs use
--config.teacher.dtype=bfloat16 (and --config.teacher.attention=cudnn on NVIDIA GPUs).
"""

from d2g_jax import config_defaults


def get_config():
  config = config_defaults.base()
  config.workdir = "/tmp/d2g_sd15"
  config.stages = "pairs"
  config.pairs.guidance_scale = 3.0
  config.pairs.num_steps = 50
  config.pairs.batch_size = 64
  return config
