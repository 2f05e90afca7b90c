"""The regression-loss family behind one interface, and the single-latent reconstruction script."""

import json
import math
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2g_jax import config_defaults
from d2g_jax.losses import perceptual
from d2g_jax.models.latent_vgg import LPIPS, LPIPSConfig, init_params


def _pair(shape=(2, 8, 8, 4), seed=0):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal(shape).astype(np.float32)
  return jnp.asarray(a), jnp.asarray(a + 0.3 * rng.standard_normal(shape).astype(np.float32))


def test_mse_and_pseudo_huber_values():
  a, b = _pair()
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  np.testing.assert_allclose(perceptual.mse(a, b), (d ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
  c = 0.00054 * math.sqrt(8 * 8 * 4)
  assert perceptual.huber_c((8, 8, 4)) == pytest.approx(c)
  assert perceptual.huber_c((64, 64, 4)) == pytest.approx(0.06912)
  want = np.sqrt((d ** 2).sum(axis=(1, 2, 3)) + c * c) - c
  np.testing.assert_allclose(perceptual.pseudo_huber(a, b), want, rtol=1e-5)
  np.testing.assert_allclose(perceptual.pseudo_huber(a, b, c=0.5),
                             np.sqrt((d ** 2).sum(axis=(1, 2, 3)) + 0.25) - 0.5, rtol=1e-5)
  for name in ("mse", "pseudo_huber"):
    fn = jax.jit(perceptual.make_loss(name))
    assert fn(None, a, a, None) == 0.0
    assert fn(None, a, b, None) > 0.0


def test_latent_losses_jit_grad_and_zero_at_identity():
  module = LPIPS(LPIPSConfig.latent("sd15", augment="bgco"))
  params = init_params(module)
  a, b = _pair()
  key = jax.random.PRNGKey(0)
  for name in ("latent_lpips", "e_latent_lpips"):
    fn = perceptual.make_loss(name, module=module)
    step = jax.jit(jax.value_and_grad(fn, argnums=1))
    value, grad = step(params, a, b, key)
    assert value.shape == () and value > 0
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    same, grad_same = step(params, a, a, key)
    # Identical inputs: zero under every augmentation, up to rounding (a and b take separately
    # compiled trunk passes when only a is differentiated).
    assert abs(float(same)) < 1e-9 * float(value)
    assert np.all(np.isfinite(grad_same))
  e_fn = jax.jit(perceptual.make_loss("e_latent_lpips", module=module))
  plain = perceptual.make_loss("latent_lpips", module=module)(params, a, b, None)
  draws = [float(e_fn(params, a, b, jax.random.PRNGKey(i))) for i in range(2)]
  assert draws[0] != draws[1] and float(plain) not in draws  # the ensemble draws augmentations
  with pytest.raises(ValueError, match="PRNG key"):
    perceptual.make_loss("e_latent_lpips", module=module)(params, a, b, None)


def test_pixel_lpips_loss_decodes_both_latents():
  module = LPIPS(LPIPSConfig.pixel())
  params = {"lpips": init_params(module), "decoder": jnp.float32(0.5)}

  def decode(scale, z):  # a stand-in decoder: 8x8x4 latents -> 32x32 RGB in [-1, 1]
    b, h, w, _ = z.shape
    return jnp.tanh(scale * jax.image.resize(z[..., :3], (b, 4 * h, 4 * w, 3), "bilinear"))

  fn = jax.jit(perceptual.make_loss("lpips", module=module, decode=decode))
  a, b = _pair()
  want = jnp.mean(module.apply({"params": params["lpips"]}, decode(0.5, a), decode(0.5, b)))
  np.testing.assert_allclose(fn(params, a, b, None), want, rtol=1e-5)
  assert fn(params, a, a, None) == 0.0
  with pytest.raises(ValueError, match="decode"):
    perceptual.make_loss("lpips", module=module)


def test_config_and_errors():
  cfg = config_defaults.base().loss
  assert cfg.name in perceptual.NAMES
  cfg.name = "pseudo_huber"
  fn, params = perceptual.loss_from_config(cfg)
  a, b = _pair()
  assert params is None and fn(params, a, b, None) == jnp.mean(perceptual.pseudo_huber(a, b))
  cfg.name, cfg.encoder = "latent_lpips", "sd3"
  with pytest.raises(ValueError, match="loss.allow_random_weights"):  # no weights: refused
    perceptual.loss_from_config(cfg)
  cfg.allow_random_weights = True
  with pytest.warns(RuntimeWarning, match="RANDOMLY"):
    fn, params = perceptual.loss_from_config(cfg)
  assert params["net"]["slice1_0"]["kernel"].shape == (3, 3, 16, 64)
  with pytest.raises(ValueError, match="unknown loss"):
    perceptual.make_loss("l2")
  with pytest.raises(ValueError, match="LPIPS module"):
    perceptual.make_loss("latent_lpips")
  with pytest.raises(ValueError, match="pixel"):
    perceptual.make_loss("latent_lpips", module=LPIPS(LPIPSConfig.pixel()))


def test_reconstruction_script_smoke(tmp_path):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
  try:
    import latent_reconstruction
  finally:
    sys.path.pop(0)
  out = str(tmp_path / "recon")
  target = np.random.default_rng(0).standard_normal((8, 8, 4)).astype(np.float32)
  np.save(tmp_path / "target.npy", target)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    latent_reconstruction.main(["--out", out, "--steps", "3", "--target",
                                str(tmp_path / "target.npy")])
  assert os.path.getsize(os.path.join(out, "reconstruction.png")) > 0
  with open(os.path.join(out, "distances.json")) as fh:
    hist = json.load(fh)["histories"]
  assert sorted(hist) == sorted(latent_reconstruction.LATENT_LOSSES)
  for h in hist.values():
    assert len(h["psnr"]) == 3 and np.all(np.isfinite(h["psnr"])) and np.all(np.isfinite(h["mse"]))
