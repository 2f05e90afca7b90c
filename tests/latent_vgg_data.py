"""Tiny data for the E-LatentLPIPS training tests, made here: a random VAE, an image folder,
an ImageNet-shaped tfds dataset and a BAPPS-shaped 2AFC folder.

Classes are colour-coded (class c is noise around a tint of its own), so a few steps of
training already tell them apart; BAPPS triplets pair a slightly and a strongly distorted
patch, with people (the judge file) mostly preferring the slight one.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

TINTS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def make_vae(folder: str) -> str:
  from d2g_jax import tiny
  tiny.make_vae().save_pretrained(folder)  # 2 levels: 16 px -> 8x8x4 latents
  return folder


def class_image(rng, label: int, h: int, w: int) -> np.ndarray:
  tint = np.asarray(TINTS[label % len(TINTS)], np.float32)
  return np.clip(tint + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def make_image_folder(root: str, per_class: int = 6, seed: int = 0) -> str:
  """root/<class>/<i>.png (and a .jpg), sizes varying around 20 px."""
  rng = np.random.default_rng(seed)
  for label, name in enumerate(("apple", "bean", "cloud")):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      img = Image.fromarray(class_image(rng, label, 18 + i % 3, 20 + 2 * (i % 4)))
      img.save(os.path.join(root, name, f"{i:03d}.{'jpg' if i == 1 else 'png'}"))
  return root


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def make_tfds_images(data_dir: str, n_train: int = 9, n_val: int = 3) -> str:
  """`tiny_imagenet` in imagenet2012's layout (image, label ClassLabel, file_name) plus a
  caption, prepared as ArrayRecord files without TensorFlow."""
  import tensorflow_datasets as tfds

  class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(names=["n01", "n02", "n03"]),
          "file_name": tfds.features.Text(),
          "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(n_train, 1),
              "validation": self._generate_examples(n_val, 2)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield i, {"image": _png(class_image(rng, i % 3, 16, 24)), "label": i % 3,
                  "file_name": f"img_{seed}_{i}.png", "caption": f"a tinted square {i}"}

  TinyImagenet(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def make_bapps(root: str, per_family: int = 8, size: int = 16, seed: int = 0) -> str:
  """root/2afc/{train,val}/<distortion>/{ref,p0,p1,judge}/ with random patches."""
  rng = np.random.default_rng(seed)
  families = {"train": ("cnn", "mix"), "val": ("color", "deblur")}
  for split, dists in families.items():
    for d in dists:
      base = os.path.join(root, "2afc", split, d)
      for part in ("ref", "p0", "p1", "judge"):
        os.makedirs(os.path.join(base, part), exist_ok=True)
      for i in range(per_family):
        ref = rng.integers(0, 256, (size, size, 3)).astype(np.float32)
        slight = np.clip(ref + rng.normal(0, 12, ref.shape), 0, 255).astype(np.uint8)
        strong = np.clip(ref + rng.normal(0, 70, ref.shape), 0, 255).astype(np.uint8)
        swap = i % 2 == 1
        p0, p1 = (strong, slight) if swap else (slight, strong)
        stem = f"{i:06d}"
        Image.fromarray(ref.astype(np.uint8)).save(os.path.join(base, "ref", stem + ".png"))
        Image.fromarray(p0).save(os.path.join(base, "p0", stem + ".png"))
        Image.fromarray(p1).save(os.path.join(base, "p1", stem + ".png"))
        judge = 0.8 if swap else 0.2 + 0.1 * (i % 3)  # fraction who preferred p1
        np.save(os.path.join(base, "judge", stem + ".npy"), np.asarray([judge], np.float32))
  return root


def tiny_config(workdir: str, vae: str, images: str, bapps: str | None = None):
  """A config that runs the three stages in seconds: narrow trunk, linear head, 8x8 latents."""
  from d2g_jax import config_defaults
  c = config_defaults.base()
  c.workdir = workdir
  c.stages = "latent_cache,latent_vgg_train,latent_vgg_calibrate"
  lv = c.latent_vgg
  lv.vae, lv.widths = vae, (8, 8, 16, 16, 16)
  lv.cache.train = lv.cache.eval = "folder:" + images
  lv.cache.image_size = 16
  lv.cache.bapps = bapps or ""
  lv.cache.bapps_image_size = 16
  lv.cache.batch_size = lv.cache.shard_size = 8
  lv.cache.workers = 2
  t = lv.train
  t.head, t.batch_size, t.epochs, t.optimizer, t.lr = "linear", 8, 10, "adamw", 0.02
  t.weight_decay, t.augment, t.bn_momentum = 0.0, "b", 0.5  # running stats settle in 20 steps
  t.log_every, t.eval_every, t.checkpoint_every, t.eval_batch_size = 5, 100, 5, 8
  cal = lv.calibrate
  cal.batch_size, cal.epochs, cal.decay_epochs, cal.lr = 8, 3, 2, 0.01
  cal.feature_batch_size = 8
  return c
