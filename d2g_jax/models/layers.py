"""Building blocks shared by the UNet and the VAE, named as diffusers names them.

Legend: B batch, H/W height/width, C channels, D embedding width.
All tensors are NHWC. Norms and the timestep embedding run in fp32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any


def timestep_embedding(t_B: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `Timesteps`."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - downscale_freq_shift))
  emb_BxF = scale * t_B.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(emb_BxF), jnp.cos(emb_BxF)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def activation(name: str):
  fns = {"silu": nn.silu, "swish": nn.silu, "gelu": lambda x: nn.gelu(x, approximate=False),
         "mish": lambda x: x * jnp.tanh(nn.softplus(x)), "relu": nn.relu}
  if name not in fns:
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(fns)}")
  return fns[name]


def pairwise_sum(x_BxNxC: jax.Array, stop: int = 64) -> jax.Array:
  """Sum over the middle axis by repeated halving: (B, N, C) -> (B, C).

  Each halving adds two slices elementwise, so XLA fuses the whole chain into one
  vectorised pass that reads `x` once (a plain `sum` over a long axis becomes several
  unfused reduce-window passes on XLA:CPU), and the pairwise order keeps the fp32 error
  at O(log N) ulps. An odd length carries its last row to the next level.
  """
  while x_BxNxC.shape[1] > stop:
    n = x_BxNxC.shape[1]
    h = n // 2
    halves = x_BxNxC[:, :h] + x_BxNxC[:, h:2 * h]
    x_BxNxC = jnp.concatenate([halves, x_BxNxC[:, 2 * h:]], axis=1) if n % 2 else halves
  return x_BxNxC.sum(axis=1)


def middle_sum(x_BxNxC: jax.Array) -> jax.Array:
  """Sum over the middle axis, (B, N, C) -> (B, C), chosen by the platform the program is
  lowered for (`lax.platform_dependent`, so an ahead-of-time TPU compile on a CPU host
  gets the TPU branch): `pairwise_sum` on CPU, XLA's own reduction elsewhere. On TPU the
  halving chain is a memory pass per level: XLA's TPU compiler estimates a GroupNorm +
  SiLU + 3x3 conv block (16x64x64x320, forward and backward) at 1.74 ms with it and
  1.19 ms with the reduction (1.08 instead of 2.37 GB of HBM traffic)."""
  return jax.lax.platform_dependent(x_BxNxC, cpu=pairwise_sum, default=reduce_sum)


def reduce_sum(x_BxNxC: jax.Array) -> jax.Array:
  """`middle_sum` on accelerators: one XLA reduction (fp32 accumulation)."""
  return jnp.sum(x_BxNxC, axis=1)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over channels-last input, statistics and output in fp32.

  Parameters `scale` and `bias` as in `flax.linen.GroupNorm`. The mean and the variance
  (two passes: mean, then mean squared deviation) come from `middle_sum`: on CPU
  `pairwise_sum`, about twice as fast as `flax.linen.GroupNorm` and more accurate than
  its E[x^2] - E[x]^2 variance; on accelerators XLA's reduction.
  """
  num_groups: int
  epsilon: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    b, per_group = x.shape[0], c // self.num_groups
    x_BxNxC = x.astype(jnp.float32).reshape(b, -1, c)
    count = x_BxNxC.shape[1] * per_group

    def group_mean(y_BxNxC):  # -> (B, 1, C): each channel gets its group's mean
      g_BxG = middle_sum(y_BxNxC).reshape(b, self.num_groups, per_group).sum(-1) / count
      return jnp.repeat(g_BxG, per_group, axis=1)[:, None, :]

    d_BxNxC = x_BxNxC - group_mean(x_BxNxC)
    inv_Bx1xC = jax.lax.rsqrt(group_mean(d_BxNxC * d_BxNxC) + self.epsilon)
    y = d_BxNxC * inv_Bx1xC * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.reshape(x.shape)


def group_norm(num_groups: int, epsilon: float, param_dtype, name: str | None = None) -> GroupNorm:
  """torch.nn.GroupNorm over NHWC, statistics and output in fp32."""
  return GroupNorm(num_groups=num_groups, epsilon=epsilon, param_dtype=param_dtype, name=name)


def conv(features: int, kernel: int, dtype, param_dtype, name: str | None = None, stride: int = 1,
         padding: Any = None) -> nn.Conv:
  pad = kernel // 2 if padding is None else padding
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                 dtype=dtype, param_dtype=param_dtype, name=name)


class TimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding`: linear_1 -> act -> linear_2."""
  time_embed_dim: int
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxF):
    dense = lambda name: nn.Dense(self.time_embed_dim, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)
    x = dense("linear_1")(x_BxF.astype(self.dtype))
    return dense("linear_2")(activation(self.act_fn)(x))


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` (time_embedding_norm="default"); `temb` optional (VAE)."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  act_fn: str = "silu"
  output_scale_factor: float = 1.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, temb_BxD=None, deterministic: bool = True):
    act = activation(self.act_fn)
    gn = lambda name: group_norm(self.groups, self.eps, self.param_dtype, name)
    h = act(gn("norm1")(x_BxHxWxC)).astype(self.dtype)
    h = conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv1")(h)
    if temb_BxD is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="time_emb_proj")(act(temb_BxD))
      h = h + t[:, None, None, :]
    h = act(gn("norm2")(h)).astype(self.dtype)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv2")(h)
    residual = x_BxHxWxC
    if x_BxHxWxC.shape[-1] != self.out_channels:
      residual = conv(self.out_channels, 1, self.dtype, self.param_dtype, "conv_shortcut")(residual)
    out = residual.astype(self.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nn.Module):
  """Strided 3x3 conv. `padding=0` is the VAE's asymmetric (0, 1) pad."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
    return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2,
                padding=pad)(x_BxHxWxC)


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling (2x, or to `output_size`) followed by a 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, output_size: tuple[int, int] | None = None):
    b, h, w, c = x_BxHxWxC.shape
    oh, ow = output_size or (2 * h, 2 * w)
    if (oh, ow) == (2 * h, 2 * w):
      x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)
    else:  # torch "nearest": source index floor(dst * in / out)
      rows = (jnp.arange(oh) * h) // oh
      cols = (jnp.arange(ow) * w) // ow
      x = x_BxHxWxC[:, rows][:, :, cols]
    return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv")(x)
