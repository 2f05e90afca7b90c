"""diffusers' `AutoencoderKL` (the SD / SDXL VAE) in Flax, NHWC.

Legend: B batch, H/W pixel height/width, h/w latent height/width (H/8, W/8 for SD),
C channels, L latent channels (4 for SD/SDXL), T = h*w tokens.

Parameter names mirror diffusers (`encoder.down_blocks_{i}.resnets_{j}`,
`encoder.mid_block.attentions_0.to_q`, `quant_conv`, `decoder.up_blocks_{i}.upsamplers_0.conv`,
...) so `d2g_jax.convert.vae` is a name table. `encode` returns the latent
distribution's mean and clamped log-variance of *unscaled* latents; the diffusion
model sees `config.scale_latents(z)`; `decode` takes unscaled latents and returns
pixels in about [-1, 1].
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from d2g_jax.models.attention import IMPLEMENTATIONS, attention
from d2g_jax.models.layers import (
  Downsample2D,
  ResnetBlock2D,
  Upsample2D,
  activation,
  conv,
  group_norm,
)

Dtype = Any
PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "presets")
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp
RESNET_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hyperparameters of an AutoencoderKL, as in diffusers' `vae/config.json`."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 512
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    n = len(self.block_out_channels)
    if (set(self.down_block_types) != {"DownEncoderBlock2D"} or
        set(self.up_block_types) != {"UpDecoderBlock2D"}):
      raise ValueError("only DownEncoderBlock2D / UpDecoderBlock2D VAEs are supported; found "
                       f"down {self.down_block_types}, up {self.up_block_types}")
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"{n} block_out_channels but {len(self.down_block_types)} down and "
                       f"{len(self.up_block_types)} up blocks")
    activation(self.act_fn)  # raises on an unknown name
    if (self.latents_mean is None) != (self.latents_std is None):
      raise ValueError("latents_mean and latents_std must be given together")

  @property
  def downscale(self) -> int:
    """Pixels per latent along each side (8 for SD)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: dict) -> "VAEConfig":
    """From a diffusers AutoencoderKL config dict (a pipeline's vae/config.json)."""
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(f"expected an AutoencoderKL config, found _class_name {name!r}")
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in config:
        v = config[f.name]
        kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    if isinstance(kwargs.get("sample_size"), tuple):
      kwargs["sample_size"] = kwargs["sample_size"][0]
    return cls(**kwargs)

  def to_diffusers(self) -> dict:
    """The diffusers config.json dict of this model."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    return {"_class_name": "AutoencoderKL", **d}

  @classmethod
  def sd(cls) -> "VAEConfig":
    """The SD 1.x / 2.x VAE (d2g_jax/presets/sd_vae.json)."""
    with open(os.path.join(PRESETS_DIR, "sd_vae.json")) as fh:
      return cls.from_diffusers(json.load(fh))

  @classmethod
  def sdxl(cls) -> "VAEConfig":
    """The SDXL VAE: the SD architecture with another latent scale."""
    return dataclasses.replace(cls.sd(), scaling_factor=0.13025, sample_size=1024)

  @classmethod
  def tiny(cls, **overrides) -> "VAEConfig":
    """A small two-level VAE for tests."""
    kw = dict(down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2,
              block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16)
    return cls(**{**kw, **overrides})

  # Latent scaling, as the SD / SDXL pipelines do it.
  def scale_latents(self, z):
    """Unscaled VAE latents -> the latents the diffusion model sees."""
    if self.latents_mean is not None:
      mean, std = jnp.asarray(self.latents_mean), jnp.asarray(self.latents_std)
      return (z - mean) * self.scaling_factor / std
    return (z - (self.shift_factor or 0.0)) * self.scaling_factor

  def unscale_latents(self, latents):
    """Diffusion-model latents -> unscaled VAE latents for `decode`."""
    if self.latents_mean is not None:
      mean, std = jnp.asarray(self.latents_mean), jnp.asarray(self.latents_std)
      return latents * std / self.scaling_factor + mean
    return latents / self.scaling_factor + (self.shift_factor or 0.0)


class VAEAttention(nn.Module):
  """The mid-block self-attention: group norm, one head over all pixels, residual."""
  groups: int
  rescale_output_factor: float = 1.0
  implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, h, w, c = x_BxHxWxC.shape
    y = group_norm(self.groups, RESNET_EPS, self.param_dtype, "group_norm")(x_BxHxWxC)
    y_BxTxC = y.reshape(b, h * w, c).astype(self.dtype)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q, k, v = (dense(n)(y_BxTxC)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))
    o_BxTxC = attention(q, k, v, implementation=self.implementation, upcast=True)[:, :, 0]
    o = dense("to_out_0")(o_BxTxC).reshape(b, h, w, c)
    out = o + x_BxHxWxC.astype(self.dtype)
    if self.rescale_output_factor != 1.0:
      out = out / self.rescale_output_factor
    return out


class MidBlock(nn.Module):
  """diffusers `UNetMidBlock2D` without time embedding: resnet, (attention, resnet)."""
  channels: int
  config: VAEConfig
  implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg = self.config
    resnet = lambda i: ResnetBlock2D(self.channels, cfg.norm_num_groups, RESNET_EPS, cfg.act_fn,
                                     dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=f"resnets_{i}")
    x = resnet(0)(x_BxHxWxC)
    if cfg.mid_block_add_attention:
      x = VAEAttention(cfg.norm_num_groups, implementation=self.implementation, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="attentions_0")(x)
    return resnet(1)(x)


class SampleBlock(nn.Module):
  """diffusers `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then a resampler."""
  channels: int
  config: VAEConfig
  num_layers: int
  resample: str | None  # "down", "up" or None (last block)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x_BxHxWxC = ResnetBlock2D(self.channels, cfg.norm_num_groups, RESNET_EPS, cfg.act_fn, **kw,
                                name=f"resnets_{j}")(x_BxHxWxC)
    if self.resample == "down":
      x_BxHxWxC = Downsample2D(self.channels, padding=0, **kw, name="downsamplers_0")(x_BxHxWxC)
    elif self.resample == "up":
      x_BxHxWxC = Upsample2D(self.channels, **kw, name="upsamplers_0")(x_BxHxWxC)
    return x_BxHxWxC


class Encoder(nn.Module):
  """Pixels BxHxWx3 -> Bxhxwx(2L) (mean and log-variance, before quant_conv)."""
  config: VAEConfig
  implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = cfg.block_out_channels
    x = conv(chans[0], 3, self.dtype, self.param_dtype, "conv_in")(x_BxHxWxC.astype(self.dtype))
    for i, ch in enumerate(chans):
      x = SampleBlock(ch, cfg, cfg.layers_per_block, "down" if i < len(chans) - 1 else None, **kw,
                      name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], cfg, self.implementation, **kw, name="mid_block")(x)
    x = activation(cfg.act_fn)(group_norm(cfg.norm_num_groups, RESNET_EPS, self.param_dtype,
                                          "conv_norm_out")(x)).astype(self.dtype)
    return conv(2 * cfg.latent_channels, 3, self.dtype, self.param_dtype, "conv_out")(x)


class Decoder(nn.Module):
  """Latents Bxhxwx L (after post_quant_conv) -> pixels BxHxWx3."""
  config: VAEConfig
  implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z_BxhxwxL):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = tuple(reversed(cfg.block_out_channels))
    x = conv(chans[0], 3, self.dtype, self.param_dtype, "conv_in")(z_BxhxwxL.astype(self.dtype))
    x = MidBlock(chans[0], cfg, self.implementation, **kw, name="mid_block")(x)
    for i, ch in enumerate(chans):
      x = SampleBlock(ch, cfg, cfg.layers_per_block + 1, "up" if i < len(chans) - 1 else None, **kw,
                      name=f"up_blocks_{i}")(x)
    x = activation(cfg.act_fn)(group_norm(cfg.norm_num_groups, RESNET_EPS, self.param_dtype,
                                          "conv_norm_out")(x)).astype(self.dtype)
    return conv(cfg.out_channels, 3, self.dtype, self.param_dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """Encoder, decoder and the 1x1 (post_)quant_convs of diffusers' AutoencoderKL.

  `model.apply({"params": p}, x, method=AutoencoderKL.encode)` -> (mean, logvar);
  `model.apply({"params": p}, z, method=AutoencoderKL.decode)` -> pixels.
  `implementation` picks the mid-block attention kernel (see models/attention.py);
  "chunked" keeps the 1024 px (16,384-token) attention small in memory.
  """
  config: VAEConfig
  implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"attention implementation {self.implementation!r} is not one of "
                       f"{IMPLEMENTATIONS}")
    kw = dict(implementation=self.implementation, dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    L = cfg.latent_channels
    if cfg.use_quant_conv:
      self.quant_conv = conv(2 * L, 1, self.dtype, self.param_dtype, "quant_conv")
    if cfg.use_post_quant_conv:
      self.post_quant_conv = conv(L, 1, self.dtype, self.param_dtype, "post_quant_conv")

  def encode(self, x_BxHxWx3) -> tuple[jax.Array, jax.Array]:
    """Pixels in [-1, 1] -> (mean, logvar) of unscaled latents, fp32, Bxhxwx L each."""
    h = self.encoder(x_BxHxWx3)
    if self.config.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z_BxhxwxL) -> jax.Array:
    """Unscaled latents -> pixels (about [-1, 1]), BxHxWx3 in `dtype`."""
    z = z_BxhxwxL.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x_BxHxWx3, rng: jax.Array | None = None):
    """Reconstruction through the mean (or a sample when `rng` is given): (x, mean, logvar)."""
    mean, logvar = self.encode(x_BxHxWx3)
    z = mean if rng is None else sample_latent(rng, mean, logvar)
    return self.decode(z), mean, logvar

  def init_shapes(self, size: int = 64):
    """The param tree as `jax.ShapeDtypeStruct`s, without allocating."""
    x = jax.ShapeDtypeStruct((1, size, size, self.config.in_channels), jnp.float32)
    return jax.eval_shape(lambda a: self.init(jax.random.PRNGKey(0), a), x)["params"]


def decode_latents(vae: AutoencoderKL, params: Any, latents_BxhxwxL: jax.Array) -> jax.Array:
  """Diffusion latents (scaled by the VAE's scaling factor, as samplers make them) -> RGB
  pixels BxHxWx3, about [-1, 1], fp32. Pure: jit it, or call it inside a jitted step."""
  raw = vae.config.unscale_latents(latents_BxhxwxL.astype(jnp.float32))
  return vae.apply({"params": params}, raw, method=AutoencoderKL.decode).astype(jnp.float32)


def sample_latent(rng: jax.Array, mean, logvar) -> jax.Array:
  """A draw from the diagonal Gaussian N(mean, exp(logvar))."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
