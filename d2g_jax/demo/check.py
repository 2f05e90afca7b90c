"""How often a digits teacher draws the digit its prompt asks for (the demo's quality gate).

    result = check.teacher_accuracy(config)   # config.teacher.path, config.digits.*
    result.accuracy, result.images_NxHxWx3, result.labels_N

Loads the pipeline folder with `load_teacher` (as every later stage does), samples
`check_per_digit` images per digit with the pair stage's DDIM + CFG sampler
(`teacher_fns`: `check_steps` steps, eta 0, guidance `check_guidance`), decodes them
with the folder's VAE and classifies them with `classifier` (fit on the real digits).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from d2g_jax.demo import classifier, digits
from d2g_jax.models.vae import decode_latents


def sample_digits(teacher, labels_N, z_NxhxwxL, template: str, guidance_scale: float,
                  num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(latents, decoded images N x H x W x 3 in about [-1, 1]) of the teacher's DDIM + CFG
  solutions from noise `z` for the prompts asking for `labels_N`."""
  from d2g_jax.data.teacher_pairs import teacher_fns
  encode_fn, generate_fn, params = teacher_fns(teacher, guidance_scale=guidance_scale,
                                               num_steps=num_steps, store_embeddings=False)
  vae = teacher.vae

  def sample(params, vae_params, z, cond):
    x = generate_fn(params, z, cond)["x"]
    return x, decode_latents(vae, vae_params, x)

  cond = encode_fn([digits.prompt(d, template) for d in labels_N])
  x, images = jax.jit(sample)(params, teacher.vae_params, z_NxhxwxL, cond)
  return np.asarray(x, np.float32), np.asarray(images, np.float32)


def noise(seed: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
  """The initial latents of the check's n samples (a diffusers pipeline's `latents=`, NHWC)."""
  return np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(seed), 3), (n, *shape)))


@dataclasses.dataclass(frozen=True)
class Check:
  accuracy: float  # fraction of images classified as the digit their prompt asked for
  labels_N: np.ndarray  # the prompted digits: 0, 0, ..., 9 (per_digit each)
  latents_NxhxwxL: np.ndarray
  images_NxHxWx3: np.ndarray  # decoded, about [-1, 1]


def teacher_accuracy(config, per_digit: int | None = None) -> Check:
  """Samples and classifies the digits teacher at config.teacher.path."""
  from d2g_jax.data.teacher_pairs import latent_shape
  from d2g_jax.teacher import load_teacher
  c = config.digits
  per_digit = per_digit or c.check_per_digit
  teacher = load_teacher(config.teacher.path, attention=config.teacher.attention)
  labels = np.repeat(np.arange(digits.NUM_CLASSES), per_digit)
  z = noise(config.seed, len(labels), latent_shape(teacher))
  latents, images = sample_digits(teacher, labels, z, c.prompt, c.check_guidance, c.check_steps)
  clf, _ = classifier.fit_on_digits(c.image_size, c.held_out, c.split_seed)
  return Check(classifier.accuracy(clf, images, labels), labels, latents, images)
