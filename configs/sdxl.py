"""SDXL-base teacher at 1024 px (50-step DDIM, guidance 3).

    python -m d2g_jax.main --config configs/sdxl.py \
        --config.teacher.path=/models/stable-diffusion-xl-base-1.0 \
        --config.pairs.prompts=/data/prompts.jsonl --config.workdir=/runs/sdxl

`teacher.path` is a diffusers pipeline folder on disk (nothing is downloaded). SDXL's
two text encoders, pooled embeddings and size micro-conditioning are handled by the
teacher. Use --config.teacher.dtype=bfloat16 on accelerators.
"""

from d2g_jax import config_defaults


def get_config():
  config = config_defaults.base()
  config.workdir = "/tmp/d2g_sdxl"
  config.stages = "pairs"
  config.teacher.dtype = "bfloat16"
  config.pairs.guidance_scale = 3.0
  config.pairs.num_steps = 50
  config.pairs.batch_size = 32
  config.pairs.shard_size = 512
  return config
