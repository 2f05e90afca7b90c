"""Real images for FID reference statistics: a folder of image files or a tfds split.

    for image_HxWx3 in iter_images("/data/coco/val2014"): ...        # uint8 RGB arrays
    for image_HxWx3 in iter_images("tfds:coco_captions/2014/val", data_dir="/data/tfds"): ...

A folder is read recursively, files with the extensions clean-fid reads, in sorted path
order. A tfds split (prepared in the ArrayRecord format, read without TensorFlow, as
`data.prompts` reads captions) yields the feature at `image_key` ("image" by default),
decoded with PIL. Every image is converted to RGB. `limit` keeps the first N.

`prepare(image, center_crop, resolution)` is the optional step between reading and
FID's resize: a centre square crop and a resize to `resolution` x `resolution` with
PIL's 8-bit bicubic, for protocols that compare against real images prepared at the
generator's resolution (COCO at 512 for SD 1.5, say). Both are off by default, which is
clean-fid's folder mode: the whole image goes straight to the 299 x 299 resize.
"""

from __future__ import annotations

import io
import os
from typing import Iterator

import numpy as np

EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


def list_image_files(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"reference image folder {folder!r} does not exist")
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                 if f.rsplit(".", 1)[-1].lower() in EXTENSIONS)
  if not files:
    raise FileNotFoundError(f"no image files ({', '.join(EXTENSIONS)}) under {folder!r}")
  return files


def _rgb(data, where: str) -> np.ndarray:
  from PIL import Image
  try:
    with Image.open(data) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
    raise ValueError(f"cannot read {where} as an image: {e}") from e


def iter_images(spec: str, *, data_dir: str | None = None, image_key: str = "image",
                limit: int = -1) -> Iterator[np.ndarray]:
  """uint8 HxWx3 RGB images of `spec` (a folder, or tfds:<name>[/<config>][:<version>]/<split>)."""
  if spec.startswith("tfds:"):
    from d2g_jax.data.prompts import _lookup, open_tfds
    name, _, split = spec[len("tfds:"):].rpartition("/")
    _, _, source, desc = open_tfds(name, split, data_dir)
    n = len(source) if limit < 0 else min(limit, len(source))
    for i in range(n):
      example = source[i]
      try:
        value = _lookup(example, image_key)
      except KeyError:
        raise KeyError(f"{desc}, record {i}: no image feature {image_key!r}; set "
                       "eval.fid.ref_image_key") from None
      if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
        yield value[..., :3]
      else:
        yield _rgb(io.BytesIO(bytes(value)), f"{desc}, record {i}")
    return
  files = list_image_files(spec)
  for f in files if limit < 0 else files[:limit]:
    yield _rgb(f, f)


def count_images(spec: str, *, data_dir: str | None = None, limit: int = -1) -> int:
  if spec.startswith("tfds:"):
    from d2g_jax.data.prompts import open_tfds
    name, _, split = spec[len("tfds:"):].rpartition("/")
    n = len(open_tfds(name, split, data_dir)[2])
  else:
    n = len(list_image_files(spec))
  return n if limit < 0 else min(limit, n)


def prepare(image_HxWx3: np.ndarray, center_crop: bool = False, resolution: int = 0) -> np.ndarray:
  """Optional centre square crop, then optional resize to resolution^2 (PIL 8-bit bicubic)."""
  if center_crop:
    h, w = image_HxWx3.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image_HxWx3 = image_HxWx3[top:top + s, left:left + s]
  if resolution:
    from PIL import Image
    image_HxWx3 = np.asarray(Image.fromarray(image_HxWx3).resize((resolution, resolution),
                                                                 Image.BICUBIC))
  return image_HxWx3
