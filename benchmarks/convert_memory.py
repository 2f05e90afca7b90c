"""Peak host memory of `python -m d2g_jax.convert` on the full SD 1.5 UNet (random weights).

    python benchmarks/convert_memory.py [--preset sd15] [--workdir /tmp/convmem]

Writes a random-weight diffusers UNet folder of the real architecture (3.4 GB fp32 for
SD 1.5), converts it to Orbax and back in child processes, and prints each child's peak
resident memory (ru_maxrss) as a multiple of the fp32 weight bytes. `--max-ratio`
makes it exit non-zero above that multiple.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from d2g_jax.convert import core
from d2g_jax.convert.unet import WEIGHTS_STEM, unet_table
from d2g_jax.models.unet_config import UNetConfig


def write_random_unet(preset: str, folder: str) -> int:
  """Streams random weights of `preset` to a diffusers folder; returns fp32 weight bytes."""
  config = UNetConfig.preset(preset)
  table, shapes = unet_table(config)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)),
                                  shapes)
  core.save_params_safetensors(table, params, os.path.join(folder, WEIGHTS_STEM + ".safetensors"))
  core.save_json(config.to_diffusers(), os.path.join(folder, "config.json"))
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="sd15")
  p.add_argument("--workdir", default=None)
  p.add_argument("--max-ratio", type=float, default=None)
  p.add_argument("--record", default="", metavar="PATH",
                 help="append this run to PATH as one JSON line (benchmarks/results/*.jsonl; benchmarks/tables.py)")
  args = p.parse_args()
  work = args.workdir or tempfile.mkdtemp(prefix="convmem_")
  src, ck, dst = (os.path.join(work, n) for n in ("src", "orbax", "dst"))
  for d in (src, ck, dst):
    shutil.rmtree(d, ignore_errors=True)
  os.makedirs(src)
  nbytes = write_random_unet(args.preset, src)
  print(f"{args.preset}: {nbytes / 2**30:.2f} GiB of fp32 weights")
  # The orbax -> diffusers child must peak above the first one for ru_maxrss of
  # RUSAGE_CHILDREN to isolate it, so run each direction in its own grandchild.
  py = [sys.executable, "-c",
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"]
  worst, rows = 0.0, []
  for name, cmd in (("diffusers -> orbax", ["to-orbax", "--diffusers", src, "--orbax", ck]),
                    ("orbax -> diffusers", ["to-diffusers", "--orbax", ck, "--diffusers", dst])):
    t0 = time.time()
    out = subprocess.run(py + [sys.executable, "-m", "d2g_jax.convert", *cmd], check=True,
                         capture_output=True, text=True).stdout
    peak = float(out.strip().splitlines()[-1]) * 1024.0
    ratio = peak / nbytes
    worst = max(worst, ratio)
    print(f"{name:20s} {time.time() - t0:7.1f} s   peak RSS {peak / 2**30:6.2f} GiB = "
          f"{ratio:.2f}x the fp32 weights")
    rows.append({"direction": name, "seconds": time.time() - t0, "peak_rss_gib": peak / 2**30,
                 "ratio": ratio})
  if not args.workdir:
    shutil.rmtree(work, ignore_errors=True)
  if args.record:
    from common import record
    record(args.record, {"preset": args.preset, "weights_gib": nbytes / 2**30, "rows": rows})
  if args.max_ratio is not None and worst > args.max_ratio:
    sys.exit(f"peak memory {worst:.2f}x exceeds --max-ratio {args.max_ratio}")


if __name__ == "__main__":
  main()
