"""Sample grids: latents decoded with the teacher's VAE, laid out as one PNG.

Legend: N samples, H/W/C latent, h/w pixels.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from d2g_jax.files import atomic_write


def decode_fn(teacher):
  """decode(vae_params, latents_NxHxWxC) -> RGB NxhxWx3 in [-1, 1] (jit it)."""
  from d2g_jax.models.vae import AutoencoderKL
  vae, cfg = teacher.vae, teacher.vae.config
  return lambda params, lat: vae.apply({"params": params}, cfg.unscale_latents(lat),
                                       method=AutoencoderKL.decode)


def grid(columns: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
  """uint8 image: one row per sample, one column per source (each Nxhxwx3 in [-1, 1])."""
  cols = [np.clip((np.asarray(c, np.float32) + 1) * 127.5, 0, 255).round().astype(np.uint8)
          for c in columns]
  n, h, w, _ = cols[0].shape
  out = np.full((n * (h + pad) + pad, len(cols) * (w + pad) + pad, 3), 255, np.uint8)
  for j, col in enumerate(cols):
    for i in range(n):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      out[y:y + h, x:x + w] = col[i]
  return out


def save_png(image_HxWx3: np.ndarray, path: str):
  from PIL import Image
  def write(tmp):
    Image.fromarray(image_HxWx3).save(tmp, format="PNG")
  atomic_write(path, write)


def write_grid(path: str, columns: Sequence[jax.Array]) -> np.ndarray:
  image = grid([np.asarray(jax.device_get(c)) for c in columns])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_png(image, path)
  return image
