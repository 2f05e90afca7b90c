"""Where an evaluation row's samples come from: one function per source, chosen by name.

Legend: B batch, H/W/C latent height/width/channels.

A row of the evaluation table is a config block (`config.eval.<row>`) whose `source`
names a function of `SOURCES`; it returns a `Sampler`:

  source     reads                                   samples
  "ddim"     a diffusers pipeline folder (teacher)   N-step DDIM (eta 0) with CFG `guidance_scale`:
                                                     the pairs stage's teacher (`teacher_fns`)
  "one_step" a pipeline folder written by            the student G(z, c): its UNet once at the
             `convert.pipeline.export_pipeline`      scheduler's single (trailing) timestep, read
                                                     as x0 per its `prediction_type`
                                                     (`models.generator.Generator`)
  "checkpoint" a training run's checkpoints folder   the same, with the EMA weights of its latest
             ('' = <workdir>/checkpoints) and the    checkpoint (only those are read), the
             teacher folder (`teacher.path`)          config's `generator` block

Every sampler takes the same noise: sample i starts from `data.pairs.pair_noise(seed, i)`,
so the teacher's and the student's i-th samples share z and prompt, as fidelity needs.
A new source is one more decorated function: build the
`Generator` and its params, then return `generator_sampler(folder_teacher, generator,
unet_params, meta)` (the teacher folder supplies text encoders, tokenizers and VAE).

Each source builds its sampler with a function that takes loaded folders instead of config
blocks (`folder_ddim_sampler`, `folder_one_step_sampler`, `trained_sampler`): `d2g_jax.sample`
(the sampling API, CLI and web page) builds the same samplers through them.
`decode_pixels(sampler, vae_params, x)` turns any sampler's latents into 8-bit pixels.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import numpy as np

from d2g_jax import dtypes, student
from d2g_jax.data import teacher_pairs
from d2g_jax.evaluate.resize import to_pixels
from d2g_jax.models import generator as generator_lib
from d2g_jax.models.vae import decode_latents
from d2g_jax.teacher import Teacher, load_teacher


@dataclasses.dataclass
class Sampler:
  """What the eval stage needs from a row: tokens on the host, latents on devices, a VAE.

  encode_fn(prompts) -> {"input_ids", "attention_mask"[, "_2" keys]}: int32 numpy.
  generate_fn(params, z_BxHxWxC, tokens) -> {"x": BxHxWxC fp32}: pure, traceable.
  """
  encode_fn: Callable[[Sequence[str]], dict[str, np.ndarray]]
  generate_fn: Callable[[Any, Any, dict], dict]
  params: Any
  teacher: Teacher  # the folder's VAE (and configs) decode the latents
  latent_shape: tuple[int, int, int]
  meta: dict  # JSON: what made these samples (part of the resume check)


SOURCES: dict[str, Callable[..., Sampler]] = {}


def source(name: str):
  def register(fn):
    SOURCES[name] = fn
    return fn
  return register


def make_sampler(row, config, name: str) -> Sampler:
  """The sampler of row block `row` (`config.eval.<name>`)."""
  if row.source not in SOURCES:
    raise ValueError(f"config.eval.{name}.source={row.source!r}; available sources: "
                     f"{', '.join(SOURCES)}")
  return SOURCES[row.source](row, config, name)


def _load(path: str, config, name: str) -> Teacher:
  if not path:
    raise ValueError(f"config.eval.{name}.path is empty; give a diffusers pipeline folder")
  return load_folder(path, dtypes.get(config.teacher.dtype, "config.teacher.dtype"),
                     config.teacher.attention)


def load_folder(path: str, dtype, attention: str = "auto") -> Teacher:
  """A pipeline folder with what a sampler needs (UNet, VAE, text encoders and tokenizers),
  computing and storing its weights in `dtype`."""
  return load_teacher(path, dtype=dtype, param_dtype=dtype, components=("unet", "vae", "text"),
                      attention=attention)


def _size(config, teacher: Teacher) -> tuple[int, int, int]:
  return teacher_pairs.latent_shape(teacher, config.eval.height or None, config.eval.width or None)


def _folder_meta(path: str, teacher: Teacher) -> dict:
  return {"path": os.path.abspath(path), "family": teacher.family,
          "fingerprint": teacher_pairs.teacher_fingerprint(path)}


@source("ddim")
def ddim_sampler(row, config, name: str) -> Sampler:
  """A pipeline folder sampled with `row.num_steps` DDIM steps and guidance `row.guidance_scale`."""
  path = row.path or config.teacher.path
  teacher = _load(path, config, name)
  return folder_ddim_sampler(path, teacher, _size(config, teacher), num_steps=row.num_steps,
                             guidance_scale=row.guidance_scale,
                             negative_prompt=row.negative_prompt)


def folder_ddim_sampler(path: str, teacher: Teacher, latent_shape: tuple[int, int, int], *,
                        num_steps: int, guidance_scale: float,
                        negative_prompt: str = "") -> Sampler:
  """The teacher folder `path` (loaded as `teacher` with its UNet, VAE and text encoders):
  `num_steps` DDIM steps (eta 0) with classifier-free guidance `guidance_scale`."""
  f = teacher.info.vae.downscale
  encode_fn, generate_fn, params = teacher_pairs.teacher_fns(
      teacher, guidance_scale=guidance_scale, num_steps=num_steps,
      height=latent_shape[0] * f, width=latent_shape[1] * f, negative_prompt=negative_prompt,
      store_embeddings=False)
  meta = {"source": "ddim", **_folder_meta(path, teacher), "num_steps": int(num_steps),
          "guidance_scale": float(guidance_scale), "negative_prompt": negative_prompt}
  return Sampler(encode_fn, generate_fn, params, teacher, latent_shape, meta)


def generator_sampler(teacher: Teacher, generator: generator_lib.Generator, unet_params,
                      meta: dict, latent_shape: tuple[int, int, int]) -> Sampler:
  """A one-step generator with `teacher`'s text encoders, tokenizers and VAE."""
  sdxl = teacher.family == "sdxl"
  f = teacher.info.vae.downscale
  time_ids_1x6 = teacher.time_ids(1, latent_shape[0] * f, latent_shape[1] * f)
  encode_tokens, text_params = teacher.encode_tokens_fn()

  def generate_fn(params, z_BxHxWxC, tokens):
    cond = generator_lib.condition(tokens, sdxl=sdxl, time_ids_1x6=time_ids_1x6,
                                   text_params=params["text"], encode_tokens=encode_tokens)
    return {"x": generator.apply(params["unet"], z_BxHxWxC, cond)}

  return Sampler(teacher.tokenize, generate_fn, {"unet": unet_params, "text": text_params},
                 teacher, latent_shape, meta)


@source("one_step")
def one_step_sampler(row, config, name: str) -> Sampler:
  """An exported student pipeline folder: G = its UNet at the one-step scheduler's timestep."""
  teacher = _load(row.path, config, name)
  return folder_one_step_sampler(row.path, teacher, _size(config, teacher))


def folder_one_step_sampler(path: str, teacher: Teacher,
                            latent_shape: tuple[int, int, int]) -> Sampler:
  """The exported student folder `path` (loaded as `teacher`, all of its components)."""
  generator = student.one_step_generator(teacher)
  meta = {"source": "one_step", **_folder_meta(path, teacher),
          "timestep": generator.timestep, "prediction_type": generator.prediction_type}
  return generator_sampler(teacher, generator, teacher.unet_params, meta, latent_shape)


@source("checkpoint")
def checkpoint_sampler(row, config, name: str) -> Sampler:
  """The EMA generator of a training run's latest checkpoint, with the teacher folder's text
  encoders, tokenizers and VAE (`row.path`: the checkpoints folder, '' = the workdir's)."""
  teacher = _load(config.teacher.path, config, name)
  return trained_sampler(config, teacher, row.path or config.train.checkpoint_dir,
                         _size(config, teacher))


def trained_sampler(config, teacher: Teacher, checkpoints: str,
                    latent_shape: tuple[int, int, int], weights: str = "ema",
                    step: int | None = None) -> Sampler:
  """The generator of a training run's checkpoint (`weights` of `step`, default the EMA of the
  latest) in `checkpoints`; `teacher` is `config.teacher.path` loaded with all its components
  (its UNet's dtype and attention, its text encoders and VAE)."""
  trained, params, step = student.load_checkpoint(config, checkpoints, weights, step)
  generator = generator_lib.Generator(teacher.unet, teacher.schedule, trained.timestep,
                                      trained.parameterization)
  meta = {"source": "checkpoint", "checkpoints": os.path.abspath(checkpoints), "step": int(step),
          **_folder_meta(config.teacher.path, teacher), "timestep": generator.timestep,
          "prediction_type": generator.prediction_type}
  if weights != "ema":  # the eval stage's rows (its resume check) keep the EMA's meta as it was
    meta["weights"] = weights
  return generator_sampler(teacher, generator, params, meta, latent_shape)


def decode_pixels(sampler: Sampler, vae_params, x_BxHxWxC):
  """Latents -> 8-bit pixel values (floats in [0, 255]) with the sampler's VAE. Pure."""
  return to_pixels(decode_latents(sampler.teacher.vae, vae_params, x_BxHxWxC))
