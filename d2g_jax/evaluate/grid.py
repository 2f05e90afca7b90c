"""Image grids: one line of samples per evaluation row, written as a PNG.

Legend: G images per line, H/W image height/width.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from d2g_jax.files import atomic_write

PAD = 2  # white pixels between images


def grid_image(lines: Sequence[np.ndarray]) -> np.ndarray:
  """uint8 image of the lines (each GxHxWx3 uint8), stacked top to bottom, padded white."""
  g = max(len(line) for line in lines)
  h = max(line.shape[1] for line in lines)
  w = max(line.shape[2] for line in lines)
  out = np.full((len(lines) * (h + PAD) + PAD, g * (w + PAD) + PAD, 3), 255, np.uint8)
  for r, line in enumerate(lines):
    for c, image in enumerate(line):
      top, left = PAD + r * (h + PAD), PAD + c * (w + PAD)
      out[top:top + image.shape[0], left:left + image.shape[1]] = image
  return out


def save_grid(lines: Sequence[np.ndarray], path: str) -> np.ndarray:
  """Writes `grid_image(lines)` to `path` (PNG, atomically); returns it."""
  from PIL import Image
  image = grid_image(lines)
  atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
  return image
