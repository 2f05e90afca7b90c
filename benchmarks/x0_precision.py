"""How far the one-step generator's x0 moves when the UNet computes in bf16 instead of fp32,
with its output head in bf16 (before issue 22) and in fp32 (now).

    python benchmarks/x0_precision.py                          # SD 1.5 and SDXL UNets, 64x64 latents
    python benchmarks/x0_precision.py --presets tiny_sd15 --size 16   # seconds: a smoke run

For each UNet preset, one set of random parameters (flax's init, with `conv_out` rescaled
so that the fp32 prediction has unit RMS, as a trained model's eps at t = 999 has) and one
random z and text embedding at t = 999. x0 = (z - sqrt(1 - a) eps) / sqrt(a) with
a = alpha_bar(999) of the preset's schedule (SD 1.5 and SDXL share theirs: scaled_linear
betas 0.00085..0.012, a = 0.00466, 1/sqrt(a) = 14.6). Rows, each the RMS difference from
the all-fp32 x0:

  before         body in bf16, head as before (GroupNorm + SiLU in fp32, then conv_out in bf16,
                 a bf16 prediction)
  after          body in bf16, head in fp32 (`UNet.head` today)
  rounding only  the fp32 prediction rounded to bf16 and turned into x0: the part of
                 "before" due to the output's bf16 rounding alone

"before" and "after" share the same bf16 body run, so their difference is the head alone.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import cpu_name

from d2g_jax.models.layers import activation, conv
from d2g_jax.models.unet import UNet
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.sampling.ddim import x0_from_eps
from d2g_jax.sampling.schedule import ScheduleConfig

T = 999


def body(m: UNet, sample, timestep, ehs, added):
  """UNet.__call__ up to (not including) the output head."""
  return m.body(sample, timestep, ehs, added)


def old_head(params, h, config: UNetConfig):
  """The head before issue 22: GroupNorm + SiLU in fp32, cast to bf16, conv_out in bf16."""
  h = UNet(config).bind({"params": params}).conv_norm_out(h)
  h = activation(config.act_fn)(h).astype(jnp.bfloat16)
  out_conv = conv(config.out_channels, config.conv_out_kernel, jnp.bfloat16, jnp.float32)
  return out_conv.apply({"params": params["conv_out"]}, h)


def inputs(config: UNetConfig, size: int, seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 3)
  z = jax.random.normal(ks[0], (1, size, size, config.in_channels))
  ehs = jax.random.normal(ks[1], (1, 77, config.cross_dims[0]))
  added = None
  if config.addition_embed_type == "text_time":
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": jax.random.normal(ks[2], (1, text_dim)),
             "time_ids": jnp.asarray([[8. * size, 8. * size, 0, 0, 8. * size, 8. * size]])}
  return z, jnp.full((1,), T, jnp.float32), ehs, added


def on_bf16_lattice(eps) -> float:
  """The fraction of the prediction's values that bf16 represents exactly: x0 - z / sqrt(a)
  = -sqrt((1 - a) / a) eps is on a lattice z-conditioned D could learn where this is 1."""
  e = jnp.asarray(eps, jnp.float32)
  return float(jnp.mean(e == e.astype(jnp.bfloat16).astype(jnp.float32)))


def rms(a) -> float:
  return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64)))))


def measure(preset: str, size: int, attention: str) -> dict:
  config = UNetConfig.preset(preset)
  schedule = ScheduleConfig.stable_diffusion()
  a = float(schedule.alphas_cumprod[T])
  z, t, ehs, added = inputs(config, size)
  f32 = UNet(config, attention=attention)
  bf16 = UNet(config, dtype=jnp.bfloat16, attention=attention)
  t0 = time.perf_counter()
  params = jax.jit(f32.init)(jax.random.key(1), z, t, ehs, added)["params"]
  h_f32 = jax.jit(lambda p: f32.apply({"params": p}, z, t, ehs, added, method=body))(params)
  head = jax.jit(lambda p, h: f32.apply({"params": p}, h, method=UNet.head))
  scale = rms(head(params, h_f32))  # unit-RMS prediction, as a trained eps at t = 999
  params["conv_out"] = jax.tree.map(lambda p: p / scale, params["conv_out"])
  eps_f32 = head(params, h_f32)
  h = jax.jit(lambda p: bf16.apply({"params": p}, z, t, ehs, added, method=body))(params)
  eps_after = jax.jit(lambda p, h: bf16.apply({"params": p}, h, method=UNet.head))(params, h)
  eps_before = jax.jit(old_head, static_argnums=2)(params, h, config)
  seconds = time.perf_counter() - t0
  assert eps_after.dtype == jnp.float32 and eps_before.dtype == jnp.bfloat16
  x0 = lambda e: x0_from_eps(z, e, a)
  ref = x0(eps_f32)
  return {"preset": preset, "size": size, "alpha_bar": a, "eps_rms": rms(eps_f32),
          "x0_rms": rms(ref), "before": rms(x0(eps_before) - ref),
          "after": rms(x0(eps_after) - ref),
          "rounding_only": rms(x0(eps_f32.astype(jnp.bfloat16)) - ref),
          "eps_before_vs_after": rms(eps_before.astype(jnp.float32) - eps_after),
          "lattice_before": on_bf16_lattice(eps_before), "lattice_after": on_bf16_lattice(eps_after),
          "seconds": seconds}


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--presets", nargs="+", default=["sd15", "sdxl_base"])
  p.add_argument("--size", type=int, default=64, help="latent height and width")
  p.add_argument("--attention", default="chunked", help="attention implementation (CPU memory)")
  args = p.parse_args()
  print(f"x0 at t={T} from one UNet call, bf16 compute vs fp32 (RMS differences); "
        f"{args.size}x{args.size} latents, batch 1; jax on {jax.devices()[0].platform} "
        f"({cpu_name()})")
  rows = []
  for preset in args.presets:
    r = measure(preset, args.size, args.attention)
    rows.append(r)
    print(f"  {preset}: done in {r['seconds']:.0f} s", flush=True)
  print("\n| UNet | alpha_bar(999) | x0 RMS | before (head bf16) | after (head fp32) "
        "| rounding only | eps on bf16's lattice, before / after |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['preset']} | {r['alpha_bar']:.5f} | {r['x0_rms']:.2f} | {r['before']:.2e} "
          f"| {r['after']:.2e} | {r['rounding_only']:.2e} "
          f"| {r['lattice_before']:.1%} / {r['lattice_after']:.1%} |")


if __name__ == "__main__":
  main()
