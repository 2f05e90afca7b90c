"""A digit classifier trained on the real digits: the demo's judge of generated images.

Independent of every generative model of the demo (scikit-learn only): an RBF support
vector machine on the grey image averaged back to the digits' native 8x8 grid, where
their information lives (the upsampled pixels add none; averaging also makes the judge
indifferent to a decoder's high-frequency artefacts). Held-out accuracy on the real
digits (split of `digits.load`): 98.0% at 32x32 (`python -m d2g_jax.demo.classifier`).

    clf = fit(train.images_NxHxWx3, train.labels_N)
    acc = accuracy(clf, samples_NxHxWx3, prompted_digits_N)   # images in [-1, 1]
"""

from __future__ import annotations

import numpy as np

from d2g_jax.demo import digits

SVC_C = 10.0


def features(images_NxHxWx3) -> np.ndarray:
  """N x 64: the grey image (channel mean) averaged over blocks down to 8x8."""
  x = np.asarray(images_NxHxWx3, np.float32)
  if x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[1] % digits.NATIVE_SIZE:
    raise ValueError(f"expected N x S x S x C images with S a multiple of {digits.NATIVE_SIZE}, "
                     f"found shape {x.shape}")
  g = x.mean(-1)
  n, s = g.shape[0], g.shape[1]
  f = s // digits.NATIVE_SIZE
  return g.reshape(n, digits.NATIVE_SIZE, f, digits.NATIVE_SIZE, f).mean((2, 4)).reshape(n, -1)


def fit(images_NxHxWx3, labels_N):
  """A fitted scikit-learn classifier of `features`; its `predict` gives digits."""
  from sklearn.svm import SVC
  return SVC(C=SVC_C).fit(features(images_NxHxWx3), np.asarray(labels_N))


def predict(clf, images_NxHxWx3) -> np.ndarray:
  """The digit each image shows (int array N); images in [-1, 1], any size 8k x 8k."""
  return clf.predict(features(np.clip(np.asarray(images_NxHxWx3, np.float32), -1.0, 1.0)))


def accuracy(clf, images_NxHxWx3, labels_N) -> float:
  """Fraction of images classified as `labels_N` (e.g. the digit each prompt asked for)."""
  return float(np.mean(predict(clf, images_NxHxWx3) == np.asarray(labels_N)))


def fit_on_digits(size: int, held_out: int, seed: int):
  """(classifier fitted on the train split, its accuracy on the held-out split)."""
  train, held = digits.load(size, held_out, seed)
  clf = fit(train.images_NxHxWx3, train.labels_N)
  return clf, accuracy(clf, held.images_NxHxWx3, held.labels_N)


if __name__ == "__main__":
  import ml_collections

  from d2g_jax.demo import config as demo_config
  c = demo_config.add_blocks(ml_collections.ConfigDict()).digits
  _, acc = fit_on_digits(c.image_size, c.held_out, c.split_seed)
  print(f"digit classifier: held-out accuracy {acc:.4f} ({c.held_out} images, {c.image_size} px)")
