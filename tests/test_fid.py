"""FID pieces against clean-fid: the resize, the whole folder -> features path, the distance."""

import io
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
from PIL import Image
from test_inception import random_fid_state_dict
from torch_utils import assert_close_to_scale

from d2g_jax.convert import inception as convert
from d2g_jax.evaluate import fid as fid_lib
from d2g_jax.evaluate import images as images_lib
from d2g_jax.evaluate.resize import fid_resize, resize_host
from d2g_jax.models.inception import FIDInceptionV3


@pytest.mark.parametrize("shape", [(512, 512), (37, 80), (120, 299), (640, 427)])
def test_resize_matches_clean_fid(shape):
  """Device (matrices, float32) and host (PIL) resize vs clean-fid's "clean" resizer."""
  from cleanfid.resize import build_resizer
  image = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,)).astype(np.uint8)
  want = build_resizer("clean")(image)
  np.testing.assert_allclose(resize_host(image, (299, 299)), want, atol=1e-4)
  got = np.asarray(fid_resize(jnp.asarray(image, jnp.float32)[None]))[0]
  np.testing.assert_allclose(got, want, atol=2e-4)  # float32 vs PIL's float64 sums


def test_frechet_distance_matches_clean_fid():
  from cleanfid.fid import frechet_distance as reference
  rng = np.random.default_rng(0)
  a = rng.standard_normal((400, 64)).astype(np.float32)
  b = (rng.standard_normal((300, 64)) @ (np.eye(64) + 0.1 * rng.standard_normal((64, 64))) + 0.2
       ).astype(np.float32)
  mu1, s1 = fid_lib.statistics(a)
  mu2, s2 = fid_lib.statistics(b)
  assert mu1.dtype == s1.dtype == np.float64
  np.testing.assert_allclose(s1, np.cov(a, rowvar=False))
  want = reference(mu1, s1, mu2, s2)
  assert want > 1
  assert fid_lib.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
  assert fid_lib.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)
  # Fewer samples than dimensions: singular covariances, clean-fid's eps fallback path.
  c, d = a[:20], b[:25]
  got = fid_lib.frechet_distance(*fid_lib.statistics(c), *fid_lib.statistics(d))
  assert got == pytest.approx(reference(*fid_lib.statistics(c), *fid_lib.statistics(d)),
                              rel=1e-4)


@pytest.fixture(scope="module")
def fid_net():
  state = random_fid_state_dict(seed=3)
  return state, FIDInceptionV3("clean"), convert.params_from_state_dict(state)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("real")
  rng = np.random.default_rng(5)
  for i, (h, w) in enumerate([(64, 80), (90, 60), (75, 75)]):
    sub = folder / ("b" if i == 1 else "")
    sub.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(sub / f"{i}.png")
  (folder / "notes.txt").write_text("not an image")
  return str(folder)


def test_folder_features_match_clean_fid(fid_net, image_folder, monkeypatch):
  """Our folder -> features path vs clean-fid's `get_folder_features` in "clean" mode, with
  pytorch-fid's network (same random weights) as clean-fid's feature extractor."""
  from cleanfid import fid as cf
  from test_inception import reference_network
  state, module, params = fid_net
  net = reference_network(state, monkeypatch)
  model = lambda x: net((x - 128.0) / 256.0 + 0.5)[0][:, :, 0, 0]  # pytorch-fid applies 2x - 1
  want = cf.get_folder_features(image_folder, model, num_workers=0, batch_size=2,
                                device=torch.device("cpu"), mode="clean", verbose=False)
  got = fid_lib.image_features(image_folder, module, params, batch_size=2, threads=2)
  assert got.shape == (3, 2048)
  assert_close_to_scale(got, want)


def test_reference_statistics_cached(fid_net, image_folder, tmp_path, monkeypatch):
  _, module, params = fid_net
  kw = dict(cache_dir=str(tmp_path), weights_sha256="abc", batch_size=2)
  mu, sigma, info = fid_lib.reference_statistics(image_folder, module, params, **kw)
  assert info["num_images"] == 3 and os.path.isfile(info["cache"])
  monkeypatch.setattr(fid_lib, "image_features", lambda *a, **k: pytest.fail("recomputed"))
  mu2, sigma2, _ = fid_lib.reference_statistics(image_folder, module, params, **kw)
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)
  assert fid_lib.load_stats(info["cache"])[0].shape == (2048,)
  # Another Inception weights file, or another preparation, is another cache entry.
  monkeypatch.undo()
  other = fid_lib.reference_statistics(image_folder, module, params, **{**kw, "limit": 2})
  assert other[2]["cache"] != info["cache"] and other[2]["num_images"] == 2


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """COCO's layout for images: an encoded image and its id."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "image/id": np.int64}))

  def _split_generators(self, dl_manager):
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    for i in range(2):
      buf = io.BytesIO()
      Image.fromarray(np.full((4, 5, 3), i, np.uint8)).save(buf, format="PNG")
      yield i, {"image": buf.getvalue(), "image/id": i}


def test_tfds_images_and_preparation(tmp_path):
  data_dir = str(tmp_path)
  TinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  spec = "tfds:tiny_images/validation"
  images = list(images_lib.iter_images(spec, data_dir=data_dir))
  assert images_lib.count_images(spec, data_dir=data_dir) == len(images) == 2
  assert images[1].shape == (4, 5, 3) and images[1].dtype == np.uint8 and images[1].max() == 1
  with pytest.raises(KeyError, match="ref_image_key"):
    next(images_lib.iter_images(spec, data_dir=data_dir, image_key="picture"))
  wide = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
  np.testing.assert_array_equal(images_lib.prepare(wide, center_crop=True), wide[:, 2:8])
  assert images_lib.prepare(wide, True, 16).shape == (16, 16, 3)
  with pytest.raises(FileNotFoundError, match="no image files"):
    images_lib.list_image_files(str(tmp_path / "tiny_images"))
