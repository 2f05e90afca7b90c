"""The digits demo's config blocks (`config.digits`, `config.demo`), added to every config by
`config_defaults.base()`: the demo's stages read them, nothing else does."""

import ml_collections


def add_blocks(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  # The digits demo's teacher: stages digits_vae, digits_teacher (docs/demo.md).
  c.digits = ml_collections.ConfigDict()
  c.digits.dir = "{workdir}/digits"  # VAE folder, training states
  c.digits.image_size = 32         # pixels (bilinear from 8x8; a multiple of 8)
  c.digits.held_out = 300          # held-out images (30 per digit), never trained on
  c.digits.split_seed = 0
  c.digits.prompt = "a handwritten digit {}"  # {} = the digit; the tokenizer knows these words
  c.digits.warmup_steps = 100      # both trainings: linear warm-up, then cosine decay to 0
  c.digits.checkpoint_every = 250  # steps between resumable training states
  c.digits.vae = ml_collections.ConfigDict()
  c.digits.vae.block_out_channels = (8, 16, 32)  # n levels: latents at 1 / 2^(n-1) of the size
  c.digits.vae.layers_per_block = 1
  c.digits.vae.norm_num_groups = 4
  c.digits.vae.latent_channels = 4
  c.digits.vae.steps = 1000
  c.digits.vae.batch_size = 32
  c.digits.vae.lr = 1e-3
  c.digits.vae.kl_weight = 1e-3    # on the mean KL per latent element (loss: mean L1 + L2)
  c.digits.text = ml_collections.ConfigDict()  # random, frozen CLIP text encoder
  c.digits.text.hidden_size = 32
  c.digits.text.num_layers = 2
  c.digits.text.num_heads = 2
  c.digits.text.max_length = 8     # tokens with BOS / EOS; the prompts need 6
  c.digits.unet = ml_collections.ConfigDict()
  c.digits.unet.block_out_channels = (32, 64)  # CrossAttn down/up blocks at each level
  c.digits.unet.layers_per_block = 1
  c.digits.unet.attention_heads = 2
  c.digits.unet.norm_num_groups = 8
  c.digits.unet.steps = 1500
  c.digits.unet.batch_size = 64
  c.digits.unet.lr = 1e-3
  c.digits.unet.ema_decay = 0.999  # the pipeline gets the EMA weights
  c.digits.unet.drop_prompt = 0.1  # fraction of steps conditioned on "" (for CFG)
  c.digits.check_per_digit = 10    # teacher check after training: samples per digit (0 = off)
  c.digits.check_guidance = 4.0    # ... 50-step DDIM (eta 0) with this CFG scale
  c.digits.check_steps = 50

  # The digits demo's report (stage demo_report: demo.png, metrics.json).
  c.demo = ml_collections.ConfigDict()
  c.demo.samples_per_digit = 16    # noises per digit, the same for every sampler
  c.demo.seed = 1234               # their seed (not the pairs': these are unseen noises)
  c.demo.columns = 4               # samples per sampler shown in demo.png
  c.demo.zoom = 3                  # demo.png pixel repetition
  c.demo.lpips_draws = 8           # augmentation draws averaged for E-LatentLPIPS distances
  c.demo.twoafc_per_family = 100   # stage digits_lpips_data: 2AFC triplets per family and split
  return c
