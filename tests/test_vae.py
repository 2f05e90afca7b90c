"""AutoencoderKL: parity with diffusers, conversion both ways, presets, errors."""

import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from d2g_jax.convert import core
from d2g_jax.convert import vae as vae_convert
from d2g_jax.models.unet import count_params as num_params
from d2g_jax.models.vae import AutoencoderKL, VAEConfig


def _torch_vae(cfg: VAEConfig, seed=0):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**{k: v for k, v in cfg.to_diffusers().items()
                                     if not k.startswith("_")}).eval()
  with torch.no_grad():  # norms start at (1, 0): perturb them so they are tested too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


CASES = {
    "default": {},
    "no-quant-no-attn": dict(use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False, latent_channels=3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_with_diffusers(name):
  cfg = VAEConfig.tiny(**CASES[name])
  tvae = _torch_vae(cfg)
  if cfg.use_quant_conv:  # push one log-variance channel past diffusers' clamp at 20
    with torch.no_grad():
      tvae.quant_conv.bias[cfg.latent_channels] += 40.0
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(2, 16, 24, 3)).astype(np.float32)  # non-square catches transposes
  z = rng.normal(size=(2, 4, 6, cfg.latent_channels)).astype(np.float32)
  with torch.no_grad():
    dist = tvae.encode(_nchw(x)).latent_dist
    ref_x = tvae.decode(_nchw(z)).sample
  params = vae_convert.params_from_state_dict(cfg, tvae.state_dict())
  model = AutoencoderKL(cfg)
  mean, logvar = jax.jit(lambda p, a: model.apply({"params": p}, a, method=AutoencoderKL.encode))(
      params, jnp.asarray(x))
  dec = jax.jit(lambda p, a: model.apply({"params": p}, a, method=AutoencoderKL.decode))(
      params, jnp.asarray(z))
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(mean), _nhwc(dist.mean), **tol)
  np.testing.assert_allclose(np.asarray(logvar), _nhwc(dist.logvar), **tol)
  if cfg.use_quant_conv:
    assert np.asarray(logvar)[..., 0].max() == 20.0  # the clamp was exercised
  np.testing.assert_allclose(np.asarray(dec), _nhwc(ref_x), **tol)
  recon, m2, _ = model.apply({"params": params}, jnp.asarray(x))  # __call__ = decode(encode)
  np.testing.assert_allclose(np.asarray(m2), np.asarray(mean), rtol=1e-6, atol=1e-6)
  assert recon.shape == x.shape


def test_chunked_attention_and_bf16_match():
  cfg = VAEConfig.tiny()
  tvae = _torch_vae(cfg, seed=1)
  params = vae_convert.params_from_state_dict(cfg, tvae.state_dict())
  z = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, 6, 4)), jnp.float32)
  dec = lambda m: m.apply({"params": params}, z, method=AutoencoderKL.decode)
  ref = dec(AutoencoderKL(cfg))
  chunked = dec(AutoencoderKL(cfg, implementation="chunked"))
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(ref), rtol=1e-5, atol=1e-5)
  low = dec(AutoencoderKL(cfg, dtype=jnp.bfloat16))
  assert low.dtype == jnp.bfloat16
  err = float(jnp.max(jnp.abs(low.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
  assert err < 5e-2, err


def test_folder_round_trip(tmp_path):
  cfg = VAEConfig.tiny(shift_factor=0.1, scaling_factor=0.3)
  tvae = _torch_vae(cfg, seed=2)
  tvae.save_pretrained(tmp_path / "src")
  module, params = vae_convert.load_vae(str(tmp_path / "src"))
  assert module.config == cfg
  vae_convert.save_vae(module, params, str(tmp_path / "out"))
  reloaded, info = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out",
                                                           output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert reloaded.config.shift_factor == 0.1 and reloaded.config.scaling_factor == 0.3
  for k, v in tvae.state_dict().items():
    assert torch.equal(reloaded.state_dict()[k], v), k
  _, params2 = vae_convert.load_vae(str(tmp_path / "out"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_deprecated_attention_names(tmp_path):
  cfg = VAEConfig.tiny()
  tvae = _torch_vae(cfg, seed=3)
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = {}
  for k, v in tvae.state_dict().items():
    for new, dep in old.items():
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
    state[k] = v.numpy()
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in state
  core.save_safetensors(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  core.save_json(cfg.to_diffusers(), str(tmp_path / "config.json"))
  _, params = vae_convert.load_vae(str(tmp_path))
  ref = vae_convert.params_from_state_dict(cfg, tvae.state_dict())
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)


def test_latent_scaling_matches_pipelines():
  z = jnp.asarray(np.random.default_rng(4).normal(size=(1, 2, 2, 4)), jnp.float32)
  sd = VAEConfig.sd()
  np.testing.assert_allclose(sd.scale_latents(z), z * 0.18215, rtol=1e-6)
  shifted = VAEConfig.tiny(shift_factor=0.0609, scaling_factor=1.5035)
  np.testing.assert_allclose(shifted.scale_latents(z), (z - 0.0609) * 1.5035, rtol=1e-6)
  stats = VAEConfig.tiny(latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 2.0, 3.0, 4.0),
                         scaling_factor=0.5)
  for c in (sd, shifted, stats):
    np.testing.assert_allclose(c.unscale_latents(c.scale_latents(z)), z, rtol=1e-5, atol=1e-6)
  # SDXL pipeline decode: latents * std / scaling_factor + mean
  np.testing.assert_allclose(stats.unscale_latents(z),
                             z * jnp.array([1.0, 2, 3, 4]) / 0.5 + jnp.array([0.1, 0.2, 0.3, 0.4]),
                             rtol=1e-6)


def test_sd_preset_param_count_and_table():
  cfg = VAEConfig.sd()
  shapes = AutoencoderKL(cfg).init_shapes()
  assert num_params(shapes) == 83_653_863
  with torch.device("meta"):
    tvae = diffusers.AutoencoderKL(**{k: v for k, v in cfg.to_diffusers().items()
                                      if not k.startswith("_")})
  assert sum(p.numel() for p in tvae.parameters()) == 83_653_863
  table, _ = vae_convert.vae_table(cfg)
  src = core.TensorSource("meta", {k: tuple(v.shape) for k, v in tvae.state_dict().items()},
                          lambda k: None)
  core.check_table(table, shapes, src)
  xl = VAEConfig.sdxl()
  assert xl.scaling_factor == 0.13025 and num_params(AutoencoderKL(xl).init_shapes()) == 83_653_863
  assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg and cfg.downscale == 8


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="VAE folder"):
    vae_convert.load_vae(str(tmp_path / "nowhere"))
  cfg = VAEConfig.tiny()
  _torch_vae(cfg).save_pretrained(tmp_path / "m")
  conf = json.load(open(tmp_path / "m" / "config.json"))
  conf["block_out_channels"] = [8, 32]
  json.dump(conf, open(tmp_path / "m" / "config.json", "w"))
  with pytest.raises(core.ConversionError, match="mis-shaped"):
    vae_convert.load_vae(str(tmp_path / "m"))
  conf["block_out_channels"] = [8, 16]
  conf["mid_block_add_attention"] = False
  json.dump(conf, open(tmp_path / "m" / "config.json", "w"))
  with pytest.raises(core.ConversionError, match="unexpected keys.*to_q"):
    vae_convert.load_vae(str(tmp_path / "m"))
  os.remove(tmp_path / "m" / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    vae_convert.load_vae(str(tmp_path / "m"))
  with pytest.raises(ValueError, match="DownEncoderBlock2D"):
    VAEConfig.from_diffusers({**cfg.to_diffusers(), "down_block_types": ["DownBlock2D"] * 2})
  with pytest.raises(ValueError, match="AutoencoderKL"):
    VAEConfig.from_diffusers({"_class_name": "AutoencoderTiny"})


@pytest.mark.slow
def test_sd_vae_full_size_parity():
  """The real SD VAE architecture with random weights: encode 128 px, decode 32x32 latents."""
  cfg = VAEConfig.sd()
  tvae = _torch_vae(cfg, seed=5)
  rng = np.random.default_rng(5)
  x = rng.uniform(-1, 1, size=(1, 128, 128, 3)).astype(np.float32)
  z = rng.normal(size=(1, 32, 32, 4)).astype(np.float32)
  with torch.no_grad():
    dist = tvae.encode(_nchw(x)).latent_dist
    ref_x = tvae.decode(_nchw(z)).sample
  params = vae_convert.params_from_state_dict(cfg, tvae.state_dict())
  model = AutoencoderKL(cfg)
  mean, _ = model.apply({"params": params}, jnp.asarray(x), method=AutoencoderKL.encode)
  dec = model.apply({"params": params}, jnp.asarray(z), method=AutoencoderKL.decode)
  for ours, theirs in [(mean, _nhwc(dist.mean)), (dec, _nhwc(ref_x))]:
    scale = np.abs(theirs).max()
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4 * scale
