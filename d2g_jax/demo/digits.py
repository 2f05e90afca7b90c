"""scikit-learn's bundled 8x8 handwritten digits as a tiny text-to-image dataset.

Legend: N images, H/W pixel height/width (`size`), 3 RGB channels.

The 1,797 images (values 0..16, ink high) ship inside scikit-learn, so the demo needs no
download. They are upsampled bilinearly (half-pixel centres, as PIL and
`torch.nn.functional.interpolate(align_corners=False)`) to `size` x `size`: smooth
strokes like those of natural images, rather than nearest-neighbour blocks whose
edges would sit exactly on the VAE's latent grid; then mapped to [-1, 1] (background
-1, ink +1) and repeated over three channels, the RGB input of an SD VAE. A fixed,
class-stratified permutation from `seed` splits them into train and held-out sets.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NUM_CLASSES = 10
NATIVE_SIZE = 8
MAX_VALUE = 16.0


@dataclasses.dataclass(frozen=True)
class Split:
  images_NxHxWx3: np.ndarray  # float32 in [-1, 1]
  labels_N: np.ndarray  # int32 digits 0..9


def prompt(digit: int, template: str) -> str:
  """The prompt that asks for `digit`: `template` with `{}` replaced, e.g. 'a handwritten digit 7'."""
  if "{}" not in template:
    raise ValueError(f"prompt template {template!r} must contain '{{}}' where the digit goes")
  return template.format(int(digit))


def prompts(template: str) -> list[str]:
  """The ten prompts, digit d at index d."""
  return [prompt(d, template) for d in range(NUM_CLASSES)]


def upsample(images_Nx8x8: np.ndarray, size: int) -> np.ndarray:
  """0..16 grey 8x8 images -> N x size x size x 3 float32 in [-1, 1], bilinear."""
  import jax
  x = np.asarray(images_Nx8x8, np.float32)[..., None] / (MAX_VALUE / 2) - 1.0
  if size != NATIVE_SIZE:
    x = np.asarray(jax.image.resize(x, (x.shape[0], size, size, 1), "linear", antialias=False))
  return np.repeat(np.clip(x, -1.0, 1.0), 3, axis=-1)


def load(size: int, held_out: int, seed: int) -> tuple[Split, Split]:
  """(train, held-out) splits; `held_out` images (a multiple of 10 keeps classes balanced)."""
  from sklearn.datasets import load_digits
  data = load_digits()
  n = len(data.target)
  if not 0 < held_out < n:
    raise ValueError(f"digits.held_out={held_out} must be in (0, {n})")
  rng = np.random.default_rng(seed)
  labels = data.target.astype(np.int32)
  # Stratified: held-out image k is class k % 10, taken from a shuffled list per class.
  per_class = [rng.permutation(np.flatnonzero(labels == d)) for d in range(NUM_CLASSES)]
  held = np.array([per_class[k % NUM_CLASSES][k // NUM_CLASSES] for k in range(held_out)])
  train = np.setdiff1d(np.arange(n), held)
  images = upsample(data.images, size)
  return Split(images[train], labels[train]), Split(images[held], labels[held])
