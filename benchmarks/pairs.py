"""Pair generation throughput: our teacher sampling against diffusers' PyTorch pipeline.

    python benchmarks/pairs.py                                   # CPU, fp32, batch 1, 2 steps (~5 min)
    python benchmarks/pairs.py --batch 1 2 --attention chunked xla
    python benchmarks/pairs.py --dtype bfloat16 --steps 10 --batch 1 8      # GPU (auto: cuDNN)

One pair = tokenise + CLIP ViT-L/14 text encoder + `--steps` DDIM steps with
classifier-free guidance 3 (two UNet evaluations a step, batched) from 64x64x4 noise:
the work of the pairs stage (`teacher_pairs.teacher_fns`). Full SD 1.5 architecture
(UNet 859,520,964 parameters, text encoder 123,060,480), random weights: diffusers
and transformers build the PyTorch models, their weights are converted to our params,
and both sides sample the same noise and prompts. PyTorch runs
`StableDiffusionPipeline(..., output_type="latent")` with a DDIMScheduler in
`torch.inference_mode`. Each time is the median of `--repeats` runs after one warm-up
(and, for JAX, after compiling), all sides timed in turns with a 1 s pause between
calls (`common.interleaved_medians`: a slow spell on a shared machine hits them alike);
pairs/s at 50 steps scales that time by 50 / steps (text encoding is scaled with it, so
slightly pessimistic for both). The largest
difference between the two sides' final latents, relative to their scale, is printed
as a sanity check. As in the stage, our empty negative prompt is encoded once, up front;
diffusers encodes it at every call (one more text-encoder pass, small next to the UNet).
On a CPU shared with other jobs torch's threads can stall each other: `--torch-threads 1 2`
times both. `--tiny` runs tiny models (a smoke test of this script, seconds).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import interleaved_medians

from d2g_jax.convert import clip as clip_convert
from d2g_jax.convert import core
from d2g_jax.convert.pipeline import PipelineInfo
from d2g_jax.convert.unet import unet_table
from d2g_jax.data.teacher_pairs import teacher_fns
from d2g_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from d2g_jax.models.unet import UNet
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.models.vae import VAEConfig
from d2g_jax.sampling import ScheduleConfig
from d2g_jax.teacher import Teacher, TextEncoder
from d2g_jax.tiny import make_tokenizer

SD15_SCHEDULER = {  # stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
PROMPTS = ["a photo of the cat", "the cat of the cat", "a cat", "the photo of a cat"]
GUIDANCE = 3.0


def configs(tiny: bool) -> tuple[UNetConfig, CLIPTextConfig, int]:
  """(UNet config, text encoder config, latent side): SD 1.5, or a tiny smoke-test model."""
  if not tiny:
    return UNetConfig.preset("sd15"), CLIPTextConfig.vit_l14(), 64
  return UNetConfig.preset("tiny_sd15"), CLIPTextConfig(
      vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=2), 16


def torch_models(unet_cfg: UNetConfig, clip_cfg: CLIPTextConfig):
  """Random-weight diffusers UNet and transformers CLIP text encoder (fp32), and a
  CLIP-style tokenizer (a small BPE vocabulary: the encoder's cost does not depend on ids)."""
  import diffusers
  import transformers
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel.from_config(unet_cfg.to_diffusers())
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_cfg.to_transformers()))
  tokenizer = make_tokenizer("<|endoftext|>")
  tokenizer.model_max_length = clip_cfg.max_position_embeddings
  return unet.eval(), text.eval(), tokenizer


def jax_params(unet_cfg, clip_cfg, unet_t, text_t, dtype):
  """The PyTorch models' weights as our params, on the default device."""
  table, shapes = unet_table(unet_cfg)
  unet_params = core.to_flax(table, shapes, core.from_state_dict(unet_t.state_dict()),
                             dtype=dtype, place=jax.device_put)
  clip_params = jax.device_put(clip_convert.params_from_state_dict(
      clip_cfg, text_t.state_dict(), dtype=dtype))
  return unet_params, clip_params


def jax_teacher(unet_cfg, clip_cfg, params, tokenizer, dtype, attention: str) -> Teacher:
  """A Teacher from in-memory params (no pipeline folder)."""
  unet_params, clip_params = params
  info = PipelineInfo(path="<random weights>", class_name="StableDiffusionPipeline",
                      family="sd1", model_index={}, unet=unet_cfg, vae=VAEConfig.sd(),
                      text_encoders=(("text_encoder", clip_cfg),), tokenizers=("tokenizer",),
                      force_zeros_for_empty_prompt=False)
  encoder = TextEncoder("text_encoder", tokenizer,
                        CLIPTextModel(clip_cfg, dtype=dtype, param_dtype=dtype), clip_params,
                        use_attention_mask=False)
  schedule = ScheduleConfig.from_diffusers(SD15_SCHEDULER).with_sd_pipeline_fixes()
  unet = UNet(unet_cfg, dtype=dtype, param_dtype=dtype, attention=attention)
  return Teacher(info, schedule, unet, unet_params, text_encoders=[encoder])


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, nargs="+", default=[1], help="pairs per call")
  p.add_argument("--steps", type=int, default=2, help="DDIM steps timed (scaled to 50)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--attention", nargs="+", default=["auto"],
                 help="our UNet attention kernels to time: auto (chunked on CPU, cuDNN on GPU in "
                      "bf16), xla, chunked, cudnn")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--torch-threads", type=int, nargs="+", default=[0],
                 help="torch CPU threads to time (0: torch's default); on a busy CPU one "
                      "thread can beat two: the speed-up is against the fastest")
  p.add_argument("--no-torch", action="store_true", help="time ours only")
  p.add_argument("--tiny", action="store_true", help="tiny models, 16x16 latents (smoke test)")
  p.add_argument("--record", default="", metavar="PATH",
                 help="append this run to PATH as one JSON line (benchmarks/results/*.jsonl; benchmarks/tables.py)")
  args = p.parse_args()

  import diffusers
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype, jdtype = getattr(torch, args.dtype), jnp.dtype(args.dtype)
  unet_cfg, clip_cfg, side = configs(args.tiny)
  unet_t, text_t, tokenizer = torch_models(unet_cfg, clip_cfg)
  params = jax_params(unet_cfg, clip_cfg, unet_t, text_t, jdtype)
  teachers = {a: jax_teacher(unet_cfg, clip_cfg, params, tokenizer, jdtype, a)
              for a in args.attention}
  del params
  vae_scale = VAEConfig.sd().downscale
  pipe = diffusers.StableDiffusionPipeline(
      vae=None, text_encoder=text_t.to(device, tdtype), tokenizer=tokenizer,
      unet=unet_t.to(device, tdtype),
      scheduler=diffusers.DDIMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  default_threads = torch.get_num_threads()
  print(f"{'tiny' if args.tiny else 'SD 1.5'} architecture, random weights; {side}x{side}x4 "
        f"latents, {args.steps} DDIM steps, "
        f"CFG {GUIDANCE}, {args.dtype}; jax on {jax.devices()[0].platform}, torch on {device} "
        f"({default_threads} threads by default); median of {args.repeats} after warm-up")

  rows = []
  for batch in args.batch:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    z = np.random.default_rng(batch).standard_normal((batch, side, side, 4)).astype(np.float32)
    ref = None
    latents = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).to(device, tdtype)

    def torch_run():
      with torch.inference_mode():
        out = pipe(prompt=prompts, latents=latents, height=side * vae_scale,
                   width=side * vae_scale, num_inference_steps=args.steps,
                   guidance_scale=GUIDANCE, output_type="latent").images
      if device == "cuda":
        torch.cuda.synchronize()
      return out

    runs, notes = {}, {}
    for threads in [] if args.no_torch else args.torch_threads:
      def run_with(threads=threads or default_threads):
        torch.set_num_threads(threads)
        return torch_run()
      name = f"diffusers ({threads or default_threads} threads)"
      runs[name], notes[name] = run_with, ""
      ref = run_with().float().cpu().numpy().transpose(0, 2, 3, 1)  # also the warm-up

    for attention, teacher in teachers.items():
      encode_fn, generate_fn, params = teacher_fns(teacher, guidance_scale=GUIDANCE,
                                                   num_steps=args.steps,
                                                   height=side * vae_scale,
                                                   width=side * vae_scale)
      generate = jax.jit(generate_fn)
      run = (lambda generate=generate, encode_fn=encode_fn, params=params:
             generate(params, z, encode_fn(prompts))["x"].block_until_ready())
      t0 = time.perf_counter()
      x = np.asarray(run(), np.float32)
      name = f"d2g_jax attention={attention}"
      notes[name] = f"first call (compile) {time.perf_counter() - t0:.0f} s"
      if ref is not None:
        err = np.abs(x - ref).max() / np.abs(ref).max()
        notes[name] += f", max diff vs diffusers {err:.1e} of scale"
      runs[name] = run
      print(f"  batch {batch}: {name}: {notes[name]}", flush=True)

    for name, secs in interleaved_medians(runs, args.repeats).items():
      rows.append((batch, name, secs, notes[name]))
      print(f"  batch {batch}: {name} {secs:.2f} s", flush=True)
    torch.set_num_threads(default_threads)

  print(f"\n{'batch':>5}  {'implementation':30s} {'s/call':>8} {'pairs/s @50 steps':>18} "
        f"{'speed-up':>9}  notes")
  torch_secs = {}
  for b, name, secs, _ in rows:
    if name.startswith("diffusers"):
      torch_secs[b] = min(secs, torch_secs.get(b, secs))
  for batch, name, secs, note in rows:
    per_50 = secs * 50 / args.steps
    ratio = f"{torch_secs[batch] / secs:8.2f}x" if batch in torch_secs else "       -"
    print(f"{batch:>5}  {name:30s} {secs:8.2f} {batch / per_50:18.4f} {ratio:>9}  {note}")
  print("\n(speed-up: the fastest diffusers PyTorch time / ours, for the same work; > 1: ours "
        "is faster)")
  if args.record:
    import re

    from common import record
    out = []
    for batch, name, secs, note in rows:
      row = {"batch": batch, "implementation": name, "seconds": secs,
             "pairs_per_s_at_50": batch / (secs * 50 / args.steps)}
      if batch in torch_secs and not name.startswith("diffusers"):
        row["speedup"] = torch_secs[batch] / secs
      diff = re.search(r"max diff vs diffusers (\S+) of scale", note)
      if diff:
        row["max_rel_diff"] = float(diff.group(1))
      out.append(row)
    record(args.record, {"model": "tiny" if args.tiny else "sd15", "steps": args.steps,
                         "guidance_scale": GUIDANCE, "dtype": args.dtype,
                         "repeats": args.repeats, "rows": out})


if __name__ == "__main__":
  main()
