"""One full Diffusion2GAN train step (D update, then G update) at the full SD 1.5 architecture,
E-LatentLPIPS regression against the same step with pixel LPIPS through the VAE decoder.

  python benchmarks/train_step.py --batch 1 --repeats 3 [--optimizer sgd] [--dtype bfloat16]

Random weights (UNet, discriminator, latent VGG, pixel LPIPS VGG, VAE decoder), 64x64x4
latents (512 px), the default objective (multi-scale conditional D, mix-and-match, the step
without R1; `--r1` times the R1 variant too). Both steps share one train state and are
timed in turns (benchmarks/common.py), median of `--repeats` after `--warmup` calls; the
printed ratio is pixel-LPIPS step time / E-LatentLPIPS step time. FLOPs per step are XLA's
cost analysis of each compiled step; with `--peak_tflops` (the device's dense peak in the
compute dtype) the model-FLOPs utilisation is printed too.

Memory: the state (G, its EMA, D, and with Adam two moments each) is ~24 GB in fp32 for
SD 1.5; on a machine with less memory use `--optimizer sgd` (no optimiser state: the same
step, a cheaper update). Both steps in one process were killed for memory on a 24 GB host
even at 32x32 latents with sgd (24.3 GB resident; XLA temporaries 7.7 + 8.4 GB); there, time
one loss per process (`--losses e_latent_lpips`, then `--losses lpips`) and say so. The paper's
9.7x (A100) is for the loss alone; this is the step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from common import cpu_name, interleaved_medians  # noqa: E402

import d2g_jax  # noqa: E402,F401  (XLA flags before JAX starts)
from d2g_jax import config_defaults  # noqa: E402
from d2g_jax.models.unet import UNet  # noqa: E402
from d2g_jax.models.unet_config import UNetConfig  # noqa: E402
from d2g_jax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from d2g_jax.sampling.schedule import ScheduleConfig  # noqa: E402
from d2g_jax.train import build, steps  # noqa: E402

SD15_SCHEDULE = ScheduleConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="sd15", help="UNet preset (sd15, sd21, tiny_sd15, ...)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--latent_size", type=int, default=64)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--attention", default="auto")
  p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
  p.add_argument("--losses", default="e_latent_lpips,lpips")
  p.add_argument("--r1", action="store_true", help="also time the R1 variant (E-LatentLPIPS)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--peak_tflops", type=float, default=0.0)
  p.add_argument("--json", default="")
  p.add_argument("--record", default="", metavar="PATH",
                 help="append this run to PATH as one JSON line (benchmarks/results/*.jsonl; benchmarks/tables.py)")
  return p.parse_args(argv)


def config_for(args, loss: str):
  config = config_defaults.base()
  config.loss.name = loss
  config.loss.allow_random_weights = True  # the step's cost, not the loss's values
  config.train.dtype = args.dtype
  config.train.attention = args.attention
  return config


def objective(args, loss: str, vae, vae_params):
  unet_cfg = UNetConfig.preset(args.preset)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # random loss weights are the point here
    obj, consts = build.objective_from_parts(config_for(args, loss), unet_cfg, SD15_SCHEDULE,
                                             vae=vae, vae_params=vae_params)
  if args.optimizer == "sgd":
    sgd = optax.sgd(1e-5)
    obj = steps.Objective(**{**obj.__dict__, "g_tx": sgd, "d_tx": sgd})
  return obj, consts


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def main(argv=None):
  args = parse_args(argv)
  unet_cfg = UNetConfig.preset(args.preset)
  vae_cfg = VAEConfig.sd()
  vae = AutoencoderKL(vae_cfg, dtype=jnp.dtype(args.dtype))
  z8 = jnp.zeros((1, 8, 8, vae_cfg.latent_channels))
  vae_params = jax.jit(lambda k: vae.init(k, z8, method=AutoencoderKL.decode))(
      jax.random.key(3))["params"]
  losses = [l for l in args.losses.split(",") if l]
  objs = {l: objective(args, l, vae, vae_params) for l in losses}
  first = objs[losses[0]][0]
  teacher = jax.jit(lambda k: UNet(unet_cfg).init(
      k, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 2, unet_cfg.cross_dims[0]))))(
          jax.random.key(0))["params"]
  state = jax.jit(build.init_fn(first), donate_argnums=1)(jax.random.key(1), teacher)
  del teacher
  b, s = args.batch, args.latent_size
  keys = jax.random.split(jax.random.key(2), 3)
  batch = {"z": jax.random.normal(keys[0], (b, s, s, 4)),
           "x": jax.random.normal(keys[1], (b, s, s, 4)),
           "prompt_embeds": jax.random.normal(keys[2], (b, 77, unet_cfg.cross_dims[0]))}

  variants = [(l, False) for l in losses] + ([(losses[0], True)] if args.r1 else [])
  compiled, info = {}, {}
  for loss, r1 in variants:
    name = loss + ("+r1" if r1 else "")
    obj, consts = objs[loss]
    t0 = time.perf_counter()
    fn = jax.jit(functools.partial(steps.train_step, obj, do_r1=r1), donate_argnums=0)
    compiled[name] = (fn.lower(state, consts, batch).compile(), consts)
    mem = compiled[name][0].memory_analysis()
    info[name] = {"compile_s": time.perf_counter() - t0, "flops": flops(compiled[name][0]),
                  "temp_gb": getattr(mem, "temp_size_in_bytes", 0) / 1e9}
    print(f"[{name}] compiled in {info[name]['compile_s']:.0f} s; XLA: "
          f"{info[name]['flops'] / 1e12:.2f} TFLOP per step, temporaries "
          f"{info[name]['temp_gb']:.2f} GB", flush=True)

  holder = {"state": state}

  def runner(name):
    fn, consts = compiled[name]

    def call():
      holder["state"], m = fn(holder["state"], consts, batch)
      jax.block_until_ready(m)
    return call

  fns = {name: runner(name) for name in compiled}
  for _ in range(args.warmup):
    for f in fns.values():
      f()
  times = interleaved_medians(fns, args.repeats)
  cpu = cpu_name()
  print(f"\n{args.preset}, {s}x{s}x4 latents, batch {b}, {args.dtype}, {args.optimizer}; "
        f"{jax.devices()[0].device_kind} ({cpu}); median of {args.repeats}, timed in turns")
  for name, t in times.items():
    line = f"  {name:22s} {t:8.2f} s/step  {info[name]['flops'] / t / 1e12:7.3f} TFLOP/s"
    if args.peak_tflops:
      line += f"  MFU {100 * info[name]['flops'] / t / 1e12 / args.peak_tflops:.1f}%"
    print(line)
  if "e_latent_lpips" in times and "lpips" in times:
    print(f"  pixel-LPIPS step / E-LatentLPIPS step: {times['lpips'] / times['e_latent_lpips']:.2f}x"
          f" time, {info['lpips']['flops'] / max(info['e_latent_lpips']['flops'], 1):.2f}x FLOPs")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"args": vars(args), "device": jax.devices()[0].device_kind, "cpu": cpu,
                 "seconds": times, "info": info}, fh, indent=2)
  if args.record:
    from common import record
    record(args.record, {
        "preset": args.preset, "batch": b, "latent_size": s, "dtype": args.dtype,
        "optimizer": args.optimizer, "repeats": args.repeats,
        "steps": {name: {"seconds": t, "tflop": info[name]["flops"] / 1e12,
                         "temp_gb": info[name]["temp_gb"],
                         "compile_s": info[name]["compile_s"]} for name, t in times.items()}})


if __name__ == "__main__":
  main()
