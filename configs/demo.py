"""End-to-end demo on a tiny random teacher (no downloads; a few minutes on a laptop CPU).

    python -m d2g_jax.main --config configs/demo.py [--config.workdir=/tmp/d2g_demo]

Builds a tiny SD 1.5-shaped diffusers pipeline with random weights, checks the UNet
conversion round trip (diffusers -> Flax -> Orbax -> diffusers, bit-exact, forward
parity with diffusers), generates 16 teacher pairs with 4-step DDIM + CFG 3, distils
them for a few Diffusion2GAN steps (generator + multi-scale conditional discriminator)
and exports the student as a diffusers pipeline folder that samples in one step.
Needs the conversion extra: pip install -e '.[torch]'.
"""

import os

from d2g_jax import config_defaults


def get_config():
  config = config_defaults.base()
  config.workdir = "/tmp/d2g_demo"
  config.stages = "tiny_teacher,roundtrip,pairs,train,export"
  config.teacher.tiny_family = "sd1"
  config.pairs.prompts = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "demo_prompts.txt")
  config.pairs.num_pairs = 16
  config.pairs.num_steps = 4
  config.pairs.batch_size = 8
  config.pairs.shard_size = 8
  config.loss.name = "mse"
  config.train.num_steps = 20
  config.train.batch_size = 8
  config.train.g_lr = 1e-4
  config.train.d_lr = 1e-4
  config.train.warmup_steps = 5
  config.train.checkpoint_every = 10
  config.train.log_every = 5
  config.train.sample_every = 20
  config.train.num_samples = 4
  config.objective.r1_interval = 4
  return config
