"""Latent caches: image sources (folder, tfds), BAPPS 2AFC folders, VAE-latent parity with
diffusers, resume after an interruption (bit-exact), captions, errors."""

import os
import shutil

import jax
import latent_vgg_data as D
import numpy as np
import pytest
import torch
from PIL import Image
from torch_utils import assert_close_to_scale

from d2g_jax.convert.vae import load_vae
from d2g_jax.data import bapps, images, latents, source
from d2g_jax.data import shards as fmt


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("latent_data")
  vae_dir = D.make_vae(str(root / "vae"))
  module, params = load_vae(vae_dir)
  return {"root": root, "vae_dir": vae_dir, "vae": module, "params": params,
          "images": D.make_image_folder(str(root / "images")),
          "bapps": D.make_bapps(str(root / "bapps"))}


def _write(out, src, data, **kw):
  meta = latents.vae_meta(data["vae_dir"], data["vae"].config, "float32")
  kw = {"image_size": 16, "batch_size": 8, "shard_size": 8, "meta": meta, "progress": False,
        "workers": 2, **kw}
  write = latents.write_bapps_latents if isinstance(src, bapps.TwoAFC) else \
      latents.write_image_latents
  return write(str(out), src, data["vae"], data["params"], **kw)


def _records(folder):
  src = source.ShardSource(str(folder))
  return [src[i] for i in range(len(src))]


def test_folder_source_and_resize(data, tmp_path):
  src = images.open_images("folder:" + data["images"])
  assert src.class_names == ["apple", "bean", "cloud"] and len(src) == 18
  assert [src.item(i)[1] for i in (0, 6, 17)] == [0, 1, 2]
  assert src.item(1)[2] == "apple/001.jpg"
  # Shorter side to 16, centre crop: a 20x40 image of three vertical bands keeps the middle.
  bands = np.zeros((20, 40, 3), np.uint8)
  bands[:, 14:26] = 255
  out = images.resize_center_crop(Image.fromarray(bands), 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  assert out[:, 3:13].min() > 200 and out[:, 0].max() < 60 and out[:, -1].max() < 60

  empty = tmp_path / "bad"
  (empty / "only_class").mkdir(parents=True)
  with pytest.raises(images.ImageSourceError, match="only_class.*holds no images"):
    images.open_images(f"folder:{empty}")
  with pytest.raises(FileNotFoundError, match="one subfolder per class"):
    images.open_images(f"folder:{tmp_path / 'missing'}")
  with pytest.raises(images.ImageSourceError, match="expected folder:<root>"):
    images.open_images(str(tmp_path))
  (empty / "only_class" / "x.png").write_bytes(b"not a png")
  with pytest.raises(images.ImageSourceError, match="x.png: cannot decode"):
    images.open_images(f"folder:{empty}").item(0)


def test_image_latents_match_diffusers_vae(data, tmp_path):
  """The cache holds the posterior mean times the scaling factor, as diffusers computes it."""
  out = tmp_path / "cache"
  src = images.open_images("folder:" + data["images"])
  m = _write(out, src, data, num=9)  # evenly spaced: every class
  assert m["status"] == "complete" and m["num_examples"] == 9 and m["num_shards"] == 2
  assert m["record"] == {"index": "int", "label": "int", "key": "str",
                         "latent": "float32[8, 8, 4]"}
  assert m["config"]["class_names"] == src.class_names
  recs = _records(out)
  assert [r["label"] for r in recs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  pixels = np.stack([images.resize_center_crop(src.item(i)[0], 16)
                     for i in latents.select(18, 9)])
  import diffusers
  ref = diffusers.AutoencoderKL.from_pretrained(data["vae_dir"]).eval()
  x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
  with torch.no_grad():
    want = ref.encode(x).latent_dist.mean * ref.config.scaling_factor
  got = np.stack([r["latent"] for r in recs])
  assert_close_to_scale(got, want.numpy().transpose(0, 2, 3, 1))


def test_resume_after_interruption_is_bit_exact(data, tmp_path, monkeypatch):
  src = images.open_images("folder:" + data["images"])
  whole = _write(tmp_path / "whole", src, data)
  out = tmp_path / "cache"
  item = src.item

  def failing(i):
    if i == 17:  # loaded while shard 1 is still in flight
      raise RuntimeError("killed")
    return item(i)
  monkeypatch.setattr(src, "item", failing)
  with pytest.raises(RuntimeError, match="killed"):
    _write(out, src, data)
  done = sorted(f for f in os.listdir(out) if f.endswith(".json") and f.startswith("latents-"))
  assert done == [fmt.sidecar_name(0, 3, fmt.LATENTS)]  # shard 0 complete, shard 1 not
  assert fmt.read_manifest(str(out), fmt.LATENTS)["status"] == "in_progress"
  with pytest.raises(fmt.ShardError, match="latent_cache stage again"):
    source.ShardSource(str(out))
  monkeypatch.setattr(src, "item", item)
  again = _write(out, src, data)
  assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in whole["shards"]]
  # Another config into the same folder is refused, naming what differs.
  with pytest.raises(ValueError, match="different config(.|\n)*image_size"):
    _write(out, src, data, image_size=8)


def test_tfds_images_labels_and_captions(data, tmp_path):
  data_dir = D.make_tfds_images(str(tmp_path / "tfds"))
  src = images.open_images("tfds:tiny_imagenet/train", data_dir=data_dir)
  assert len(src) == 9 and src.class_names == ["n01", "n02", "n03"]
  number = lambda key: int(key.split("_")[-1][:-len(".png")])  # tfds keeps its own order
  image, label, key = src.item(4)
  assert image.size == (24, 16) and label == number(key) % 3
  m = _write(tmp_path / "labels", src, data)
  assert m["config"]["source"]["kind"] == "tfds" and m["num_examples"] == 9
  recs = _records(tmp_path / "labels")
  assert sorted(number(r["key"]) for r in recs) == list(range(9))
  assert all(r["label"] == number(r["key"]) % 3 for r in recs)

  captioned = images.open_images("tfds:tiny_imagenet/validation", data_dir=data_dir,
                                 caption_key="caption")
  m = _write(tmp_path / "captions", captioned, data)
  assert m["record"]["caption"] == "str" and "label" not in m["record"]
  assert sorted(r["caption"] for r in _records(tmp_path / "captions")) == [
      f"a tinted square {i}" for i in range(3)]
  with pytest.raises(images.ImageSourceError, match="no ClassLabel feature 'class'"):
    images.open_images("tfds:tiny_imagenet/train", data_dir=data_dir, label_key="class")
  with pytest.raises(FileNotFoundError, match="tfds build imagenet2012"):
    images.open_images("tfds:imagenet2012/train", data_dir=str(tmp_path / "none"))


def test_bapps_reader_and_cache(data, tmp_path):
  val = bapps.TwoAFC(data["bapps"], "val")
  assert val.distortions == ["color", "deblur"] and len(val) == 16
  ref, p0, p1, judge, dist, key = val.item(9)
  assert (dist, key, judge) == ("deblur", "deblur/000001", pytest.approx(0.8))
  m = _write(tmp_path / "bapps_val", val, data)
  assert m["record"]["judge"] == "float" and m["record"]["p1"] == "float32[8, 8, 4]"
  rec = source.ShardSource(str(tmp_path / "bapps_val"))[9]
  assert (rec["distortion"], rec["key"]) == ("deblur", "deblur/000001")
  x = np.stack([np.asarray(im) for im in (ref, p0, p1)])
  want = jax.jit(lambda p, x: latents.encode_images(data["vae"], p, x))(data["params"], x)
  for i, k in enumerate(("ref", "p0", "p1")):
    np.testing.assert_allclose(rec[k], want[i], rtol=1e-5, atol=1e-5)

  broken = shutil.copytree(data["bapps"], tmp_path / "broken")
  os.remove(broken / "2afc" / "train" / "mix" / "judge" / "000003.npy")
  with pytest.raises(images.ImageSourceError, match="mix/000003 is incomplete"):
    bapps.TwoAFC(str(broken), "train")
  with pytest.raises(FileNotFoundError, match="2afc/test"):
    bapps.TwoAFC(data["bapps"], "test")
