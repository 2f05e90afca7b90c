"""Prompt sources: a text file, a JSONL file, or a tfds dataset prepared on disk.

`load_prompts(spec)` picks the reader from `spec`:

  tfds:<name>[/<config>][:<version>]/<split>   read_tfds   e.g. tfds:coco_captions/2014/train,
                                                            tfds:my_captions/validation[:500]
  <path>.jsonl                                  read_jsonl  one JSON object per line
  <path> (anything else)                        read_text   one prompt per line

Text files: each line is stripped of surrounding whitespace (so CRLF files work) and
blank lines are skipped; prompt i is the i-th non-blank line. JSONL files: blank lines
are skipped; every other line must be an object holding the prompt under `field`
(default: "prompt", else "caption"), a string, kept as is.

tfds datasets are read with tensorflow-datasets alone, no TensorFlow, which needs the
dataset prepared in the ArrayRecord file format (`file_format="array_record"` when
building it; a tfrecord copy must be converted once, e.g. `tfds convert_format`). The
prompt is the feature at `caption_key`, a "/"-separated path into nested features
(default: the first of "prompt", "caption", "captions/text", "text" that exists). When
it holds several captions (COCO captions: `captions/text`, five per image) the first
is used, or every one in order with `all_captions=True`. Images are never decoded.
Records are read in the data source's order (tfds's own, fixed when it was prepared).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

AUTO_TFDS_KEYS = ("prompt", "caption", "captions/text", "text")
AUTO_JSONL_FIELDS = ("prompt", "caption")


class PromptError(ValueError):
  """A prompt source is empty or malformed."""


def load_prompts(spec: str, *, field: str | None = None, data_dir: str | None = None,
                 caption_key: str | None = None, all_captions: bool = False) -> list[str]:
  """The prompts of `spec` (see the module docstring for the forms it takes)."""
  if spec.startswith("tfds:"):
    name, sep, split = spec[len("tfds:"):].rpartition("/")
    if not sep or not name or not split:
      raise PromptError(f"tfds prompt source {spec!r} should read tfds:<name>[/<config>]"
                        "[:<version>]/<split>, e.g. tfds:coco_captions/2014/train")
    return read_tfds(name, split, data_dir=data_dir, caption_key=caption_key,
                     all_captions=all_captions)
  if spec.endswith(".jsonl"):
    return read_jsonl(spec, field=field)
  return read_text(spec)


def _lines(path: str):
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    hint = "" if os.path.isdir(folder) else f" (folder {folder!r} does not exist)"
    raise FileNotFoundError(f"prompt file {path!r} not found{hint}")
  with open(path, "rb") as fh:
    for number, raw in enumerate(fh, start=1):
      try:
        yield number, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise PromptError(f"{path}:{number}: not UTF-8 text ({e})") from e


def read_text(path: str) -> list[str]:
  """One prompt per line, stripped; blank lines skipped."""
  prompts = [line.strip() for _, line in _lines(path) if line.strip()]
  if not prompts:
    raise PromptError(f"prompt file {path!r} holds no prompts (only blank lines, or empty)")
  return prompts


def read_jsonl(path: str, field: str | None = None) -> list[str]:
  """The string at `field` (default "prompt", else "caption") of each JSON line."""
  prompts = []
  for number, line in _lines(path):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise PromptError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
      raise PromptError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    names = [field] if field else [f for f in AUTO_JSONL_FIELDS if f in obj][:1]
    if not names or names[0] not in obj:
      wanted = repr(field) if field else " or ".join(map(repr, AUTO_JSONL_FIELDS))
      raise PromptError(f"{where}: no field {wanted}; the object has keys {sorted(obj)}. "
                        "Name the prompt field explicitly (field=...).")
    value = obj[names[0]]
    if not isinstance(value, str):
      raise PromptError(f"{where}: field {names[0]!r} is a {type(value).__name__}, "
                        "expected a string")
    prompts.append(value)
  if not prompts:
    raise PromptError(f"prompt file {path!r} holds no prompts (only blank lines, or empty)")
  return prompts


# ------------------------------------------------------------------ tfds
def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("reading prompts from tfds needs tensorflow-datasets (TensorFlow is not "
                      "needed): pip install tensorflow-datasets==4.9.10") from e
  return tfds


def _lookup(example: Any, key: str) -> Any:
  """The value at a "/"-separated path; whole keys first, since tfds keys may contain "/"."""
  if key in example:
    return example[key]
  parts = key.split("/")
  for i in range(len(parts) - 1, 0, -1):
    head = "/".join(parts[:i])
    if head in example and isinstance(example[head], dict):
      return _lookup(example[head], "/".join(parts[i:]))
  raise KeyError(key)


def _feature_paths(example: Any, prefix: str = "") -> list[str]:
  out = []
  for k, v in example.items():
    out += _feature_paths(v, f"{prefix}{k}/") if isinstance(v, dict) else [prefix + k]
  return out


def _as_text(value: Any) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, str):
    return value
  raise TypeError(type(value).__name__)


def open_tfds(name: str, split: str, data_dir: str | None = None,
              error: type[ValueError] = PromptError):
  """(tfds module, builder, data source, description) of a split of a tfds dataset prepared
  in the ArrayRecord format, read from its files alone (no TensorFlow); image and video
  features are left undecoded (bytes). Raises `error` (or FileNotFoundError) saying what to do.
  """
  tfds = _import_tfds()
  from tensorflow_datasets.core import read_only_builder
  where = f"{name} in data_dir {data_dir!r}" if data_dir else f"{name} in tfds's default data_dir"
  try:  # from the files alone: the registered builder class may import TensorFlow
    builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends
    raise FileNotFoundError(
        f"no prepared tfds dataset {where}: {e}\nPrepare it once in the array_record format, "
        f"e.g. `tfds build {name.split('/')[0]} --file_format=array_record"
        f"{' --data_dir=' + data_dir if data_dir else ''}`.") from e
  features = builder.info.features
  skip = {k: tfds.decode.SkipDecoding() for k, f in features.items()
          if isinstance(f, (tfds.features.Image, tfds.features.Video))}
  formats = sorted(str(getattr(f, "value", f)) for f in builder.info.available_file_formats())
  if "array_record" not in formats:
    raise error(f"tfds dataset {name} ({builder.data_dir}) is stored as {formats}; reading "
                "it without TensorFlow needs the array_record format. Prepare it again "
                "with file_format='array_record', or convert it once (`tfds "
                "convert_format`, which needs TensorFlow).")
  desc = f"tfds dataset {builder.info.full_name} split {split!r} ({builder.data_dir})"
  try:
    source = builder.as_data_source(split=split, decoders=skip or None)
  except (KeyError, ValueError) as e:
    raise error(f"cannot open {desc}: {e}") from e
  if len(source) == 0:
    raise error(f"{desc} is empty")
  return tfds, builder, source, desc


def read_tfds(name: str, split: str, *, data_dir: str | None = None,
              caption_key: str | None = None, all_captions: bool = False,
              read_batch: int = 1024) -> list[str]:
  """Captions of a tfds dataset prepared (ArrayRecord format) under `data_dir`."""
  _, _, source, desc = open_tfds(name, split, data_dir)
  prompts: list[str] = []
  key = caption_key
  for start in range(0, len(source), read_batch):
    examples = source.__getitems__(list(range(start, min(start + read_batch, len(source)))))
    if key is None:
      paths = _feature_paths(examples[0])
      key = next((k for k in AUTO_TFDS_KEYS if k in paths), None)
      if key is None:
        raise PromptError(f"{desc}: none of the caption keys {AUTO_TFDS_KEYS} is a feature; "
                          f"features are {paths}. Pass caption_key=...")
    for offset, example in enumerate(examples):
      record = f"{desc}, record {start + offset}"
      try:
        value = _lookup(example, key)
      except KeyError:
        raise PromptError(f"{record}: no feature {key!r}; features are "
                          f"{_feature_paths(example)}") from None
      values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
      if not values:
        raise PromptError(f"{record}: feature {key!r} holds no caption")
      try:
        texts = [_as_text(v) for v in values]
      except TypeError as e:
        raise PromptError(f"{record}: feature {key!r} holds {e}, expected text") from None
      prompts += texts if all_captions else texts[:1]
  return prompts

