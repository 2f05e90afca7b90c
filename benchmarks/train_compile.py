"""Compile the train step and the pair sampler ahead of time for a TPU topology, on this host.

  pip install -e '.[tpu]'       # libtpu: the TPU compiler, no TPU needed
  python benchmarks/train_compile.py --config configs/sd15.py --topology v5p:4x4x4 \\
      --mesh data=8,fsdp=8 --per_chip_batch 16 [--programs train,train_r1,ddim_step,ddim_scan]
      [--set train.attention=xla --set train.remat=True ...] [--search] [--json out.json]

Builds every input abstractly (`jax.ShapeDtypeStruct`s with `NamedSharding`s on a mesh
of the topology's devices: no weights allocated), compiles with XLA's TPU compiler and
prints per chip: argument, output and temporary bytes against the chip's HBM, HLO FLOPs,
model FLOPs, the compiler's estimated seconds per call and the implied model-FLOPs
utilisation against the chip's bf16 peak (d2g_jax/aot/report.py says how each is
computed). Estimated times are the compiler's cost model, not measurements.

Programs: `train` / `train_r1` (the whole Diffusion2GAN step, D then G, R1 off / on, as
the trainer jits it), its halves `d_step` / `d_step_r1` / `g_step` (compiled apart they need
about half the host memory; the step's time is their sum), `ddim_step` / `ddim_scan` (the
pairs stage's teacher: one DDIM step with CFG, and the whole `pairs.num_steps` scan).
`--hlo_dir` keeps each compiled program's optimised HLO; `--project runs.jsonl` compiles
nothing and prints the paper's recipe's wall time from earlier `--json` records. `--search` finds the largest per-chip
batch of the train programs that fits. `--topology cpu:8` compiles for this host's CPU
devices instead (no libtpu; no HBM or time model). Compiles of the full SD 1.5 step take
minutes; the output is flushed as each program finishes.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from common import cpu_name  # noqa: E402

import d2g_jax  # noqa: E402,F401  (XLA flags before JAX starts)
from d2g_jax import parallel  # noqa: E402
from d2g_jax.aot import programs as progs_lib  # noqa: E402
from d2g_jax.aot import report, target

TRAIN, SAMPLER = progs_lib.TRAIN_PROGRAMS, ("ddim_step", "ddim_scan")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/sd15.py", help="config file[:arg]")
  p.add_argument("--model", default="", choices=("", *progs_lib.MODELS),
                 help="UNet preset and latent size ('' = from config.loss.encoder)")
  p.add_argument("--topology", default="v5p:2x2x1", help="e.g. v5p:4x4x4, or cpu[:N]")
  p.add_argument("--mesh", default="", help="data=..,fsdp=.. ('' = config.mesh)")
  p.add_argument("--per_chip_batch", type=int, default=16)
  p.add_argument("--sampler_batch", type=int, default=0, help="pairs per chip ('0' = same)")
  p.add_argument("--programs", default="train,train_r1,ddim_step,ddim_scan")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. train.remat=True (Python literal or string)")
  p.add_argument("--search", action="store_true", help="largest per-chip train batch that fits")
  p.add_argument("--search_limit", type=int, default=256)
  p.add_argument("--json", default="", help="append one JSON line per run to this file")
  p.add_argument("--hlo_dir", default="", help="write each compiled program's optimised HLO here")
  p.add_argument("--project", default="", metavar="RUNS.jsonl",
                 help="compile nothing: the paper's recipe's wall time from the records of "
                      "earlier runs (--json) of this model on this topology")
  return p.parse_args(argv)


def _hours(seconds):
  return f"{seconds / 3600:.1f} h"


def project(path: str, model: str, n_chips: int) -> dict:
  """`report.project_recipe` over every record of `model` on `n_chips` chips in `path`."""
  if not os.path.isfile(path):
    raise SystemExit(f"--project {path}: no such file; write one with --json runs.jsonl first")
  results = []
  with open(path) as fh:
    for i, line_ in enumerate(fh, 1):
      try:
        rec = json.loads(line_) if line_.strip() else None
      except json.JSONDecodeError as e:
        raise SystemExit(f"--project {path}: line {i} is not a JSON record of --json ({e}); "
                         "remove it (a run killed while writing?)") from None
      if rec and rec["model"] == model and rec["devices"] == n_chips:
        results += rec["results"]
  if not results:
    raise SystemExit(f"{path}: no record of {model} on {n_chips} chips; run the compiles "
                     "with --json first")
  p = report.project_recipe(results, n_chips)
  print(f"the paper's recipe for {model} on {n_chips} chips (compiler estimates, not "
        f"measurements): {p['pairs']:,} pairs at {p['ddim_steps']} DDIM steps with CFG, then "
        f"{p['train_steps']:,} train steps")
  if "pairs_seconds" in p:
    print(f"  pairs  {_hours(p['pairs_seconds'])}")
  if "train_seconds" in p:
    print(f"  train  {_hours(p['train_seconds'])} (global batch {p['global_batch']})")
  if "total_seconds" in p:
    print(f"  total  {_hours(p['total_seconds'])}")
  for note in p["notes"]:
    print(f"  note: {note}")
  return p


def load_config(spec: str, overrides: list[str]):
  path, _, arg = spec.partition(":")
  module = importlib.util.spec_from_file_location("run_config", path)
  mod = importlib.util.module_from_spec(module)
  module.loader.exec_module(mod)
  config = mod.get_config(arg) if arg else mod.get_config()
  for item in overrides:
    key, _, raw = item.partition("=")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node, *path_keys = key.split(".")
    holder = config
    for k in [node] + path_keys[:-1]:
      holder = holder[k]
    holder[path_keys[-1] if path_keys else node] = value
  return config


def _gb(x):
  return f"{x / 1e9:6.2f}"


def line(r: dict, chip) -> str:
  if not r["fits"] and "peak_bytes" not in r:
    return (f"  {r['program']:10s} batch/chip {r['per_chip_batch']:4d}  DOES NOT FIT: "
            f"{r['error']}  (compile {r['compile_s']:.0f} s)")
  est = r.get("est_seconds")
  s = (f"  {r['program']:10s} batch/chip {r['per_chip_batch']:4d}  GB/chip args {_gb(r['argument_bytes'])}"
       f" out {_gb(r['output_bytes'])} (aliased {_gb(r['alias_bytes'])}) temp {_gb(r['temp_bytes'])}"
       f" peak {_gb(r['peak_bytes'])}")
  if chip:
    s += f" = {100 * r['hbm_fraction']:.0f}% of {chip.hbm_bytes / 1e9:.0f}"
  s += (f" | TFLOP/chip HLO {r['hlo_flops'] / 1e12:.2f} model {r['model_flops'] / 1e12:.2f}")
  if est is not None:
    loops = f" loops x{r['loop_scale']:.0f}" if round(r.get("loop_scale", 1.0), 3) != 1 else ""
    s += (f" | est {1e3 * est:.1f} ms (compiler {1e3 * r['optimal_seconds']:.1f}{loops}"
          f" + kernels {1e3 * r['kernel_seconds']:.1f})")
  if "mfu" in r:
    s += f" MFU {100 * r['mfu']:.1f}%"
  return s + f" | compile {r['compile_s']:.0f} s"


def main(argv=None):
  args = parse_args(argv)
  config = load_config(args.config, args.set)
  model = progs_lib.MODELS[args.model] if args.model else progs_lib.model_of(config)
  devices = target.devices(args.topology)
  chip = target.chip(args.topology)
  if args.project:
    return project(args.project, model.preset, len(devices))
  if args.search and chip is None:
    raise SystemExit(f"--search needs a TPU topology with a known chip ({sorted(target.CHIPS)})")
  axes = target.parse_axes(args.mesh) if args.mesh else {"data": config.mesh.data,
                                                         "fsdp": config.mesh.fsdp}
  mesh = parallel.make_mesh(axes, devices)
  sampler_mesh = parallel.make_mesh({"data": -1}, devices)
  plat = target.platform(args.topology)
  names = [n for n in args.programs.split(",") if n]
  unknown = set(names) - set(TRAIN + SAMPLER)
  if unknown:
    raise SystemExit(f"--programs: unknown {sorted(unknown)}; choose from {TRAIN + SAMPLER}")
  n = len(devices)
  chip_text = (f"{chip.name} HBM {chip.hbm_bytes / 1e9:.0f} GB, bf16 peak "
               f"{chip.bf16_flops / 1e12:.0f} TFLOP/s ({chip.source})" if chip else "no chip model")
  print(f"{model.preset} ({model.latent}x{model.latent} latents) on {args.topology}: {n} "
        f"{devices[0].device_kind} devices, train mesh {dict(mesh.shape)}; {chip_text}"
        f"; compiled on {cpu_name()}", flush=True)
  results = []

  def train_at(b, which):
    prog = {p.name: p for p in progs_lib.train_programs(
        config, model, mesh, b, platform=plat, variants=which)}
    return [report.compile_report(prog[w], chip, n, args.hlo_dir) for w in which]

  train_names = [w for w in names if w in TRAIN]
  if train_names:
    for r in train_at(args.per_chip_batch, train_names):
      results.append(r)
      print(line(r, chip), flush=True)
  if args.search:
    which = train_names[0] if train_names else "train"
    print(f"batch search ({which}):", flush=True)

    def one(b):
      r = train_at(b, [which])[0]
      print(line(r, chip), flush=True)
      return r
    best, searched = report.largest_fitting(one, args.per_chip_batch, chip.hbm_bytes,
                                            limit=args.search_limit)
    print(f"  largest per-chip batch that fits: {best}", flush=True)
    results.append({"program": "search", "largest_per_chip_batch": best, "reports": searched})
  sampler_names = [w for w in names if w in SAMPLER]
  if sampler_names:
    sb = args.sampler_batch or args.per_chip_batch
    for prog in progs_lib.sampler_programs(config, model, sampler_mesh, sb, platform=plat):
      if prog.name in sampler_names:
        r = report.compile_report(prog, chip, n, args.hlo_dir)
        results.append(r)
        print(line(r, chip), flush=True)
  if args.json:
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
              "model": model.preset, "devices": n, "mesh": dict(mesh.shape),
              "chip": chip.__dict__ if chip else None, "cpu": cpu_name(),
              "jax": jax.__version__, "results": results}
    with open(args.json, "a") as fh:
      fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  main()
