"""UNet forward: our jitted Flax UNet vs diffusers' PyTorch UNet, same weights, same run.

    python benchmarks/unet_forward.py                       # SD 1.5, 64x64x4, batch 1 and 4, CPU fp32
    python benchmarks/unet_forward.py --dtype bfloat16 --attention xla cudnn --torch-compile  # GPU

Full SD 1.5 architecture (859,520,964 parameters) with random weights: diffusers builds
the PyTorch model, its weights are converted to our params, and both run the same
random latents, timestep and text embeddings. Prints the median of `--repeats` timed
runs after warm-up for each attention implementation of ours, PyTorch eager in
inference mode (and `torch.compile` with --torch-compile), the ratio, and the largest
output difference as a sanity check. The implementations are timed in turns with a 1 s
pause between calls (`common.interleaved_medians`), so a slow spell on a shared machine
hits all of them alike.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import interleaved_medians

from d2g_jax.convert import core
from d2g_jax.convert.unet import unet_table
from d2g_jax.models.unet import UNet
from d2g_jax.models.unet_config import UNetConfig


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="sd15")
  p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  p.add_argument("--size", type=int, default=64, help="latent height and width")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--attention", nargs="+", default=["xla", "chunked"])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
  p.add_argument("--record", default="", metavar="PATH",
                 help="append this run to PATH as one JSON line (benchmarks/results/*.jsonl; benchmarks/tables.py)")
  args = p.parse_args()

  from diffusers import UNet2DConditionModel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = getattr(torch, args.dtype)
  jdtype = jnp.dtype(args.dtype)
  config = UNetConfig.preset(args.preset)
  torch.manual_seed(0)
  ref = UNet2DConditionModel.from_config(config.to_diffusers()).eval()
  table, shapes = unet_table(config)
  params = core.to_flax(table, shapes, core.from_state_dict(ref.state_dict()),
                        dtype=jdtype, place=jax.device_put)
  ref = ref.to(device=device, dtype=tdtype)
  print(f"{args.preset}: {sum(x.numel() for x in ref.parameters()):,} parameters, "
        f"{args.size}x{args.size}x{config.in_channels} latents, {args.dtype}, "
        f"jax on {jax.devices()[0].platform}, torch on {device} ({torch.get_num_threads()} threads)")

  rows = []
  for batch in args.batch:
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, args.size, args.size, config.in_channels), np.float32)
    ctx = rng.standard_normal((batch, 77, config.cross_dims[0]), np.float32)
    t = np.full((batch,), 999.0, np.float32)
    added = None
    if config.addition_embed_type == "text_time":
      text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
      added = {"text_embeds": rng.standard_normal((batch, text_dim), np.float32),
               "time_ids": np.tile(np.float32([[1024, 1024, 0, 0, 1024, 1024]]), (batch, 1))}

    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device, tdtype)
    tctx = torch.from_numpy(ctx).to(device, tdtype)
    tt = torch.from_numpy(t).to(device)
    kw = {}
    if added:
      kw["added_cond_kwargs"] = {k: torch.from_numpy(v).to(device, tdtype) for k, v in added.items()}

    def torch_fn(model):
      def run():
        with torch.inference_mode():
          out = model(tx, tt, tctx, **kw).sample
        if device == "cuda":
          torch.cuda.synchronize()
        return out
      return run

    runs = {"diffusers (PyTorch eager)": torch_fn(ref)}
    ref_out = runs["diffusers (PyTorch eager)"]().float().cpu().numpy().transpose(0, 2, 3, 1)
    if args.torch_compile:
      runs["diffusers (torch.compile)"] = torch_fn(torch.compile(ref))
      runs["diffusers (torch.compile)"]()  # compiles
    notes = {}
    xs = [jnp.asarray(a) for a in (x, t, ctx)]
    for impl in args.attention:
      module = UNet(config, dtype=jdtype, param_dtype=jdtype, attention=impl)
      fwd = jax.jit(lambda p_, a, b, c, d, module=module: module.apply({"params": p_}, a, b, c, d))
      run = lambda fwd=fwd: fwd(params, *xs, added).block_until_ready()
      t0 = time.perf_counter()
      out = run()
      compile_s = time.perf_counter() - t0
      err = float(np.abs(np.asarray(out, np.float32) - ref_out).max() / np.abs(ref_out).max())
      name = f"d2g_jax attention={impl}"
      runs[name] = run
      notes[name] = f"max rel diff {err:.1e}, first call {compile_s:.0f}s"
    for name in runs:
      runs[name]()  # warm-up: every side has run once before timing
    for name, secs in interleaved_medians(runs, args.repeats).items():
      rows.append((batch, name, secs, notes.get(name, "")))

  print(f"\n{'batch':>5}  {'implementation':30s} {'median s':>9}  {'vs PyTorch eager':>16}  notes")
  eager = {b: s for b, name, s, _ in rows if name.startswith("diffusers (PyTorch eager")}
  for batch, name, secs, extra in rows:
    ratio = eager[batch] / secs
    print(f"{batch:>5}  {name:30s} {secs:9.3f}  {ratio:15.2f}x  {extra}")
  print("\n(ratio > 1: faster than PyTorch eager)")
  if args.record:
    import re

    from common import record
    out = []
    for batch, name, secs, extra in rows:
      row = {"batch": batch, "implementation": name, "seconds": secs,
             "vs_pytorch_eager": eager[batch] / secs}
      diff = re.search(r"max rel diff (\S+),", extra)
      if diff:
        row["max_rel_diff"] = float(diff.group(1))
      out.append(row)
    record(args.record, {"preset": args.preset, "latent_size": args.size, "dtype": args.dtype,
                         "repeats": args.repeats, "rows": out})


if __name__ == "__main__":
  main()
