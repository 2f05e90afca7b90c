"""Images from a student (and its teacher, from the same noise) on the command line.

    python -m d2g_jax.sample --model /tmp/d2g_demo/export --prompt "a handwritten digit 7" \\
        --num 4 --seed 0 --out /tmp/sevens
    python -m d2g_jax.sample --model /runs/sd15 --prompts captions.txt --num 2 --seed 10 \\
        --out /tmp/cmp --teacher /models/sd15 --teacher_steps 50 --guidance 3

--model is an exported diffusers folder or a training workdir (EMA weights of the latest
checkpoint; --weights / --step pick others). Every prompt gets --num images, with seeds
--seed, --seed + 1, ...: one seed is one noise (`d2g_jax.sample.api.seed_noise`), so
`--seed 12 --num 1` redraws the image of seed 12. Writes into --out:

  student/00000.png ...   the student's images (one step)
  images.jsonl            one line per image: file, sampler, prompt, seed, model (+ steps and
                          guidance for the teacher's)
  teacher/00000.png ...   with --teacher: its --teacher_steps-step DDIM images with CFG
                          --guidance, from the same noise
  grid.png                with --teacher: student beside teacher, one labelled row per image
                          (the first --grid_rows)
  speed.json              each sampler's images per second (compiling not included)
  */latents.npy           with --latents: float32 NxhxwxC, what the VAE decoded

A user's mistake (a missing folder, a teacher folder given as --model) prints one `error:`
line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from d2g_jax import grid, log
from d2g_jax.data.prompts import load_prompts
from d2g_jax.files import save_json
from d2g_jax.sample import api

_log = log.get_logger("d2g_jax.sample")  # not "__main__" when run with python -m


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m d2g_jax.sample", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True,
                 help="an exported diffusers folder or a training workdir")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts", default="", help="a prompt file: .txt (one a line) or .jsonl")
  p.add_argument("--num", type=int, default=1, help="images per prompt")
  p.add_argument("--seed", type=int, default=0, help="the first image's seed")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--teacher", default="", help="a diffusers pipeline folder to compare with")
  p.add_argument("--teacher_steps", type=int, default=api.DEFAULT_TEACHER_STEPS)
  p.add_argument("--guidance", type=float, default=api.DEFAULT_GUIDANCE,
                 help="the teacher's classifier-free guidance scale")
  p.add_argument("--negative_prompt", default="", help="the teacher's negative prompt")
  p.add_argument("--weights", default="ema", choices=["ema", "generator"],
                 help="a workdir's weights: the EMA or the trained generator")
  p.add_argument("--step", type=int, default=None, help="a workdir's checkpoint (default: latest)")
  p.add_argument("--batch_size", type=int, default=api.DEFAULT_BATCH,
                 help="images per compiled call at most")
  p.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
  p.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--latents", action="store_true", help="also write each sampler's latents.npy")
  p.add_argument("--grid_rows", type=int, default=16, help="rows of grid.png at most")
  return p.parse_args(argv)


def prompt_list(args) -> list[str]:
  prompts = list(args.prompt) + (load_prompts(args.prompts) if args.prompts else [])
  if not prompts:
    raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
  if args.num < 1:
    raise ValueError(f"--num={args.num}; expected at least 1 image per prompt")
  return prompts


def write_images(out_dir: str, sampler: api.ImageSampler, samples: api.Samples,
                 model: str, latents: bool) -> list[dict]:
  """PNGs (and latents.npy) of one sampler in out_dir/<name>/; its images.jsonl lines."""
  folder = os.path.join(out_dir, sampler.name)
  os.makedirs(folder, exist_ok=True)
  extra = {k: sampler.meta[k] for k in ("num_steps", "guidance_scale") if k in sampler.meta}
  lines = []
  for i, (prompt, seed, image) in enumerate(zip(samples.prompts, samples.seeds, samples.images)):
    name = f"{sampler.name}/{i:05d}.png"
    grid.save_png(image, os.path.join(out_dir, name))
    lines.append({"file": name, "sampler": sampler.name, "prompt": prompt, "seed": seed,
                  "model": os.path.abspath(model), **extra})
  if latents:
    np.save(os.path.join(folder, "latents.npy"), samples.latents)
  return lines


def speed(samples: api.Samples) -> dict:
  return {"images": len(samples.images), "seconds": samples.seconds,
          "images_per_second": samples.images_per_second,
          "compile_seconds": samples.compile_seconds}


def comparison_grid(results: dict, rows: int) -> np.ndarray:
  """Student beside teacher, one labelled row per image, zoomed to >= 192 pixels a side."""
  s, t = results["student"][1], results["teacher"][1]
  rows = min(rows, len(s.images))
  zoom = max(1, -(-192 // s.images.shape[1]))
  big = lambda x: np.repeat(np.repeat(x[:rows], zoom, axis=1), zoom, axis=2)
  image = grid.grid_image([np.stack(pair) for pair in zip(big(s.images), big(t.images))])
  meta = results["teacher"][0].meta
  shorten = lambda text: text if len(text) <= 40 else text[:37] + "..."
  return grid.labelled(image, ["student, 1 step", f"teacher, {meta['num_steps']} steps + CFG "
                               f"{meta['guidance_scale']:g}"],
                       [f"{shorten(p)} (seed {seed})" for p, seed in zip(s.prompts, s.seeds)][:rows])


def run(args) -> dict:
  """Samples and writes everything; returns {"student": speed, "teacher": speed, ...}."""
  prompts = prompt_list(args)
  every = [(p, args.seed + k) for p in prompts for k in range(args.num)]
  size = dict(height=args.height, width=args.width, dtype=args.dtype, batch_size=args.batch_size)
  samplers = [(api.load_student(args.model, weights=args.weights, step=args.step, **size),
               args.model)]
  if args.teacher:
    samplers.append((api.load_teacher_sampler(
        args.teacher, num_steps=args.teacher_steps, guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt, **size), args.teacher))
  os.makedirs(args.out, exist_ok=True)
  results, lines = {}, []
  for sampler, model in samplers:
    samples = sampler([p for p, _ in every], seeds=[s for _, s in every])
    results[sampler.name] = (sampler, samples)
    lines += write_images(args.out, sampler, samples, model, args.latents)
    _log.info("%s (%s): %d images in %.3f s, %.3g images/s (compiled first in %.1f s) -> %s",
              sampler.name, model, len(samples.images), samples.seconds,
              samples.images_per_second, samples.compile_seconds,
              os.path.join(args.out, sampler.name))
  with open(os.path.join(args.out, "images.jsonl"), "w") as fh:
    fh.writelines(json.dumps(line) + "\n" for line in lines)
  report = {name: speed(samples) for name, (_, samples) in results.items()}
  if args.teacher:
    grid.save_png(comparison_grid(results, args.grid_rows), os.path.join(args.out, "grid.png"))
    report["student_speedup"] = (report["student"]["images_per_second"]
                                 / report["teacher"]["images_per_second"])
    _log.info("the student makes %.3g x the teacher's images per second; side by side: %s",
              report["student_speedup"], os.path.join(args.out, "grid.png"))
  save_json(report, os.path.join(args.out, "speed.json"))
  return report


def main(argv=None) -> int:
  args = parse_args(argv)
  log.setup()
  try:
    run(args)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
