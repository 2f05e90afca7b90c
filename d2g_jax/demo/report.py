"""Stage demo_report: the digits demo's picture and numbers (`demo.png`, `metrics.json`).

Legend: N samples, H/W/C latent, S pixels a side.

For every digit d and `demo.samples_per_digit` noises z (the same for all three samplers):
  teacher_50  the teacher's 50-step DDIM with CFG (the pairs' sampler and guidance),
  teacher_1   the teacher's one-step result at the generator's timestep (G at initialisation),
  student_1   the distilled generator (EMA weights of the last checkpoint), one step,
decoded by the teacher's VAE and judged by a digit classifier fit on the real digits
(independent of every model of the demo). metrics.json holds, per sampler, the fraction
classified as the prompted digit and the diversity (mean pairwise RMS distance in [-1, 1]
pixels between samples of one prompt, averaged over digits); the student-teacher distance
(E-LatentLPIPS with the demo's own latent VGG, mean of `demo.lpips_draws` augmentation
draws, and latent MSE, against teacher_50) before (= teacher_1) and after distillation;
the exported diffusers folder's one-step output against ours; seconds per stage. demo.png has
a header over each sampler's columns and the prompt at the left of each row (PIL's default
font). The stage's last log line is the command that opens the web page (`d2g_jax.app`) on
the exported student beside its teacher.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import time

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax import grid, student
from d2g_jax.data.pairs import batch_noise
from d2g_jax.data.teacher_pairs import latent_shape, teacher_fns
from d2g_jax.demo import classifier, digits
from d2g_jax.files import load_json, save_json
from d2g_jax.log import get_logger
from d2g_jax.models.generator import Generator
from d2g_jax.models.vae import decode_latents
from d2g_jax.teacher import load_teacher

_log = get_logger(__name__)
SAMPLERS = ("teacher_50", "teacher_1", "student_1")
STAGE_SECONDS = "stage_seconds.json"


def _decode(teacher):
  decode = jax.jit(functools.partial(decode_latents, teacher.vae))
  return lambda lat: np.asarray(decode(teacher.vae_params, lat))


def diversity(images_DxKxSxSx3: np.ndarray) -> float:
  """Mean over digits of the mean pairwise RMS distance between the K samples of a digit."""
  x = np.asarray(images_DxKxSxSx3, np.float64)
  d, k = x.shape[:2]
  flat = x.reshape(d, k, -1)
  dist = np.sqrt(np.mean((flat[:, :, None] - flat[:, None, :]) ** 2, axis=-1))  # D x K x K
  return float(np.mean(dist.sum(axis=(1, 2)) / (k * (k - 1))))


def _export_check(config, prompts, z_NxHxWxC, ours_NxHxWxC) -> float:
  """Max |diffusers one-step export - ours| / max |ours| for the same prompts and noise."""
  import diffusers
  import torch
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(config.export.out_dir)
  pipe.set_progress_bar_config(disable=True)
  h = z_NxHxWxC.shape[1] * (2 ** (len(pipe.vae.config.block_out_channels) - 1))
  latents = torch.from_numpy(np.ascontiguousarray(np.asarray(z_NxHxWxC).transpose(0, 3, 1, 2)))
  with torch.no_grad():
    ref = pipe(list(prompts), num_inference_steps=1, guidance_scale=1.0, height=h, width=h,
               latents=latents, output_type="latent").images.numpy().transpose(0, 2, 3, 1)
  ours = np.asarray(ours_NxHxWxC)
  return float(np.abs(ref - ours).max() / max(np.abs(ours).max(), 1e-12))


def _lpips(config):
  from d2g_jax.losses import perceptual
  loss_fn, params = perceptual.loss_from_config(config.loss)
  n = config.demo.lpips_draws
  fn = jax.jit(lambda a, b: jnp.mean(jnp.stack([
      loss_fn(params, a, b, jax.random.key(i)) for i in range(n)])))
  return lambda a, b: float(fn(a, b))


def run_report(config) -> dict:
  """The demo_report stage; returns the metrics (also written to <workdir>/metrics.json)."""
  c, dg = config.demo, config.digits
  out_metrics = os.path.join(config.workdir, "metrics.json")
  picture = os.path.join(config.workdir, "demo.png")
  t0 = time.time()
  teacher = load_teacher(config.teacher.path, components=("unet", "vae", "text"))
  _, params, step = student.load_checkpoint(config, config.train.checkpoint_dir, "ema")
  stamp = {"checkpoint_step": int(step), "samples_per_digit": int(c.samples_per_digit),
           "seed": int(c.seed)}
  if os.path.isfile(out_metrics) and os.path.isfile(picture):
    old = load_json(out_metrics, "demo metrics")
    if old.get("inputs") == stamp:
      _log.info("%s and %s are up to date (checkpoint %d); nothing to do", picture, out_metrics,
               step)
      _log.info("the student in a web page: %s", app_command(config))
      return old

  k = c.samples_per_digit
  prompt_list = [p for p in digits.prompts(dg.prompt) for _ in range(k)]  # digit-major
  labels = np.repeat(np.arange(digits.NUM_CLASSES), k)
  shape = latent_shape(teacher)
  z = batch_noise(c.seed, jnp.arange(len(prompt_list)), shape)
  encode_fn, generate_fn, tparams = teacher_fns(
      teacher, guidance_scale=config.pairs.guidance_scale, num_steps=config.pairs.num_steps,
      store_embeddings=True)
  tokens = encode_fn(prompt_list)
  out = jax.jit(generate_fn)(tparams, z, tokens)
  cond = {"encoder_hidden_states": out["prompt_embeds"].astype(jnp.float32)}
  gen = Generator(teacher.unet, teacher.schedule, config.generator.timestep,
                  config.generator.parameterization)
  apply = jax.jit(gen.apply)
  lat = {"teacher_50": out["x"], "teacher_1": apply(teacher.unet_params, z, cond),
         "student_1": apply(params, z, cond)}
  decode = _decode(teacher)
  px = {name: decode(v) for name, v in lat.items()}

  train, _ = digits.load(dg.image_size, dg.held_out, dg.split_seed)
  clf = classifier.fit(train.images_NxHxWx3, train.labels_N)
  d = digits.NUM_CLASSES
  lpips = _lpips(config)
  mse = lambda a, b: float(jnp.mean(jnp.square(a - b)))
  metrics = {
      "accuracy": {n: classifier.accuracy(clf, px[n], labels) for n in SAMPLERS},
      "diversity": {n: diversity(px[n].reshape(d, k, *px[n].shape[1:])) for n in SAMPLERS},
      "distance_to_teacher": {"before": lpips(lat["teacher_1"], lat["teacher_50"]),
                              "after": lpips(lat["student_1"], lat["teacher_50"])},
      "mse_to_teacher": {"before": mse(lat["teacher_1"], lat["teacher_50"]),
                         "after": mse(lat["student_1"], lat["teacher_50"])},
      "export_check_max_rel_error": _export_check(config, prompt_list[::k], z[::k],
                                                  lat["student_1"][::k]),
      "inputs": stamp,
  }
  shown = min(k, c.columns)
  columns = [px[n].reshape(d, k, *px[n].shape[1:])[:, j] for n in SAMPLERS for j in range(shown)]
  image = grid.columns_image(columns, pad=1)
  image = np.repeat(np.repeat(image, c.zoom, axis=0), c.zoom, axis=1)
  image = grid.labelled(image, column_headers(config), digits.prompts(dg.prompt),
                        font_size=6 * c.zoom)
  os.makedirs(config.workdir, exist_ok=True)
  grid.save_png(image, picture)
  seconds_path = os.path.join(config.workdir, STAGE_SECONDS)
  seconds = load_json(seconds_path, "stage timings") if os.path.isfile(seconds_path) else {}
  seconds["demo_report"] = time.time() - t0
  seconds["total"] = sum(v for key, v in seconds.items() if key != "total")
  metrics["seconds"] = seconds
  save_json(metrics, out_metrics)
  _log.info("demo.png (rows: digits 0-9; columns: %d x %s) -> %s", shown,
           " | ".join(column_headers(config)), picture)
  _log.info("accuracy %s; diversity %s; E-LatentLPIPS to the teacher %.4f -> %.4f",
           json.dumps({n: round(v, 3) for n, v in metrics["accuracy"].items()}),
           json.dumps({n: round(v, 3) for n, v in metrics["diversity"].items()}),
           metrics["distance_to_teacher"]["before"], metrics["distance_to_teacher"]["after"])
  _log.info("the student in a web page: %s", app_command(config))
  return metrics


def column_headers(config) -> list[str]:
  """demo.png's header over each sampler's columns (SAMPLERS' order)."""
  return [f"teacher, {config.pairs.num_steps} steps + CFG {config.pairs.guidance_scale:g}",
          "teacher, 1 step", "student, 1 step"]


def app_command(config) -> str:
  """The command that opens the web page on the exported student beside its teacher, sampled
  as the pairs were (steps, guidance), starting with the prompt of digit 7."""
  return shlex.join([
      "python", "-m", "d2g_jax.app", "--model", config.export.out_dir, "--teacher",
      config.teacher.path, "--teacher_steps", str(config.pairs.num_steps), "--guidance",
      f"{config.pairs.guidance_scale:g}", "--prompt", digits.prompts(config.digits.prompt)[7]])
