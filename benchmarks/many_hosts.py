"""Each stage's wall time as 1 process x 4 CPU devices against 2 processes x 2 devices.

    python benchmarks/many_hosts.py --record benchmarks/results/many_hosts_<machine>.jsonl
    python benchmarks/many_hosts.py --layouts 1x4 2x2 4x1 --stages pairs,train

Runs `launch/local.sh N D -- --config tests/multihost_config.py ...` (a tiny SD 1 teacher,
pairs, train, export, eval; the variants `:gdd` and `:latent_vgg` with `--variant`) once per
layout, in a fresh workdir each, the layouts in turns, and reads each run's
`<workdir>/stage_seconds.json` (process 0's wall time per stage, compiling included: what a
user waits for). XLA's optimisations are on, no compilation cache. All processes share this
machine's cores, so the 2 x 2 layout pays for gloo (TCP on loopback) where 1 x 4 sums in
memory; on real hosts each process has its own. The point is that the multi-host path costs
no more than it must, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import cpu_name, record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def make_inputs(folder: str, variant: str) -> list[str]:
  """The tiny teacher, prompts and (per variant) images the config needs; its flags."""
  from d2g_jax import tiny
  teacher = os.path.join(folder, "teacher")
  tiny.build("sd1", teacher)
  prompts = os.path.join(folder, "prompts.txt")
  with open(prompts, "w") as fh:
    fh.write("".join(f"a photo of {i} cats\n" for i in range(16)))
  flags = [f"--config.teacher.path={teacher}", f"--config.pairs.prompts={prompts}"]
  if variant == "gdd":
    import numpy as np
    from PIL import Image
    images = os.path.join(folder, "images")
    os.makedirs(images)
    for i in range(8):
      rng = np.random.default_rng(i)
      Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(f"{images}/{i:02d}.png")
      with open(f"{images}/{i:02d}.txt", "w") as fh:
        fh.write(f"a photo of {i % 3} cats\n")
    flags.append(f"--config.real.images=captioned:{images}")
  elif variant == "latent_vgg":
    import latent_vgg_data as D
    images = D.make_image_folder(os.path.join(folder, "images"), per_class=4)
    flags += [f"--config.latent_vgg.vae={teacher}/vae", f"--config.latent_vgg.cache.train=folder:{images}",
              f"--config.latent_vgg.cache.eval=folder:{images}",
              f"--config.latent_vgg.cache.bapps={D.make_bapps(os.path.join(folder, 'bapps'), per_family=4)}"]
  return flags


def run_layout(layout: str, workdir: str, variant: str, flags: list[str]) -> dict:
  n, d = layout.split("x")
  config = os.path.join(ROOT, "tests", "multihost_config.py") + (f":{variant}" if variant else "")
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  cmd = [os.path.join(ROOT, "launch", "local.sh"), n, d, "--", f"--config={config}",
         f"--config.workdir={workdir}", *flags]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{layout} failed:\n{out.stderr[-4000:]}")
  with open(os.path.join(workdir, "stage_seconds.json")) as fh:
    return json.load(fh)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layouts", nargs="+", default=["1x4", "2x2"])
  parser.add_argument("--variant", default="", choices=["", "gdd", "latent_vgg"])
  parser.add_argument("--record", default="")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="d2g_many_hosts_") as tmp:
    flags = make_inputs(tmp, args.variant)
    seconds = {layout: run_layout(layout, os.path.join(tmp, layout), args.variant, flags)
               for layout in args.layouts}
  base = args.layouts[0]
  print(f"{cpu_name()}, {os.cpu_count()} cores; seconds per stage (compiling included)")
  print(f"{'stage':<22}" + "".join(f"{layout:>10}" for layout in args.layouts) + "   ratio to " + base)
  for stage in seconds[base]:
    times = [seconds[layout][stage] for layout in args.layouts]
    ratios = " ".join(f"{t / times[0]:.2f}x" for t in times[1:])
    print(f"{stage:<22}" + "".join(f"{t:>10.1f}" for t in times) + f"   {ratios}")
  if args.record:
    record(args.record, {"variant": args.variant, "layouts": args.layouts, "seconds": seconds})


if __name__ == "__main__":
  main()
