"""Labelled or captioned images for the latent caches: an image folder, or a tfds dataset
prepared on disk.

`open_images(spec, ...)` picks the reader from `spec`:

  folder:<root>                                  FolderImages    root/<class>/<image files>
  captioned:<root>                               CaptionedImages root/**/<name>.png + <name>.txt
  tfds:<name>[/<config>][:<version>]/<split>     TfdsImages      e.g. tfds:imagenet2012/train

A source's `target` is "label" (class index) or "caption" (text); a labelled source with
`caption_template` (e.g. "a photo of a {}") becomes a captioned one (`TemplateCaptions`:
the template formatted with the class name).

Folders: one subfolder per class; the classes are the sorted subfolder names and a class's
label is its position among them; images (.png .jpg .jpeg .bmp .gif .webp .tif .tiff, any
case) are ordered by class, then by file name; hidden files are skipped. Captioned
folders: every image at any depth under root, in sorted relative-path order, with its
caption in the UTF-8 text file of the same name and the extension .txt beside it
(surrounding whitespace stripped), as image-caption training folders are laid out.

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
  target = "label"

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


class CaptionedImages:
  """root/**/<name>.<image extension> with its caption in root/**/<name>.txt."""
  target = "caption"

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist; expected images with a "
                              "caption file beside each (x.png + x.txt)")
    self.root = os.path.abspath(root)
    self.keys, self.captions, missing, lines = [], [], [], []
    for folder, dirs, names in os.walk(self.root):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for f in sorted(names):
        if f.startswith(".") or not f.lower().endswith(EXTENSIONS):
          continue
        key = os.path.relpath(os.path.join(folder, f), self.root)
        text = os.path.join(folder, os.path.splitext(f)[0] + ".txt")
        if not os.path.isfile(text):
          missing.append(key)
          continue
        try:
          with open(text, encoding="utf-8") as fh:
            caption = fh.read().strip()
        except UnicodeDecodeError as e:
          raise ImageSourceError(f"{text}: not UTF-8 text ({e})") from e
        self.keys.append(key)
        self.captions.append(caption)
        lines.append(f"{key}\0{os.path.getsize(os.path.join(folder, f))}\0{caption}")
    if missing:
      raise ImageSourceError(f"{len(missing)} images under {root!r} have no caption file, e.g. "
                             f"{missing[:3]}; write <name>.txt beside each image, or remove it")
    if not self.keys:
      raise ImageSourceError(f"image folder {root!r} holds no images ({', '.join(EXTENSIONS)}) "
                             "with caption files")
    order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
    self.keys = [self.keys[i] for i in order]
    self.captions = [self.captions[i] for i in order]
    self._files_sha = _sha256_lines(sorted(lines))

  def __len__(self) -> int:
    return len(self.keys)

  def item(self, i: int):
    """(PIL RGB image, caption, key) of example i."""
    path = os.path.join(self.root, self.keys[i])
    return _decode(path, path), self.captions[i], self.keys[i]

  def description(self) -> dict[str, Any]:
    """Files by name and size, and every caption (part of the cache's config)."""
    return {"kind": "captioned_folder", "root": self.root, "num_examples": len(self),
            "files_sha256": self._files_sha}


class TemplateCaptions:
  """A labelled source whose captions are `template.format(class name)`."""
  target = "caption"

  def __init__(self, images, template: str):
    if images.target != "label":
      raise ImageSourceError("caption_template applies to labelled sources (class folders, "
                             "tfds with a ClassLabel); this one already has captions: leave "
                             "caption_template empty")
    if "{}" not in template:
      raise ImageSourceError(f"caption_template {template!r} has no '{{}}' for the class name, "
                             "e.g. 'a photo of a {}'")
    self.images, self.template = images, template

  def __len__(self) -> int:
    return len(self.images)

  def item(self, i: int):
    image, label, key = self.images.item(i)
    return image, self.template.format(self.images.class_names[label]), key

  def description(self) -> dict[str, Any]:
    return {**self.images.description(), "caption_template": self.template}


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
    self.target = "label" if self.label_key else "caption"

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
                label_key: str = "label", caption_key: str = "", caption_template: str = ""):
  """An image source from `folder:<root>`, `captioned:<root>` or
  `tfds:<name>[/<config>][:<version>]/<split>`; with `caption_template`, a labelled one
  captioned by its class names."""
  if caption_template:
    return TemplateCaptions(open_images(spec, data_dir=data_dir, image_key=image_key,
                                        label_key=label_key, caption_key=caption_key),
                            caption_template)
  if spec.startswith("captioned:"):
    return CaptionedImages(spec[len("captioned:"):])
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
                         "class), captioned:<root> (x.png + x.txt) or "
                         "tfds:<name>[/<config>][:<version>]/<split>")
