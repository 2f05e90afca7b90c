"""Single-latent reconstruction (the paper's figure): optimise one latent toward a target under each
regression loss and plot its distance to the target (latent PSNR) against the step.

  python scripts/latent_reconstruction.py --out /tmp/recon   # synthetic target, CPU, ~2 min
  python scripts/latent_reconstruction.py --target z.npy --weights ckpt/ --size 64 --steps 500

Without E-LatentLPIPS weights (`--weights`) the perceptual losses use a random VGG trunk (with a
warning): the curves then show the mechanics, not the paper's numbers. `--pixel_lpips` adds pixel
LPIPS through a randomly initialised VAE decoder (`--vae sd`: the real SD architecture, slow on
CPU; `--vae tiny`: a small one). Writes `reconstruction.png` and `distances.json` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2g_jax.losses import perceptual

LATENT_LOSSES = ("mse", "pseudo_huber", "latent_lpips", "e_latent_lpips")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="reconstruction_out", help="output folder")
  p.add_argument("--target", default="", help=".npy latent (HxWxC or 1xHxWxC); default: synthetic")
  p.add_argument("--size", type=int, default=16, help="synthetic target latent height and width")
  p.add_argument("--encoder", default="sd15", help="latent family: sd15, sd21, sdxl, sd3, flux")
  p.add_argument("--weights", default="", help="E-LatentLPIPS weights file or folder")
  p.add_argument("--losses", default=",".join(LATENT_LOSSES), help="comma-separated loss names")
  p.add_argument("--augment", default="bg", help="augmentation policy of e_latent_lpips")
  p.add_argument("--no_l1", action="store_true", help="drop the L1 term of the LPIPS losses")
  p.add_argument("--pixel_lpips", action="store_true",
                 help="also pixel LPIPS (through a VAE decoder)")
  p.add_argument("--vae", default="tiny", choices=("tiny", "sd"), help="decoder for --pixel_lpips")
  p.add_argument("--lpips_vgg", default="", help="torchvision VGG16 state dict for --pixel_lpips")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def synthetic_target(key: jax.Array, size: int, channels: int) -> jax.Array:
  """A smooth latent with some detail, std about 1 (like scaled SD latents), 1xHxWxC."""
  k1, k2 = jax.random.split(key)
  coarse = jax.random.normal(k1, (1, max(size // 4, 2), max(size // 4, 2), channels))
  smooth = jax.image.resize(coarse, (1, size, size, channels), "cubic")
  z = smooth + 0.3 * jax.random.normal(k2, (1, size, size, channels))
  return (z - z.mean()) / z.std()


def load_target(args) -> jax.Array:
  channels = 16 if args.encoder in ("sd3", "flux") else 4
  if not args.target:
    return synthetic_target(jax.random.PRNGKey(args.seed + 1), args.size, channels)
  z = np.load(args.target).astype(np.float32)
  z = z[None] if z.ndim == 3 else z
  if z.ndim != 4 or z.shape[0] != 1 or z.shape[-1] != channels:
    raise ValueError(f"{args.target}: expected one NHWC latent with {channels} channels "
                     f"(HxWx{channels} or 1xHxWx{channels}) for encoder {args.encoder!r}, "
                     f"got shape {z.shape}")
  return jnp.asarray(z)


def psnr(x, target) -> jax.Array:
  """Latent-space PSNR in dB, peak = the target's value range."""
  peak = jnp.max(target) - jnp.min(target)
  return 10.0 * jnp.log10(peak ** 2 / jnp.mean(jnp.square(x - target)))


def pixel_decoder(kind: str, channels: int):
  """(decode(params, latents), params) of a randomly initialised VAE decoder."""
  from d2g_jax.models.vae import AutoencoderKL, VAEConfig
  cfg = VAEConfig.sd() if kind == "sd" else VAEConfig.tiny(latent_channels=channels)
  vae = AutoencoderKL(cfg)
  z = jnp.zeros((1, 8, 8, cfg.latent_channels))
  params = jax.jit(lambda k: vae.init(k, z, method=AutoencoderKL.decode))(jax.random.PRNGKey(2))
  decode = lambda p, lat: vae.apply({"params": p}, cfg.unscale_latents(lat),
                                    method=AutoencoderKL.decode)
  return decode, params["params"]


def reconstruct(loss_fn, params, target, init, steps: int, lr: float, key) -> dict[str, list]:
  """Adam on one latent; returns per-step mse / psnr to the target and the loss value."""
  opt = optax.adam(lr)

  @jax.jit  # params and target are arguments: as closed-over constants XLA would fold them
  def step(params, target, x, state, k):
    loss, g = jax.value_and_grad(lambda v: loss_fn(params, v, target, k))(x)
    updates, state = opt.update(g, state, x)
    x = optax.apply_updates(x, updates)
    return x, state, loss, jnp.mean(jnp.square(x - target)), psnr(x, target)

  x, state = init, opt.init(init)
  hist = {"loss": [], "mse": [], "psnr": []}
  for i in range(steps):
    x, state, loss, m, p = step(params, target, x, state, jax.random.fold_in(key, i))
    for name, v in (("loss", loss), ("mse", m), ("psnr", p)):
      hist[name].append(float(v))
  return hist


def plot(histories: dict[str, dict], path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, h in histories.items():
    ax.plot(np.arange(1, len(h["psnr"]) + 1), h["psnr"], label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("latent PSNR to target (dB)")
  ax.set_title("Single-latent reconstruction")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  target = load_target(args)
  names = [n for n in args.losses.split(",") if n]
  if args.pixel_lpips and "lpips" not in names:
    names.append("lpips")
  unknown = set(names) - set(perceptual.NAMES)
  if unknown:
    raise SystemExit(f"unknown losses {sorted(unknown)}; choose from {perceptual.NAMES}")
  key = jax.random.PRNGKey(args.seed)
  init = jax.random.normal(jax.random.fold_in(key, 7), target.shape)
  histories = {}
  for name in names:
    kw = dict(encoder=args.encoder, weights=args.weights or None, augment=args.augment,
              l1=not args.no_l1, allow_random_weights=True)  # random ones are warned below
    if name == "lpips":
      kw["decode"], kw["decoder_params"] = pixel_decoder(args.vae, target.shape[-1])
      kw["lpips_vgg"] = args.lpips_vgg or None
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      loss_fn, params = perceptual.build_loss(name, **kw)
    for w in caught:
      print(f"warning ({name}): {w.message}")
    t0 = time.time()
    histories[name] = reconstruct(loss_fn, params, target, init, args.steps, args.lr, key)
    h = histories[name]
    print(f"{name:>15}: psnr {h['psnr'][0]:6.2f} -> {h['psnr'][-1]:6.2f} dB, "
          f"mse {h['mse'][-1]:.4g}  ({time.time() - t0:.1f}s)")
  png = os.path.join(args.out, "reconstruction.png")
  plot(histories, png)
  with open(os.path.join(args.out, "distances.json"), "w") as fh:
    json.dump({"args": vars(args), "histories": histories}, fh)
  print(f"wrote {png}")
  return histories


if __name__ == "__main__":
  main()
