"""Stage `digits_teacher`: a tiny text-conditioned UNet trained on the digits VAE's latents.

Legend: B batch, N images, h/w latent size, L latent channels, T tokens, D text width.

SD 1.5's recipe in miniature: epsilon prediction under SD's scaled-linear schedule
(1000 steps), t uniform, the latent sampled from the VAE posterior and scaled by its
`scaling_factor`; the prompt ("a handwritten digit 7") replaced by the empty prompt
on `drop_prompt` of the examples, so that classifier-free guidance works. The UNet has
SD 1.5's layout at toy width: cross-attention in every level but the lowest, and in
the mid block. The text encoder is random and frozen (`text.py`), so the eleven
conditionings (ten digits, "") are computed once. The EMA weights, the VAE, the text
encoder and tokenizer and a DDIM scheduler are written as a diffusers
`StableDiffusionPipeline` folder at `config.teacher.path` (whole or not at all, marked
with the settings that made it); then, with `digits.check_per_digit` > 0, `check.py`
samples it and reports how often the prompted digit comes out.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.convert.vae import load_vae
from d2g_jax.demo import check, digits, fit, folders, pipeline, text, vae_train
from d2g_jax.files import save_json
from d2g_jax.grid import save_grid
from d2g_jax.models.unet import UNet
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.models.vae import AutoencoderKL, sample_latent
from d2g_jax.sampling.ddim import add_noise
from d2g_jax.sampling.schedule import ScheduleConfig

STATE = "teacher_state.msgpack"


def teacher_settings(config) -> dict:
  """What the teacher depends on: the VAE's settings and its own."""
  c = config.digits
  return {**vae_train.vae_settings(config), "unet": c.unet.to_dict(), "text": c.text.to_dict(),
          "prompt": c.prompt}


def unet_config(c, latent_size: int, latent_channels: int, cross_dim: int) -> UNetConfig:
  """The teacher UNet of `config.digits` for latents of latent_size^2 x latent_channels."""
  n = len(c.unet.block_out_channels)
  if latent_size % 2 ** (n - 1):
    raise ValueError(f"digits.unet.block_out_channels has {n} levels, which halve the latent "
                     f"{n - 1} times, but the latent is {latent_size} px: use at most "
                     f"{1 + int(np.log2(latent_size & -latent_size))} levels")
  return UNetConfig(in_channels=latent_channels, out_channels=latent_channels,
                    sample_size=latent_size,
                    down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
                    block_out_channels=tuple(c.unet.block_out_channels),
                    layers_per_block=c.unet.layers_per_block,
                    norm_num_groups=c.unet.norm_num_groups, cross_attention_dim=cross_dim,
                    attention_head_dim=c.unet.attention_heads)


def loss_fn(unet: UNet, alpha_bar_T: np.ndarray, scale: float, batch_size: int,
            drop_prompt: float, params, data, key):
  """Mean squared error of the predicted noise; `data` = {mean, logvar, label, embeds}."""
  k_idx, k_z, k_drop, k_t, k_eps = jax.random.split(key, 5)
  idx_B = jax.random.randint(k_idx, (batch_size,), 0, data["label"].shape[0])
  z0_Bxhxwx4 = scale * sample_latent(k_z, data["mean"][idx_B], data["logvar"][idx_B])
  drop_B = jax.random.uniform(k_drop, (batch_size,)) < drop_prompt
  uncond = data["embeds"].shape[0] - 1  # the last row is the empty prompt's
  ctx_BxTxD = data["embeds"][jnp.where(drop_B, uncond, data["label"][idx_B])]
  t_B = jax.random.randint(k_t, (batch_size,), 0, alpha_bar_T.shape[0])
  eps = jax.random.normal(k_eps, z0_Bxhxwx4.shape)
  x_t = add_noise(z0_Bxhxwx4, eps, jnp.asarray(alpha_bar_T)[t_B])
  pred = unet.apply({"params": params}, x_t, t_B, ctx_BxTxD)
  return jnp.mean((pred.astype(jnp.float32) - eps) ** 2)


@functools.partial(jax.jit, static_argnums=0)
def _encode(vae: AutoencoderKL, params, x_NxHxWx3):
  return vae.apply({"params": params}, x_NxHxWx3, method=AutoencoderKL.encode)


def train_teacher(config) -> dict:
  """Trains (or resumes) the teacher UNet and writes the pipeline at config.teacher.path."""
  c = config.digits
  vae_dir = os.path.join(c.dir, vae_train.FOLDER)
  if not os.path.isfile(os.path.join(vae_dir, "config.json")):
    raise FileNotFoundError(f"the digits VAE {vae_dir!r} does not exist; run the digits_vae "
                            "stage first (--config.stages=digits_vae,digits_teacher)")
  vae, vae_params = load_vae(vae_dir)
  train, _ = digits.load(c.image_size, c.held_out, c.split_seed)
  if vae.config.sample_size != c.image_size:
    raise ValueError(f"{vae_dir} was trained on {vae.config.sample_size} px digits but "
                     f"digits.image_size is {c.image_size}; use the same size or retrain the VAE")
  tokenizer, text_module, text_params = text.make_text_encoder(
      c.prompt, c.text.hidden_size, c.text.num_layers, c.text.num_heads, c.text.max_length,
      config.seed)
  embeds = text.embed(tokenizer, text_module, text_params, digits.prompts(c.prompt) + [""])
  mean, logvar = jax.device_get(_encode(vae, vae_params, train.images_NxHxWx3))
  size = c.image_size // vae.config.downscale
  unet = UNet(unet_config(c, size, vae.config.latent_channels, c.text.hidden_size),
              attention=config.teacher.attention)
  params = fit.init_params(unet, config.seed, 3, mean[:1], np.zeros((1,), np.int32), embeds[:1])
  schedule = ScheduleConfig.stable_diffusion()
  data = {"mean": mean, "logvar": logvar, "label": train.labels_N, "embeds": embeds}
  spec = fit.Spec(steps=c.unet.steps, lr=c.unet.lr, warmup_steps=c.warmup_steps,
                  ema_decay=c.unet.ema_decay, checkpoint_every=c.checkpoint_every)
  loss = functools.partial(loss_fn, unet, schedule.alphas_cumprod.astype(np.float32),
                           vae.config.scaling_factor, c.unet.batch_size, c.unet.drop_prompt)
  t0 = time.time()
  params = fit.fit(loss, params, jax.tree.map(jnp.asarray, data), spec,
                   jax.random.fold_in(jax.random.key(config.seed), 2),
                   os.path.join(c.dir, STATE), "digits_teacher", settings=teacher_settings(config))
  figures = {"seconds": time.time() - t0}
  write = functools.partial(pipeline.write_sd_pipeline, unet=(unet, params),
                            vae=(vae, vae_params), text_encoder=(text_module, text_params),
                            tokenizer=tokenizer, schedule=schedule)
  folders.build(config.teacher.path, write, "digits_teacher", teacher_settings(config), figures)
  return figures


def run_teacher(config):
  """The stage: keeps a finished teacher made with these settings, else trains one (and
  checks it: samples per digit, classified; `<digits.dir>/teacher_check.json` and .png)."""
  c, path = config.digits, config.teacher.path
  if folders.finished(path, teacher_settings(config), "digits_teacher") is not None:
    print(f"[digits_teacher] {path} already exists; keeping it", flush=True)
    return path
  figures = train_teacher(config)
  checked = ""
  if c.check_per_digit > 0:
    r = check.teacher_accuracy(config)
    u8 = np.round(np.clip(r.images_NxHxWx3, -1, 1) * 127.5 + 127.5).astype(np.uint8)
    grid = os.path.join(c.dir, "teacher_check.png")
    save_grid([u8[r.labels_N == d] for d in range(digits.NUM_CLASSES)], grid)
    save_json({"accuracy": r.accuracy, "samples": len(r.labels_N),
               "guidance_scale": c.check_guidance, "num_steps": c.check_steps},
              os.path.join(c.dir, "teacher_check.json"))
    checked = (f"; its {c.check_steps}-step DDIM samples with CFG {c.check_guidance:g} show the "
               f"prompted digit {100 * r.accuracy:.0f}% of the time ({len(r.labels_N)} samples, "
               f"{grid})")
  print(f"[digits_teacher] trained the digits teacher UNet ({c.unet.steps} steps, "
        f"{figures['seconds']:.0f} s) and wrote a StableDiffusionPipeline to {path}{checked}",
        flush=True)
  return path
