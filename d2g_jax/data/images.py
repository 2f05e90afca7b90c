"""Labelled or captioned images for the latent caches: an image folder, or a tfds dataset
prepared on disk.

`open_images(spec, ...)` picks the reader from `spec`:

  folder:<root>                                  FolderImages  root/<class>/<image files>
  tfds:<name>[/<config>][:<version>]/<split>     TfdsImages    e.g. tfds:imagenet2012/train

Folders: one subfolder per class; the classes are the sorted subfolder names and a class's
label is its position among them; images (.png .jpg .jpeg .bmp .gif .webp .tif .tiff, any
case) are ordered by class, then by file name; hidden files are skipped.

tfds datasets are read with tensorflow-datasets alone, no TensorFlow, from the ArrayRecord
files (`tfds build imagenet2012 --file_format=array_record`), in the data source's order.
The image is the feature `image_key` (default "image"), decoded here with Pillow; the label
is the ClassLabel feature `label_key` (default "label"), or, with `caption_key`, the text at
that "/"-path (the first caption when there are several). `key` is the example's
`file_name` feature when there is one, else its index.

Every image is converted to RGB and `resize_center_crop`ped: the shorter side scaled to
`size` (Pillow bicubic, antialiased), then the central size x size square.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageSourceError(ValueError):
  """An image source is empty, malformed or unreadable."""


def _decode(data: bytes | str, where: str):
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
      return im.convert("RGB")
  except Exception as e:  # PIL raises many types for unreadable files
    raise ImageSourceError(f"{where}: cannot decode the image ({e})") from e


def resize_center_crop(image, size: int) -> np.ndarray:
  """A PIL RGB image -> uint8 size x size x 3: shorter side to `size`, central square."""
  from PIL import Image
  w, h = image.size
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  if (nw, nh) != (w, h):
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def _sha256_lines(lines) -> str:
  h = hashlib.sha256()
  for line in lines:
    h.update(line.encode("utf-8") + b"\n")
  return h.hexdigest()


class FolderImages:
  """root/<class>/<image>: labels from the sorted class folder names."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist; expected one subfolder "
                              "per class holding that class's images")
    self.root = os.path.abspath(root)
    self.class_names = sorted(d for d in os.listdir(root) if not d.startswith(".")
                              and os.path.isdir(os.path.join(root, d)))
    if not self.class_names:
      raise ImageSourceError(f"image folder {root!r} has no class subfolders; expected "
                             "root/<class>/<image files>")
    self.keys, self.labels, sizes = [], [], []
    for label, name in enumerate(self.class_names):
      folder = os.path.join(root, name)
      files = sorted(f for f in os.listdir(folder) if not f.startswith(".")
                     and f.lower().endswith(EXTENSIONS))
      if not files:
        raise ImageSourceError(f"class folder {folder!r} holds no images ({', '.join(EXTENSIONS)})"
                               "; remove it or add its images")
      for f in files:
        self.keys.append(f"{name}/{f}")
        self.labels.append(label)
        sizes.append(os.path.getsize(os.path.join(folder, f)))
    self._files_sha = _sha256_lines(f"{k}\0{s}" for k, s in zip(self.keys, sizes))

  def __len__(self) -> int:
    return len(self.keys)

  def item(self, i: int):
    """(PIL RGB image, label, key) of example i."""
    path = os.path.join(self.root, self.keys[i])
    return _decode(path, path), self.labels[i], self.keys[i]

  def description(self) -> dict[str, Any]:
    """What identifies the data (part of the cache's config): files by name and size."""
    return {"kind": "folder", "root": self.root, "num_examples": len(self),
            "files_sha256": self._files_sha}


class TfdsImages:
  """A tfds dataset prepared on disk (ArrayRecord files); images decoded with Pillow."""

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label", caption_key: str = ""):
    from d2g_jax.data.prompts import _lookup, open_tfds
    self._lookup = _lookup
    tfds, builder, self._source, self.desc = open_tfds(name, split, data_dir, ImageSourceError)
    features = builder.info.features
    if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
      raise ImageSourceError(f"{self.desc}: no Image feature {image_key!r}; features are "
                             f"{sorted(features)}. Set image_key.")
    self.image_key, self.caption_key = image_key, caption_key
    self.label_key = "" if caption_key else label_key
    if self.label_key:
      feature = features[label_key] if label_key in features else None
      if not isinstance(feature, tfds.features.ClassLabel):
        raise ImageSourceError(f"{self.desc}: no ClassLabel feature {label_key!r}; features are "
                               f"{sorted(features)}. Set label_key, or caption_key for captions.")
      self.class_names = list(feature.names)
    else:
      self.class_names = []
    self.name, self.split, self.data_dir = builder.info.full_name, split, str(builder.data_dir)
    self._has_file_name = "file_name" in features

  def __len__(self) -> int:
    return len(self._source)

  def item(self, i: int):
    """(PIL RGB image, label or caption, key) of example i (thread-safe)."""
    ex = self._source[i]
    where = f"{self.desc}, record {i}"
    if self.label_key:
      target = int(ex[self.label_key])
    else:
      from d2g_jax.data.prompts import _as_text
      try:
        value = self._lookup(ex, self.caption_key)
      except KeyError:
        raise ImageSourceError(f"{where}: no feature {self.caption_key!r}") from None
      values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
      if not values:
        raise ImageSourceError(f"{where}: feature {self.caption_key!r} is empty")
      target = _as_text(values[0])
    key = ex["file_name"] if self._has_file_name else str(i)
    key = key.decode("utf-8") if isinstance(key, bytes) else str(key)
    return _decode(bytes(ex[self.image_key]), where), target, key

  def description(self) -> dict[str, Any]:
    return {"kind": "tfds", "name": self.name, "split": self.split, "data_dir": self.data_dir,
            "num_examples": len(self), "image_key": self.image_key,
            "label_key": self.label_key, "caption_key": self.caption_key}


def open_images(spec: str, *, data_dir: str | None = None, image_key: str = "image",
                label_key: str = "label", caption_key: str = ""):
  """An image source from `folder:<root>` or `tfds:<name>[/<config>][:<version>]/<split>`."""
  if spec.startswith("folder:"):
    if caption_key:
      raise ImageSourceError(f"{spec}: image folders carry class labels, not captions; leave "
                             "caption_key empty, or use a tfds dataset with captions")
    return FolderImages(spec[len("folder:"):])
  if spec.startswith("tfds:"):
    name, sep, split = spec[len("tfds:"):].rpartition("/")
    if not sep or not name or not split:
      raise ImageSourceError(f"tfds image source {spec!r} should read tfds:<name>[/<config>]"
                             "[:<version>]/<split>, e.g. tfds:imagenet2012/train")
    return TfdsImages(name, split, data_dir=data_dir, image_key=image_key, label_key=label_key,
                      caption_key=caption_key)
  raise ImageSourceError(f"image source {spec!r}: expected folder:<root> (one subfolder per "
                         "class) or tfds:<name>[/<config>][:<version>]/<split>")
