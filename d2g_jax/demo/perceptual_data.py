"""Data for the demo's E-LatentLPIPS, in the layouts the latent-VGG stages read.

Legend: N images, S pixels a side.

The recipe (docs/latent_lpips.md) needs labelled images for the
classification stage and two-alternative forced-choice (2AFC) judgments for the heads.
For the digits these are made here:

- `write_class_folder`: the digits as `root/<digit>/<i>.png` (the image-folder source);
- `write_2afc`: BAPPS's layout, `root/2afc/{train,val}/<family>/{ref,p0,p1,judge}/`. Each
  triplet is a digit and two distortions of it from one family (additive noise, blur,
  translation, stroke erasure), each at a random strength. No people judged them: the
  "judge" is a fixed proxy observer that compares blurred images (coarse shape is what
  makes a digit), reporting the fraction who would prefer p1 as
  sigmoid((d(ref, p0) - d(ref, p1)) / temperature). The heads learn that observer's taste:
  enough to show the recipe working in miniature, not a human perceptual metric.
"""

from __future__ import annotations

import os

import numpy as np

from d2g_jax.log import get_logger

_log = get_logger(__name__)

FAMILIES = {"train": ("noise", "blur", "shift", "erase"), "val": ("noise", "blur", "shift", "erase")}
TEMPERATURE = 0.02


def to_uint8(images_NxSxSx3) -> np.ndarray:
  return np.clip((np.asarray(images_NxSxSx3, np.float32) + 1) * 127.5, 0, 255).round().astype(
      np.uint8)


def _save(path: str, image_SxSx3: np.ndarray):
  from PIL import Image
  Image.fromarray(image_SxSx3).save(path, format="PNG")


def write_class_folder(images_NxSxSx3, labels_N, root: str) -> str:
  """root/<digit>/<i>.png for every image (values in [-1, 1])."""
  pixels = to_uint8(images_NxSxSx3)
  for i, (image, label) in enumerate(zip(pixels, np.asarray(labels_N))):
    folder = os.path.join(root, str(int(label)))
    os.makedirs(folder, exist_ok=True)
    _save(os.path.join(folder, f"{i:05d}.png"), image)
  return root


def _blur(x_SxSx3: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur with reflect borders (numpy only)."""
  r = max(1, int(3 * sigma))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  pad = np.pad(x_SxSx3, ((r, r), (r, r), (0, 0)), mode="reflect")
  rows = sum(k[i] * pad[i:i + x_SxSx3.shape[0]] for i in range(2 * r + 1))
  return sum(k[i] * rows[:, i:i + x_SxSx3.shape[1]] for i in range(2 * r + 1))


def distort(rng, x_SxSx3: np.ndarray, family: str, strength: float) -> np.ndarray:
  """One distortion of a [-1, 1] image at strength in [0, 1]."""
  s = x_SxSx3.shape[0]
  if family == "noise":
    y = x_SxSx3 + rng.normal(0, 0.8 * strength, x_SxSx3.shape)
  elif family == "blur":
    y = _blur(x_SxSx3, 0.3 + 2.5 * strength)
  elif family == "shift":
    d = max(1, int(round(strength * s / 4)))
    y = np.roll(x_SxSx3, (rng.choice([-d, d]), rng.choice([-d, d])), axis=(0, 1))
  elif family == "erase":
    h = max(1, int(round(strength * s / 2)))
    y = x_SxSx3.copy()
    top, left = rng.integers(0, s - h + 1, 2)
    y[top:top + h, left:left + h] = -1.0
  else:
    raise ValueError(f"unknown distortion family {family!r}; expected one of {FAMILIES['train']}")
  return np.clip(y, -1.0, 1.0)


def observer_distance(a_SxSx3: np.ndarray, b_SxSx3: np.ndarray) -> float:
  """The proxy observer: mean squared difference of the images blurred at 1/16 of their size."""
  sigma = a_SxSx3.shape[0] / 16
  return float(np.mean((_blur(a_SxSx3, sigma) - _blur(b_SxSx3, sigma)) ** 2))


def write_2afc(images_NxSxSx3, root: str, per_family: int, seed: int) -> str:
  """BAPPS-layout 2AFC triplets from the images (values in [-1, 1]); see the module doc."""
  rng = np.random.default_rng(seed)
  images = np.asarray(images_NxSxSx3, np.float32)
  for split, families in FAMILIES.items():
    for family in families:
      base = os.path.join(root, "2afc", split, family)
      for part in ("ref", "p0", "p1", "judge"):
        os.makedirs(os.path.join(base, part), exist_ok=True)
      for i in range(per_family):
        ref = images[rng.integers(len(images))]
        p0, p1 = (distort(rng, ref, family, rng.uniform(0.05, 1.0)) for _ in range(2))
        d0, d1 = observer_distance(ref, p0), observer_distance(ref, p1)
        judge = 1.0 / (1.0 + np.exp(-(d0 - d1) / TEMPERATURE))  # fraction preferring p1
        stem = f"{i:06d}"
        for part, image in (("ref", ref), ("p0", p0), ("p1", p1)):
          _save(os.path.join(base, part, stem + ".png"), to_uint8(image[None])[0])
        np.save(os.path.join(base, "judge", stem + ".npy"), np.asarray([judge], np.float32))
  return root


def run_data(config) -> dict:
  """Stage digits_lpips_data: <digits dir>/{train, held_out} image folders and a 2AFC folder
  (`demo.twoafc_per_family` triplets per family and split), written whole or not at all
  (`folders.build`); a folder made with other settings is refused, not replaced, since the
  latent caches made from it would be stale."""
  from d2g_jax.demo import digits, folders
  dg = config.digits
  root = os.path.join(dg.dir, "perceptual_data")
  stamp = {"image_size": dg.image_size, "held_out": dg.held_out, "split_seed": dg.split_seed,
           "per_family": config.demo.twoafc_per_family, "seed": config.seed}
  if folders.finished(root, stamp, "digits_lpips_data") is not None:
    _log.info("%s is complete; nothing to do", root)
    return {"root": root}
  train, held = digits.load(dg.image_size, dg.held_out, dg.split_seed)

  def fill(tmp):
    write_class_folder(train.images_NxHxWx3, train.labels_N, os.path.join(tmp, "train"))
    write_class_folder(held.images_NxHxWx3, held.labels_N, os.path.join(tmp, "held_out"))
    write_2afc(train.images_NxHxWx3, os.path.join(tmp, "bapps"),
               config.demo.twoafc_per_family, config.seed)
  folders.build(root, fill, "digits_lpips_data", stamp, {})
  n = config.demo.twoafc_per_family * sum(len(f) for f in FAMILIES.values())
  _log.info("%s training and %s held-out digit images (class folders) and %s 2AFC triplets -> %s",
            len(train.labels_N), len(held.labels_N), n, root)
  return {"root": root}
