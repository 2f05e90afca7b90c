"""Fidelity / diversity helpers and the optional DreamSim plumbing (without DreamSim itself)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2g_jax import parallel
from d2g_jax.evaluate import fidelity
from d2g_jax.evaluate.resize import resize


def test_diversity_is_the_mean_pairwise_distance_per_prompt():
  # Prompt 0: seeds at 0, 1, 3 on a line; prompt 1: all equal. |a - b| distances.
  samples = np.array([0.0, 1.0, 3.0, 5.0, 5.0, 5.0])
  dist = lambda a, b: np.abs(a - b)
  assert fidelity.diversity(dist, samples, 2, 3) == pytest.approx((1 + 3 + 2 + 0 + 0 + 0) / 6)
  with pytest.raises(ValueError, match="at least 2 seeds"):
    fidelity.diversity(dist, samples, 6, 1)


def test_cosine_distance():
  a = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
  b = np.array([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
  np.testing.assert_allclose(fidelity.cosine_distance(a, b), [1.0, 0.0, 2.0], atol=1e-12)


def test_dreamsim_missing_is_a_clear_error():
  if importlib.util.find_spec("dreamsim") is not None:
    pytest.skip("the dreamsim package is installed here; this checks the message without it")
  with pytest.raises(ImportError, match=r"pip install dreamsim.*eval.dreamsim=False"):
    fidelity.dreamsim_embedder()


def test_host_embedding_inside_a_sharded_jit():
  """`embed_in_jit` runs a host (PyTorch-style numpy) embedder on 8-bit 224 x 224 images
  from inside a jitted step whose batch is split over 8 devices."""
  proj = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
  seen = []

  def embed(images):
    seen.append((images.dtype, images.shape))
    return images.astype(np.float32).mean(axis=(1, 2)) @ proj

  mesh = parallel.make_mesh()
  pixels = np.random.default_rng(1).integers(0, 256, (8, 40, 48, 3)).astype(np.float32)
  x = jax.device_put(pixels, parallel.batch_sharding(mesh))
  got = jax.jit(lambda p: fidelity.embed_in_jit(embed, 5, p))(x)
  small = np.asarray(resize(jnp.asarray(pixels), (224, 224), quantize=True)).astype(np.uint8)
  np.testing.assert_allclose(np.asarray(got), embed(small), rtol=1e-6)
  assert all(d == np.uint8 and s[1:] == (224, 224, 3) for d, s in seen)
