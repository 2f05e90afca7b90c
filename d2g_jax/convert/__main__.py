"""Command line: diffusers UNet folder <-> Orbax checkpoint of its Flax params.

    python -m d2g_jax.convert to-orbax --diffusers sd15/unet --orbax ckpt/unet
    python -m d2g_jax.convert to-diffusers --orbax ckpt/unet --diffusers out/unet [--dtype float16]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from d2g_jax.convert import orbax_io
from d2g_jax.convert.unet import load_unet, save_unet
from d2g_jax.models.unet import UNet
from d2g_jax.models.unet_config import UNetConfig


def _bar(desc: str):
  return lambda it: tqdm(it, desc=desc, unit="tensor", total=None, dynamic_ncols=True)


def to_orbax(args):
  t0 = time.time()
  module, params = load_unet(args.diffusers, param_dtype=jnp.dtype(args.param_dtype),
                             variant=args.variant, progress=_bar("reading " + args.diffusers),
                             place=jax.device_put)
  print(f"saving Orbax checkpoint to {args.orbax} ...", file=sys.stderr)
  orbax_io.save(args.orbax, params, "unet", module.config.to_diffusers(), args.overwrite)
  print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)


def to_diffusers(args):
  t0 = time.time()
  params, component, config = orbax_io.load(args.orbax)
  if component != "unet":
    raise SystemExit(f"{args.orbax} holds a {component!r}, not a UNet")
  module = UNet(UNetConfig.from_diffusers(config, source=f"{args.orbax}/config"))
  save_unet(module, params, args.diffusers, dtype=jnp.dtype(args.dtype) if args.dtype else None,
            progress=_bar("writing " + args.diffusers))
  print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m d2g_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("to-orbax", help="diffusers UNet folder -> Orbax checkpoint")
  a.add_argument("--diffusers", required=True, help="UNet folder (config.json + weights)")
  a.add_argument("--orbax", required=True, help="output checkpoint folder (must not exist)")
  a.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
  a.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  a.add_argument("--overwrite", action="store_true")
  a.set_defaults(fn=to_orbax)
  b = sub.add_parser("to-diffusers", help="Orbax checkpoint -> diffusers UNet folder")
  b.add_argument("--orbax", required=True)
  b.add_argument("--diffusers", required=True, help="output UNet folder")
  b.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                 help="weights dtype on disk (default: as stored)")
  b.set_defaults(fn=to_diffusers)
  args = p.parse_args(argv)
  args.fn(args)


if __name__ == "__main__":
  main()
