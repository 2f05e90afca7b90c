"""Cost of one regression-loss call, forward + backward: E-LatentLPIPS on 64x64x4 latents against
pixel LPIPS on the same latents decoded by the full SD VAE decoder to 512x512 (random weights).

  python benchmarks/perceptual_cost.py --batch 1 --repeats 5

Time: median of `--repeats` calls after `--warmup` calls, each a jitted `value_and_grad` with
respect to the first latent (the generator output), the second one a fixed target.
Memory: XLA's compiled memory analysis of that program (arguments + outputs + temporaries -
aliased; the temporaries are the activations and workspace), and the peak resident set size of
the process that measures that loss alone (each loss runs in its own fresh process; the figure
includes the Python / JAX runtime, about 0.5 GB, and compilation).
The paper (A100, PyTorch): 12.1 ms / 0.6 GB against 117 ms / 15 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp

from d2g_jax.losses import perceptual

GB = 1024 ** 3


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
  p.add_argument("--latent_size", type=int, default=64, help="latent side (x8 pixels)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype of the VGG and the VAE decoder (params stay fp32)")
  p.add_argument("--augment", default="bg", help="E-LatentLPIPS augmentation policy")
  p.add_argument("--only", default="", choices=("", "e_latent_lpips", "lpips"),
                 help="measure one loss in this process (default: each in its own subprocess)")
  p.add_argument("--json", default="", help="write the results here as JSON")
  p.add_argument("--record", default="", metavar="PATH",
                 help="append this run to PATH as one JSON line (benchmarks/results/*.jsonl; benchmarks/tables.py)")
  return p.parse_args(argv)


def build(name: str, args):
  """(loss_fn, params) with random weights."""
  dtype = jnp.dtype(args.dtype)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # random weights are the point here
    if name == "e_latent_lpips":
      return perceptual.build_loss(name, encoder="sd15", augment=args.augment, dtype=dtype,
                                   allow_random_weights=True)
    from d2g_jax.models.vae import AutoencoderKL, VAEConfig
    cfg = VAEConfig.sd()
    vae = AutoencoderKL(cfg, dtype=dtype)
    z = jnp.zeros((1, 8, 8, cfg.latent_channels))
    dec = jax.jit(lambda k: vae.init(k, z, method=AutoencoderKL.decode))(jax.random.PRNGKey(1))
    decode = lambda p, lat: vae.apply({"params": p}, cfg.unscale_latents(lat),
                                      method=AutoencoderKL.decode)
    return perceptual.build_loss("lpips", decode=decode, decoder_params=dec["params"],
                                 lpips_heads=None, dtype=dtype, allow_random_weights=True)


def measure(name: str, args) -> dict:
  loss_fn, params = build(name, args)
  shape = (args.batch, args.latent_size, args.latent_size, 4)
  a = jax.random.normal(jax.random.PRNGKey(2), shape)
  b = jax.random.normal(jax.random.PRNGKey(3), shape)
  key = jax.random.PRNGKey(4)
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=1))
  t0 = time.perf_counter()
  compiled = step.lower(params, a, b, key).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  for i in range(args.warmup):
    jax.block_until_ready(compiled(params, a, b, jax.random.fold_in(key, i)))
  times = []
  for i in range(args.repeats):
    k = jax.random.fold_in(key, 1000 + i)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, a, b, k))
    times.append(time.perf_counter() - t0)
  out = {"name": name, "median_s": statistics.median(times), "times_s": times,
         "compile_s": compile_s, "device": str(jax.devices()[0])}
  if mem is not None:
    out.update(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
               temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes)
    out["total_bytes"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                          + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  out["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  return out


def in_subprocess(name: str, args) -> dict:
  """`measure(name)` in a fresh process, so its peak RSS is that loss's alone."""
  cmd = [sys.executable, __file__, "--only", name, "--batch", str(args.batch),
         "--repeats", str(args.repeats), "--warmup", str(args.warmup),
         "--latent_size", str(args.latent_size), "--dtype", args.dtype, "--augment", args.augment,
         "--json", "/dev/stdout"]
  res = subprocess.run(cmd, capture_output=True, text=True)
  if res.returncode:
    raise RuntimeError(f"measuring {name} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])[name]


def report(r: dict) -> str:
  s = f"{r['name']:>15}: {1e3 * r['median_s']:9.1f} ms (median of {len(r['times_s'])})"
  if "total_bytes" in r:
    s += (f", XLA memory {r['total_bytes'] / GB:7.3f} GB (activations/temp "
          f"{r['temp_bytes'] / GB:.3f} GB, arguments {r['argument_bytes'] / GB:.3f} GB)")
  s += f", peak RSS {r['maxrss_bytes'] / GB:.2f} GB"
  return s


def main(argv=None):
  args = parse_args(argv)
  if args.only:
    results = {args.only: measure(args.only, args)}
  else:
    results = {name: in_subprocess(name, args) for name in ("e_latent_lpips", "lpips")}
  if args.json:
    with open(args.json, "w") as fh:
      fh.write(json.dumps(results) + "\n")
    if args.json == "/dev/stdout":
      return results
  size = args.latent_size
  print(f"device {jax.devices()[0]}, batch {args.batch}, latents {size}x{size}x4, pixels "
        f"{8 * size}x{8 * size}x3, compute {args.dtype}, forward+backward w.r.t. one input")
  for r in results.values():
    print(report(r))
  if len(results) == 2:
    e, p = results["e_latent_lpips"], results["lpips"]
    print(f"pixel LPIPS / E-LatentLPIPS: {p['median_s'] / e['median_s']:.1f}x time", end="")
    if "total_bytes" in e:
      print(f", {p['total_bytes'] / e['total_bytes']:.1f}x XLA memory, "
            f"{p['temp_bytes'] / e['temp_bytes']:.1f}x activations/temp", end="")
    print(f", {p['maxrss_bytes'] / e['maxrss_bytes']:.1f}x peak RSS", end="")
    print("  (paper, A100: 9.7x time, 25x memory; target >= 10x, >= 20x)")
  if args.record:
    from common import record
    losses = {}
    for name, r in results.items():
      losses[name] = {"seconds": r["median_s"], "peak_rss_gb": r["maxrss_bytes"] / GB,
                      "compile_s": r["compile_s"]}
      if "total_bytes" in r:
        losses[name].update(xla_memory_gb=r["total_bytes"] / GB, temp_gb=r["temp_bytes"] / GB)
    rec = {"batch": args.batch, "latent_size": args.latent_size, "dtype": args.dtype,
           "augment": args.augment, "repeats": args.repeats, "results": losses}
    if len(results) == 2:
      e, p = results["e_latent_lpips"], results["lpips"]
      rec["ratios"] = {"time": p["median_s"] / e["median_s"],
                       "peak_rss": p["maxrss_bytes"] / e["maxrss_bytes"]}
      if "total_bytes" in e:
        rec["ratios"].update(xla_memory=p["total_bytes"] / e["total_bytes"],
                             activations=p["temp_bytes"] / e["temp_bytes"])
    record(args.record, rec)
  return results


if __name__ == "__main__":
  main()
