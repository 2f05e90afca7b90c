"""Image grids written as PNGs: training samples, evaluation rows, the demo's picture.

Legend: G images per line, N samples, H/W image height/width.

`labelled(image, column_labels, row_labels)` adds a header line above a grid and a label
column to its left (PIL's bundled default font: nothing is downloaded); the demo's picture
and `python -m d2g_jax.sample --teacher ...`'s side-by-side grid are written with it.
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


def labelled(image_HxWx3: np.ndarray, column_labels: Sequence[str] = (),
             row_labels: Sequence[str] = (), font_size: int = 14) -> np.ndarray:
  """`image` (uint8) with a white header above it and a white margin to its left: the width is
  split into len(column_labels) equal spans (a label may name several grid columns: give
  one label per group of columns) with each label centred over its span; the height into
  len(row_labels) equal spans, each label centred vertically in the margin. Labels wider
  than their span are not wrapped (the picture widens so that none is cut off at its
  edges, but neighbours may touch): keep them short."""
  from PIL import Image, ImageDraw, ImageFont
  font = ImageFont.load_default(size=font_size)
  width = lambda text: int(np.ceil(font.getlength(text)))
  gap = max(2, font_size // 3)
  h, w = image_HxWx3.shape[:2]
  span = w / max(len(column_labels), 1)
  top = font_size + 2 * gap if column_labels else 0
  left = max((width(t) for t in row_labels), default=0) + (2 * gap if row_labels else 0)
  overflow = width(column_labels[-1]) / 2 - span / 2 if column_labels else 0
  right = int(np.ceil(overflow)) + gap if overflow > 0 else 0
  out = Image.new("RGB", (left + w + right, top + h), "white")
  out.paste(Image.fromarray(np.asarray(image_HxWx3, np.uint8)), (left, top))
  draw = ImageDraw.Draw(out)
  for i, text in enumerate(column_labels):
    draw.text((left + (i + 0.5) * span, top / 2), text, fill="black", font=font, anchor="mm")
  for i, text in enumerate(row_labels):
    span = h / len(row_labels)
    draw.text((left - gap, top + (i + 0.5) * span), text, fill="black", font=font, anchor="rm")
  return np.asarray(out)


def save_png(image_HxWx3: np.ndarray, path: str) -> np.ndarray:
  """Writes a uint8 image as a PNG, atomically; returns it."""
  from PIL import Image
  atomic_write(path, lambda tmp: Image.fromarray(image_HxWx3).save(tmp, format="PNG"))
  return image_HxWx3


def save_grid(lines: Sequence[np.ndarray], path: str, pad: int = PAD) -> np.ndarray:
  """Writes `grid_image(lines)` to `path` (PNG, atomically); returns it."""
  return save_png(grid_image(lines, pad), path)
