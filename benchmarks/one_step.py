"""One-step student vs the teacher's 50-step CFG sampling: images per second, same run.

    python benchmarks/one_step.py             # CPU, fp32, SD 1.5, batch 1, teacher at 2 steps
    python benchmarks/one_step.py --dtype bfloat16 --teacher-steps 50 --batch 1 8   # GPU
    python benchmarks/one_step.py --tiny                 # tiny models: a smoke test (seconds)
    python benchmarks/one_step.py --model /tmp/d2g_demo/export --teacher /tmp/d2g_demo/teacher \
        --teacher-steps 50 --guidance 4 --prompt "a handwritten digit 7" --batch 1 8   # trained

Without --model: the full SD 1.5 architecture with random weights (UNet 859,520,964
parameters, CLIP ViT-L/14 text encoder, the SD VAE decoder), 64x64x4 latents = 512x512
images. Both samplers are the eval stage's (`evaluate.samplers`), each one jit:
  student  tokens -> text encoder -> the UNet once at t = 999 (eps -> x0): `Generator`
  teacher  tokens -> text encoder -> `--teacher-steps` DDIM steps with CFG 3 (the
           conditional and unconditional branches in one UNet call of batch 2B)
  decode   latents -> VAE decoder -> 8-bit pixels (the same for both)
The three are timed in turns (`common.interleaved_medians`, median of `--repeats` after
compiling and one warm-up). Seconds per image:
  student = student + decode;  teacher = teacher x 50 / teacher-steps + decode.
When `--teacher-steps` < 50 the teacher's 50-step time is its measured time scaled per
step (the text encoder, ~1% of one step, is scaled along: slightly pessimistic for the
teacher). On a CPU, 50 real steps of the full UNet take ~10 minutes, hence the default
of 2; on a GPU run `--teacher-steps 50`. The ratio is printed for latents alone and for
decoded images.

With --model (an exported student folder or a training workdir) and --teacher (its teacher's
pipeline folder): trained models through the sampling API (`d2g_jax.sample`), end to end as a
user calls it: prompts and seeds in, uint8 images out (tokenising, text encoder, the UNet once
or `--teacher-steps` DDIM steps with CFG `--guidance`, all of them run, VAE decode, copying
back), the same seeds for both, timed in turns; images per second of each and their ratio.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import cpu_name, interleaved_medians
from pairs import GUIDANCE, PROMPTS, SD15_SCHEDULER

from d2g_jax.convert.pipeline import PipelineInfo
from d2g_jax.data.teacher_pairs import teacher_fns
from d2g_jax.evaluate.resize import to_pixels
from d2g_jax.evaluate.samplers import generator_sampler
from d2g_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from d2g_jax.models.generator import Generator
from d2g_jax.models.unet import UNet
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.models.vae import AutoencoderKL, VAEConfig
from d2g_jax.sampling import ScheduleConfig
from d2g_jax.teacher import Teacher, TextEncoder
from d2g_jax.tiny import make_tokenizer


def random_params(module, *args, seed: int = 0, scale: float = 0.02, dtype=np.float32):
  """Random params of `module` without running its init: shapes from eval_shape, values
  N(0, scale^2) drawn with numpy (the full UNet's jitted init alone takes minutes on CPU)."""
  shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)["params"]
  rng = np.random.default_rng(seed)
  draw = lambda s: jax.device_put((scale * rng.standard_normal(s.shape)).astype(dtype))
  return jax.tree.map(draw, shapes)


def build_teacher(tiny: bool, dtype) -> tuple[Teacher, int]:
  """A Teacher from random weights (no pipeline folder): SD 1.5, or tiny models."""
  if tiny:
    unet_cfg, vae_cfg, side = UNetConfig.preset("tiny_sd15"), VAEConfig.tiny(), 16
    clip_cfg = CLIPTextConfig(vocab_size=64, hidden_size=24, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=2)
  else:
    unet_cfg, vae_cfg, side = UNetConfig.preset("sd15"), VAEConfig.sd(), 64
    clip_cfg = CLIPTextConfig.vit_l14()
  tokenizer = make_tokenizer("<|endoftext|>")
  tokenizer.model_max_length = clip_cfg.max_position_embeddings
  S, E = clip_cfg.max_position_embeddings, clip_cfg.hidden_size
  unet = UNet(unet_cfg, dtype=dtype, param_dtype=dtype)
  x = jnp.zeros((1, side, side, unet_cfg.in_channels))
  unet_params = random_params(unet, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, S, E)),
                              dtype=dtype)
  text = CLIPTextModel(clip_cfg, dtype=dtype, param_dtype=dtype)
  text_params = random_params(text, jnp.zeros((1, S), jnp.int32), seed=1, dtype=dtype)
  vae = AutoencoderKL(vae_cfg, dtype=dtype, param_dtype=dtype)
  vae_params = random_params(vae, jnp.zeros((1, side * vae_cfg.downscale,
                                             side * vae_cfg.downscale, 3)), seed=2, dtype=dtype)
  info = PipelineInfo(path="<random weights>", class_name="StableDiffusionPipeline", family="sd1",
                      model_index={}, unet=unet_cfg, vae=vae_cfg,
                      text_encoders=(("text_encoder", clip_cfg),), tokenizers=("tokenizer",),
                      force_zeros_for_empty_prompt=False)
  encoder = TextEncoder("text_encoder", tokenizer, text, text_params, use_attention_mask=False)
  schedule = ScheduleConfig.from_diffusers(SD15_SCHEDULER).with_sd_pipeline_fixes()
  return Teacher(info, schedule, unet, unet_params, vae, vae_params, [encoder]), side


def trained(args):
  """--model / --teacher: the sampling API on trained folders, images per second of each."""
  from d2g_jax.sample import load_student, load_teacher_sampler
  student = load_student(args.model, dtype=args.dtype, batch_size=max(args.batch))
  teacher = load_teacher_sampler(args.teacher, num_steps=args.teacher_steps,
                                 guidance_scale=args.guidance, dtype=args.dtype,
                                 batch_size=max(args.batch))
  h, w, c = student.latent_shape
  f = student.sampler.teacher.info.vae.downscale
  cpu = cpu_name() if jax.devices()[0].platform == "cpu" else ""
  print(f"student {args.model} (1 step) vs teacher {args.teacher} ({args.teacher_steps} DDIM "
        f"steps, CFG {args.guidance:g}), {args.dtype}; {h}x{w}x{c} latents -> {h * f}x{w * f} "
        f"images, decoded; prompt {args.prompt!r}; jax on {jax.devices()[0].device_kind} {cpu}; "
        f"median of {args.repeats}, timed in turns", flush=True)
  recorded = []
  for batch in args.batch:
    seeds = list(range(batch))
    calls = {"student": lambda: student(args.prompt, seeds=seeds),
             "teacher": lambda: teacher(args.prompt, seeds=seeds)}
    for name, call in calls.items():
      first = call()
      print(f"  batch {batch}: {name} compiled in {first.compile_seconds:.1f} s", flush=True)
    secs = interleaved_medians(calls, args.repeats)
    rate = {name: batch / secs[name] for name in calls}
    speedup = secs["teacher"] / secs["student"]
    print(f"\nbatch {batch}: student {secs['student']:.4f} s ({rate['student']:.4g} images/s), "
          f"teacher {secs['teacher']:.4f} s ({rate['teacher']:.4g} images/s): the student makes "
          f"{speedup:.1f}x the teacher's images per second ({cpu or jax.devices()[0].device_kind})",
          flush=True)
    recorded.append({"batch": batch, "seconds": secs, "student_img_per_s": rate["student"],
                     "teacher_img_per_s": rate["teacher"], "speedup": speedup})
  if args.record:
    from common import record
    record(args.record, {"model": args.label or args.model, "student": args.model,
                         "teacher": args.teacher, "dtype": args.dtype,
                         "teacher_steps": args.teacher_steps, "guidance_scale": args.guidance,
                         "image_size": [h * f, w * f], "prompt": args.prompt,
                         "repeats": args.repeats, "rows": recorded,
                         **({"note": args.note} if args.note else {})})


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, nargs="+", default=[1], help="images per call")
  p.add_argument("--teacher-steps", type=int, default=None,
                 help="DDIM steps of the teacher actually run (random weights: its 50-step time "
                      "is scaled; default 2; with --model: default 50)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--tiny", action="store_true", help="tiny models, 16x16 latents (smoke test)")
  p.add_argument("--model", default="", help="a trained student: an exported folder or a workdir")
  p.add_argument("--teacher", default="", help="with --model: its teacher's pipeline folder")
  p.add_argument("--guidance", type=float, default=GUIDANCE, help="with --model: the teacher's CFG")
  p.add_argument("--prompt", default=PROMPTS[0], help="with --model: the prompt of every image")
  p.add_argument("--label", default="", help="with --model: the model's name in the record")
  p.add_argument("--note", default="", help="with --model: a remark kept in the record")
  p.add_argument("--record", default="", metavar="PATH",
                 help="append this run to PATH as one JSON line (benchmarks/results/*.jsonl; benchmarks/tables.py)")
  args = p.parse_args()
  if bool(args.model) != bool(args.teacher):
    p.error("--model and --teacher go together (a trained student and its teacher's folder)")
  if args.model:
    args.teacher_steps = args.teacher_steps or 50
    return trained(args)
  args.teacher_steps = args.teacher_steps or 2

  dtype = jnp.dtype(args.dtype)
  teacher, side = build_teacher(args.tiny, dtype)
  f = teacher.info.vae.downscale
  shape = (side, side, teacher.info.unet.in_channels)
  _, teacher_fn, teacher_params = teacher_fns(teacher, guidance_scale=GUIDANCE,
                                              num_steps=args.teacher_steps,
                                              height=side * f, width=side * f)
  student = generator_sampler(teacher, Generator(teacher.unet, teacher.schedule, 999),
                              teacher.unet_params, {}, shape)
  decode = lambda params, x: to_pixels(teacher.vae.apply(
      {"params": params}, teacher.info.vae.unscale_latents(x), method=AutoencoderKL.decode))
  jitted = {"student": (jax.jit(student.generate_fn), student.params),
            "teacher": (jax.jit(teacher_fn), teacher_params),
            "decode": (jax.jit(decode), teacher.vae_params)}
  cpu = cpu_name() if jax.devices()[0].platform == "cpu" else ""
  print(f"{'tiny' if args.tiny else 'SD 1.5'} architecture, random weights, {args.dtype}; "
        f"{side}x{side}x4 latents -> {side * f}x{side * f} images; teacher {args.teacher_steps} "
        f"DDIM steps timed (CFG {GUIDANCE}), student 1 UNet call; jax on "
        f"{jax.devices()[0].device_kind} {cpu}; median of {args.repeats}, timed in turns")

  recorded = []
  for batch in args.batch:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    tokens = student.encode_fn(prompts)
    z = jnp.asarray(np.random.default_rng(batch).standard_normal((batch,) + shape), jnp.float32)
    x = jnp.zeros((batch,) + shape, jnp.float32)
    calls = {
        "student": lambda: jitted["student"][0](jitted["student"][1], z, tokens)["x"],
        "teacher": lambda: jitted["teacher"][0](jitted["teacher"][1], z, tokens)["x"],
        "decode": lambda: jitted["decode"][0](jitted["decode"][1], x)}
    runs = {}
    for name, call in calls.items():
      t0 = time.perf_counter()
      call().block_until_ready()
      print(f"  batch {batch}: {name} compiled and ran in {time.perf_counter() - t0:.0f} s",
            flush=True)
      runs[name] = lambda call=call: call().block_until_ready()
    secs = interleaved_medians(runs, args.repeats)
    teacher50 = secs["teacher"] * 50 / args.teacher_steps
    per_image = {"student": (secs["student"] + secs["decode"]) / batch,
                 "teacher": (teacher50 + secs["decode"]) / batch}
    print(f"\nbatch {batch}: student {secs['student']:.3f} s, teacher {args.teacher_steps} steps "
          f"{secs['teacher']:.3f} s (x 50/{args.teacher_steps} = {teacher50:.2f} s), "
          f"decode {secs['decode']:.3f} s per call")
    print(f"  latents: student {batch / secs['student']:.4f} img/s, teacher (50-step CFG) "
          f"{batch / teacher50:.5f} img/s: one step is {teacher50 / secs['student']:.1f}x faster")
    print(f"  images (with VAE decode): student {1 / per_image['student']:.4f} img/s "
          f"({per_image['student']:.3f} s/img), teacher {1 / per_image['teacher']:.5f} img/s "
          f"({per_image['teacher']:.2f} s/img): one step is "
          f"{per_image['teacher'] / per_image['student']:.1f}x faster", flush=True)
    recorded.append({
        "batch": batch, "seconds": secs, "teacher_50_step_s": teacher50,
        "latents": {"student_img_per_s": batch / secs["student"],
                    "teacher_img_per_s": batch / teacher50,
                    "speedup": teacher50 / secs["student"]},
        "images": {"student_s_per_image": per_image["student"],
                   "teacher_s_per_image": per_image["teacher"],
                   "speedup": per_image["teacher"] / per_image["student"]}})
  if args.record:
    from common import record
    record(args.record, {"model": "tiny" if args.tiny else "sd15", "dtype": args.dtype,
                         "teacher_steps": args.teacher_steps, "guidance_scale": GUIDANCE,
                         "repeats": args.repeats, "rows": recorded})


if __name__ == "__main__":
  main()
