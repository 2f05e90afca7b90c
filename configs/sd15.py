"""Stable Diffusion 1.5 -> one-step Diffusion2GAN: the paper's SD-CFG-3 recipe (`:cfg8` for SD-CFG-8).

    python -m d2g_jax.main --config configs/sd15.py \
        --config.teacher.path=/models/stable-diffusion-v1-5 \
        --config.pairs.prompts=/data/coco_captions.txt \
        --config.loss.weights=/weights/sd15_elatentlpips.safetensors --config.workdir=/runs/sd15

Runs every stage in order (pairs, train, export), each resuming where it stopped; pass
--config.stages=train (or export) to run one. `teacher.path` is a diffusers pipeline folder
on disk (nothing is downloaded). SD-CFG-8 (pairs with guidance 8):
`--config configs/sd15.py:cfg8`. The paper trains with global batch 1024 on 64 A100s; the
mesh below splits parameters and optimiser states over 8 chips (one host) and replicates
over the rest. On a CPU, lower train.batch_size and use --config.train.dtype=float32.
"""

from d2g_jax import config_defaults


def get_config(arg: str | None = None):
  config = config_defaults.base()
  config.workdir = "/tmp/d2g_sd15"
  config.stages = "pairs,train,export"
  config.pairs.guidance_scale = {None: 3.0, "cfg3": 3.0, "cfg8": 8.0}[arg]
  config.pairs.num_steps = 50
  config.pairs.batch_size = 64
  config.teacher.dtype = "bfloat16"
  config.loss.name = "e_latent_lpips"
  config.loss.encoder = "sd15"
  config.mesh.data = -1
  config.mesh.fsdp = 8
  config.train.batch_size = 1024
  config.train.num_steps = 20000
  config.train.dtype = "bfloat16"
  config.train.checkpoint_every = 1000
  config.train.sample_every = 1000
  return config
