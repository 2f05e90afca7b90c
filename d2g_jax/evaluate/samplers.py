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
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import numpy as np

from d2g_jax import dtypes, student
from d2g_jax.data import teacher_pairs
from d2g_jax.models import generator as generator_lib
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
  dtype = dtypes.get(config.teacher.dtype, "config.teacher.dtype")
  return load_teacher(path, dtype=dtype, param_dtype=dtype, components=("unet", "vae", "text"),
                      attention=config.teacher.attention)


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
  shape = _size(config, teacher)
  f = teacher.info.vae.downscale
  encode_fn, generate_fn, params = teacher_pairs.teacher_fns(
      teacher, guidance_scale=row.guidance_scale, num_steps=row.num_steps,
      height=shape[0] * f, width=shape[1] * f, negative_prompt=row.negative_prompt,
      store_embeddings=False)
  meta = {"source": "ddim", **_folder_meta(path, teacher), "num_steps": int(row.num_steps),
          "guidance_scale": float(row.guidance_scale), "negative_prompt": row.negative_prompt}
  return Sampler(encode_fn, generate_fn, params, teacher, shape, meta)


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
  generator = student.one_step_generator(teacher)
  meta = {"source": "one_step", **_folder_meta(row.path, teacher),
          "timestep": generator.timestep, "prediction_type": generator.prediction_type}
  return generator_sampler(teacher, generator, teacher.unet_params, meta, _size(config, teacher))


@source("checkpoint")
def checkpoint_sampler(row, config, name: str) -> Sampler:
  """The EMA generator of a training run's latest checkpoint, with the teacher folder's text
  encoders, tokenizers and VAE (`row.path`: the checkpoints folder, '' = the workdir's)."""
  folder = row.path or config.train.checkpoint_dir
  teacher = _load(config.teacher.path, config, name)
  trained, params, step = student.load_checkpoint(config, folder, "ema")
  generator = generator_lib.Generator(teacher.unet, teacher.schedule, trained.timestep,
                                      trained.parameterization)
  meta = {"source": "checkpoint", "checkpoints": os.path.abspath(folder), "step": int(step),
          **_folder_meta(config.teacher.path, teacher), "timestep": generator.timestep,
          "prediction_type": generator.prediction_type}
  return generator_sampler(teacher, generator, params, meta, _size(config, teacher))
