"""Image grids written as PNGs: training samples, evaluation rows, the demo's picture.

Legend: G images per line, N samples, H/W image height/width.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from d2g_jax.files import atomic_write

PAD = 2  # white pixels between images


def to_uint8(images: np.ndarray) -> np.ndarray:
  """RGB in [-1, 1] (what the VAE decodes) -> uint8, clipped and rounded."""
  return np.clip((np.asarray(images, np.float32) + 1) * 127.5, 0, 255).round().astype(np.uint8)


def grid_image(lines: Sequence[np.ndarray], pad: int = PAD) -> np.ndarray:
  """uint8 image of the lines (each GxHxWx3 uint8), stacked top to bottom, padded white."""
  g = max(len(line) for line in lines)
  h = max(line.shape[1] for line in lines)
  w = max(line.shape[2] for line in lines)
  out = np.full((len(lines) * (h + pad) + pad, g * (w + pad) + pad, 3), 255, np.uint8)
  for r, line in enumerate(lines):
    for c, image in enumerate(line):
      top, left = pad + r * (h + pad), pad + c * (w + pad)
      out[top:top + image.shape[0], left:left + image.shape[1]] = image
  return out


def columns_image(columns: Sequence[np.ndarray], pad: int = PAD) -> np.ndarray:
  """uint8 image with one line per sample and one column per source (each NxHxWx3 in
  [-1, 1]): e.g. the teacher's target beside the student's output for the same noise."""
  cols = [to_uint8(c) for c in columns]
  return grid_image([np.stack([c[i] for c in cols]) for i in range(len(cols[0]))], pad)


def save_png(image_HxWx3: np.ndarray, path: str) -> np.ndarray:
  """Writes a uint8 image as a PNG, atomically; returns it."""
  from PIL import Image
  atomic_write(path, lambda tmp: Image.fromarray(image_HxWx3).save(tmp, format="PNG"))
  return image_HxWx3


def save_grid(lines: Sequence[np.ndarray], path: str, pad: int = PAD) -> np.ndarray:
  """Writes `grid_image(lines)` to `path` (PNG, atomically); returns it."""
  return save_png(grid_image(lines, pad), path)
