"""Prompt sources: text, JSONL and tfds (a tiny dataset built here, no TensorFlow, no network)."""

import io
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from d2g_jax.data.prompts import PromptError, load_prompts, read_jsonl, read_text


def _png(i):
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


class TinyCocoCaptions(tfds.core.GeneratorBasedBuilder):
  """COCO captions' layout: an image, its id, and a sequence of {id, text} captions."""
  VERSION = tfds.core.Version("1.1.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),  # PNG bytes: no TF to encode
        "image/id": np.int64,
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": _png(i), "image/id": i,
                "captions": {"id": [2 * i, 2 * i + 1], "text": [f"cap {i} a", f"cap {i} b é"]}}


class TinyPrompts(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "prompt": tfds.features.Text(), "score": np.float32}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      yield i, {"prompt": f"prompt number {i}", "score": float(i)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  for cls in (TinyCocoCaptions, TinyPrompts):
    cls(data_dir=d, file_format="array_record").download_and_prepare()
  return d


# ------------------------------------------------------------------ text
def test_text(tmp_path):
  p = tmp_path / "p.txt"
  p.write_bytes("a cat\r\n\n   \n  a dog on a mat  \nunicode é ✓\n".encode())
  assert read_text(str(p)) == ["a cat", "a dog on a mat", "unicode é ✓"]
  assert load_prompts(str(p)) == read_text(str(p))


def test_text_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    load_prompts(str(tmp_path / "nope.txt"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_prompts(str(tmp_path / "missing_dir" / "p.txt"))
  (tmp_path / "blank.txt").write_text("\n  \n")
  with pytest.raises(PromptError, match="blank.txt.*no prompts"):
    load_prompts(str(tmp_path / "blank.txt"))
  (tmp_path / "latin1.txt").write_bytes(b"ok\ncaf\xe9\n")
  with pytest.raises(PromptError, match="latin1.txt:2: not UTF-8"):
    read_text(str(tmp_path / "latin1.txt"))


# ------------------------------------------------------------------ jsonl
def test_jsonl(tmp_path):
  p = tmp_path / "p.jsonl"
  p.write_text("\n".join(json.dumps(o) for o in [
      {"prompt": "first", "id": 1}, {"prompt": "", "id": 2}, {"prompt": " spaced "}]) + "\n\n")
  assert load_prompts(str(p)) == ["first", "", " spaced "]
  q = tmp_path / "c.jsonl"
  q.write_text('{"caption": "a"}\n{"caption": "b", "text": "t"}\n')
  assert read_jsonl(str(q)) == ["a", "b"]
  r = tmp_path / "t.jsonl"
  r.write_text('{"text": "x", "caption": "y"}\n')
  assert read_jsonl(str(r), field="text") == ["x"]


def test_jsonl_errors(tmp_path):
  p = tmp_path / "p.jsonl"
  p.write_text('{"prompt": "ok"}\n\n{"caption_text": "no"}\n')
  with pytest.raises(PromptError, match=r"p.jsonl:3: no field 'prompt' or 'caption'.*caption_text"):
    load_prompts(str(p))
  p.write_text('{"prompt": "ok"}\n{"prompt": "x"\n')
  with pytest.raises(PromptError, match="p.jsonl:2: not valid JSON"):
    load_prompts(str(p))
  p.write_text('{"prompt": 3}\n')
  with pytest.raises(PromptError, match="p.jsonl:1: field 'prompt' is a int"):
    load_prompts(str(p))
  p.write_text('["prompt"]\n')
  with pytest.raises(PromptError, match="p.jsonl:1: expected a JSON object"):
    load_prompts(str(p))
  p.write_text('{"prompt": "a"}\n{"text": "b"}\n')
  with pytest.raises(PromptError, match="p.jsonl:1: no field 'text'"):
    read_jsonl(str(p), field="text")
  p.write_text("\n")
  with pytest.raises(PromptError, match="no prompts"):
    load_prompts(str(p))
  with pytest.raises(FileNotFoundError, match="gone.jsonl"):
    load_prompts(str(tmp_path / "gone.jsonl"))


# ------------------------------------------------------------------ tfds
def test_tfds_coco_layout(data_dir):
  first = load_prompts("tfds:tiny_coco_captions/2014/train", data_dir=data_dir)
  every = load_prompts("tfds:tiny_coco_captions/2014:1.1.0/train", data_dir=data_dir,
                       all_captions=True)
  assert sorted(first) == [f"cap {i} a" for i in range(6)]
  # All captions: each record's captions in order, records in the same order as above.
  assert every == [c for p in first for c in (p, p.replace(" a", " b é"))]
  assert load_prompts("tfds:tiny_coco_captions/2014/train", data_dir=data_dir) == first
  explicit = load_prompts("tfds:tiny_coco_captions/train[:3]", data_dir=data_dir,
                          caption_key="captions/text")
  assert explicit == first[:3]
  assert len(load_prompts("tfds:tiny_coco_captions/2014/validation", data_dir=data_dir)) == 2


def test_tfds_auto_key_and_errors(data_dir):
  assert sorted(load_prompts("tfds:tiny_prompts/train", data_dir=data_dir)) == [
      f"prompt number {i}" for i in range(5)]
  with pytest.raises(PromptError, match="no feature 'captions/text'.*prompt"):
    load_prompts("tfds:tiny_prompts/train", data_dir=data_dir, caption_key="captions/text")
  with pytest.raises(PromptError, match="'score' holds float"):
    load_prompts("tfds:tiny_prompts/train", data_dir=data_dir, caption_key="score")
  with pytest.raises(FileNotFoundError, match="no prepared tfds dataset not_there"):
    load_prompts("tfds:not_there/train", data_dir=data_dir)
  with pytest.raises(PromptError, match="should read tfds:<name>"):
    load_prompts("tfds:tiny_prompts", data_dir=data_dir)
  with pytest.raises(PromptError, match="cannot open .*'nosuchsplit'.*one of \\['train'\\]"):
    load_prompts("tfds:tiny_prompts/nosuchsplit", data_dir=data_dir)


def test_tfds_needs_array_record(data_dir, tmp_path):
  # A tfrecord dataset (what `tfds build` writes by default) needs TensorFlow to read:
  # we say so instead of failing inside tfds. (Writing tfrecord needs TF, so fake it.)
  shutil.copytree(os.path.join(data_dir, "tiny_prompts"), tmp_path / "tiny_prompts")
  info = tmp_path / "tiny_prompts" / "1.0.0" / "dataset_info.json"
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(PromptError, match=r"stored as \['tfrecord'\].*array_record"):
    load_prompts("tfds:tiny_prompts/train", data_dir=str(tmp_path))
