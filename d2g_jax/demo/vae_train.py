"""Stage `digits_vae`: a tiny `AutoencoderKL` trained on the digits, saved as a diffusers VAE folder.

Legend: B batch, N images, H/W pixels, h/w latent size, L latent channels.

Loss: mean |x - x'| + mean (x - x')^2 of the reconstruction of a sampled latent, plus
`kl_weight` x the mean KL to N(0, 1) per latent element (no GAN, no LPIPS: the digits
are smooth and the latent 4x over-complete). Afterwards `scaling_factor` = 1 / std of
the train latents' means, so the latents the diffusion model sees have unit std, as
SD's 0.18215 does for its VAE. Output: `<digits.dir>/vae`, a diffusers AutoencoderKL
folder (written whole or not at all, marked with the settings that made it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.convert.vae import save_vae
from d2g_jax.demo import classifier, digits, fit, folders
from d2g_jax.models.vae import AutoencoderKL, VAEConfig, sample_latent

STATE = "vae_state.msgpack"
FOLDER = "vae"


def vae_config(c) -> VAEConfig:
  """The VAE of `config.digits` (scaling_factor 1 until measured)."""
  n = len(c.vae.block_out_channels)
  return VAEConfig(down_block_types=("DownEncoderBlock2D",) * n,
                   up_block_types=("UpDecoderBlock2D",) * n,
                   block_out_channels=tuple(c.vae.block_out_channels),
                   layers_per_block=c.vae.layers_per_block,
                   latent_channels=c.vae.latent_channels, norm_num_groups=c.vae.norm_num_groups,
                   sample_size=c.image_size, scaling_factor=1.0)


def vae_settings(config) -> dict:
  """What the VAE depends on (a finished folder made with other settings is not kept)."""
  c = config.digits
  return {"vae": c.vae.to_dict(), "image_size": c.image_size, "held_out": c.held_out,
          "split_seed": c.split_seed, "warmup_steps": c.warmup_steps, "seed": config.seed}


def loss_fn(module: AutoencoderKL, batch_size: int, kl_weight: float, params, data, key):
  k_idx, k_z = jax.random.split(key)
  idx_B = jax.random.randint(k_idx, (batch_size,), 0, data.shape[0])
  x_BxHxWx3 = data[idx_B]
  mean, logvar = module.apply({"params": params}, x_BxHxWx3, method=AutoencoderKL.encode)
  rec = module.apply({"params": params}, sample_latent(k_z, mean, logvar),
                     method=AutoencoderKL.decode)
  err = rec.astype(jnp.float32) - x_BxHxWx3
  kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.mean(jnp.abs(err)) + jnp.mean(err ** 2) + kl_weight * kl


@functools.partial(jax.jit, static_argnums=0)
def _encode_decode(module: AutoencoderKL, params, x_NxHxWx3):
  """(latent means, reconstructions through the means): one program for both uses."""
  mean, _ = module.apply({"params": params}, x_NxHxWx3, method=AutoencoderKL.encode)
  return mean, module.apply({"params": params}, mean, method=AutoencoderKL.decode)


def train_vae(config) -> dict:
  """Trains (or resumes) the VAE and writes the diffusers folder; returns its figures."""
  c = config.digits
  train, held = digits.load(c.image_size, c.held_out, c.split_seed)
  cfg = vae_config(c)
  module = AutoencoderKL(cfg, implementation=config.teacher.attention)
  params = fit.init_params(module, config.seed, 1, train.images_NxHxWx3[:1])
  spec = fit.Spec(steps=c.vae.steps, lr=c.vae.lr, warmup_steps=c.warmup_steps,
                  checkpoint_every=c.checkpoint_every)
  t0 = time.time()
  params = fit.fit(functools.partial(loss_fn, module, c.vae.batch_size, c.vae.kl_weight), params,
                   jnp.asarray(train.images_NxHxWx3), spec,
                   jax.random.fold_in(jax.random.key(config.seed), 1),
                   os.path.join(c.dir, STATE), "digits_vae", settings=vae_settings(config))
  seconds = time.time() - t0
  x = np.concatenate([train.images_NxHxWx3, held.images_NxHxWx3])
  mean, rec = jax.device_get(_encode_decode(module, params, x))
  n = len(train.labels_N)
  std = float(np.std(mean[:n]))
  cfg = dataclasses.replace(cfg, scaling_factor=1.0 / std)
  clf, real_acc = classifier.fit_on_digits(c.image_size, c.held_out, c.split_seed)
  figures = {"seconds": seconds, "scaling_factor": cfg.scaling_factor,
             "held_out_mse": float(np.mean((rec[n:] - held.images_NxHxWx3) ** 2)),
             "held_out_recon_accuracy": classifier.accuracy(clf, rec[n:], held.labels_N),
             "held_out_real_accuracy": real_acc}
  folders.build(os.path.join(c.dir, FOLDER),
                lambda tmp: save_vae(AutoencoderKL(cfg), params, tmp), "digits_vae",
                vae_settings(config), figures)
  return figures


def run_vae(config):
  """The stage: keeps a finished VAE folder made with these settings, else trains one."""
  folder = os.path.join(config.digits.dir, FOLDER)
  if folders.finished(folder, vae_settings(config), "digits_vae") is not None:
    print(f"[digits_vae] {folder} already exists; keeping it", flush=True)
    return folder
  r = train_vae(config)
  print(f"[digits_vae] trained the digits VAE ({config.digits.vae.steps} steps, "
        f"{r['seconds']:.0f} s); held-out reconstructions: MSE {r['held_out_mse']:.4f}, "
        f"classified correctly {100 * r['held_out_recon_accuracy']:.1f}% (real images "
        f"{100 * r['held_out_real_accuracy']:.1f}%); scaling_factor "
        f"{r['scaling_factor']:.4f}; wrote {folder}", flush=True)
  return folder
