"""SDXL-base (1024 px) -> one-step Diffusion2GAN, 50-step DDIM pairs with guidance 3.

    python -m d2g_jax.main --config configs/sdxl.py \
        --config.teacher.path=/models/stable-diffusion-xl-base-1.0 \
        --config.pairs.prompts=/data/prompts.jsonl \
        --config.loss.weights=/weights/sdxl_elatentlpips.safetensors --config.workdir=/runs/sdxl

Runs every stage in order (pairs, train, export), each resuming where it stopped.
`teacher.path` is a diffusers pipeline folder on disk (nothing is downloaded). SDXL's two
text encoders, pooled embeddings and size micro-conditioning are handled by the teacher;
the pairs' resolution gives the generator's and discriminator's `time_ids`. The state
(G, its EMA, D and two Adam states: ~72 GB in fp32) is split over 16 chips, and each update
accumulates 4 microbatches: compiled for 64 v5p chips (16 pairs per chip), each half of the
step peaks at 81-83 GB of 95 (docs/performance.md). On 80 GB GPUs use
--config.train.microbatches=8, or --config.train.remat=True.
"""

from d2g_jax import config_defaults


def get_config():
  config = config_defaults.base()
  config.workdir = "/tmp/d2g_sdxl"
  config.stages = "pairs,train,export"
  config.teacher.dtype = "bfloat16"
  config.pairs.guidance_scale = 3.0
  config.pairs.num_steps = 50
  config.pairs.batch_size = 32
  config.pairs.shard_size = 512
  config.loss.name = "e_latent_lpips"
  config.loss.encoder = "sdxl"
  config.mesh.data = -1
  config.mesh.fsdp = 16
  config.train.batch_size = 1024
  config.train.num_steps = 20000
  config.train.dtype = "bfloat16"
  config.train.remat = False
  config.train.microbatches = 4
  config.train.checkpoint_every = 500
  config.train.sample_every = 500
  config.train.num_samples = 4
  return config
