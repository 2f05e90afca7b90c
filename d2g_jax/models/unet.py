"""Flax UNet2DConditionModel (SD 1.5, SD 2.x, SDXL), parameter-compatible with diffusers.

Legend: B batch, H/W latent height/width, C channels, S text tokens, E text width,
D time-embedding width.

    module = UNet(UNetConfig.preset("sd15"))
    eps_BxHxWxC = module.apply({"params": params}, sample_BxHxWxC, timestep,
                               encoder_hidden_states_BxSxE, added_cond_kwargs=None)

The call signature and meanings are diffusers' (`added_cond_kwargs={"text_embeds",
"time_ids"}` for SDXL), with NHWC tensors in and out. The body computes in `dtype`; the
output head (conv_norm_out, SiLU, conv_out) always in fp32, and the output is fp32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from d2g_jax.models.attention import Transformer2DModel
from d2g_jax.models.layers import (
  Downsample2D,
  ResnetBlock2D,
  TimestepEmbedding,
  Upsample2D,
  activation,
  conv,
  group_norm,
  timestep_embedding,
)
from d2g_jax.models.unet_config import UNetConfig

Dtype = Any


class _BlockOptions(nn.Module):
  """Fields every UNet block shares."""
  config: UNetConfig
  block: int  # index among down blocks (up blocks use the mirrored index)
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def resnet(self, out_channels: int, name: str, scale: float = 1.0) -> ResnetBlock2D:
    c = self.config
    return ResnetBlock2D(out_channels, groups=c.norm_num_groups, eps=c.norm_eps, act_fn=c.act_fn,
                         output_scale_factor=scale, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)

  def transformer(self, channels: int, layers: int, name: str) -> Transformer2DModel:
    c = self.config
    heads = c.heads[self.block]
    return Transformer2DModel(heads, channels // heads, num_layers=layers,
                              norm_num_groups=c.norm_num_groups,
                              use_linear_projection=c.use_linear_projection,
                              upcast_attention=c.upcast_attention, implementation=self.attention,
                              dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class DownBlock(_BlockOptions):
  """CrossAttnDownBlock2D or DownBlock2D: resnets (+ transformers), then a strided conv."""

  @nn.compact
  def __call__(self, h, temb, ctx):
    c, i = self.config, self.block
    channels = c.block_out_channels[i]
    has_attn = c.down_block_types[i] == "CrossAttnDownBlock2D"
    skips = []
    for j in range(c.layers[i]):
      h = self.resnet(channels, f"resnets_{j}")(h, temb)
      if has_attn:
        h = self.transformer(channels, c.down_transformer_layers[i], f"attentions_{j}")(h, ctx)
      skips.append(h)
    if i < c.num_blocks - 1:
      h = Downsample2D(channels, padding=c.downsample_padding, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="downsamplers_0")(h)
      skips.append(h)
    return h, tuple(skips)


class MidBlock(_BlockOptions):
  """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs."""

  @nn.compact
  def __call__(self, h, temb, ctx):
    c = self.config
    channels = c.block_out_channels[-1]
    scale = c.mid_block_scale_factor
    h = self.resnet(channels, "resnets_0", scale)(h, temb)
    h = self.transformer(channels, c.down_transformer_layers[-1], "attentions_0")(h, ctx)
    return self.resnet(channels, "resnets_1", scale)(h, temb)


class UpBlock(_BlockOptions):
  """CrossAttnUpBlock2D or UpBlock2D: each resnet eats one skip; then nearest-2x + conv.

  Returns (h, (pre, cat, out)): the block's output and, for the discriminator's
  readouts, its features at this scale: before the first skip concatenation, right
  after it, and after the last resnet/transformer (before upsampling).
  """
  up_index: int = 0

  @nn.compact
  def __call__(self, h, skips, temb, ctx, upsample_size):
    c, k = self.config, self.up_index
    channels = tuple(reversed(c.block_out_channels))[k]
    has_attn = c.up_block_types[k] == "CrossAttnUpBlock2D"
    pre = cat = h
    for j, skip in enumerate(skips):
      h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
      if j == 0:
        cat = h
      h = self.resnet(channels, f"resnets_{j}")(h, temb)
      if has_attn:
        h = self.transformer(channels, c.up_transformer_layers[k][j], f"attentions_{j}")(h, ctx)
    out = h
    if upsample_size is not None:
      h = Upsample2D(channels, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="upsamplers_0")(h, upsample_size)
    return h, (pre, cat, out)


class UNet(nn.Module):
  """UNet2DConditionModel. `attention`: "auto" | "xla" | "cudnn" | "chunked" | "flash"
  (models/attention.py).

  `remat=True` rematerialises every down/mid/up block in the backward pass, trading
  compute for activation memory in training.

  `__call__` is diffusers' forward. Its pieces are methods, so that other models
  (the discriminator) can run the same modules with their own additions in between,
  under the same parameter names:

      emb = unet.embed(timestep, batch, added_cond_kwargs); ctx = unet.context(ehs)
      h = unet.stem(sample); skips = [h]
      for i: h, s = unet.down(i, h, emb, ctx); skips += s
      h = unet.mid(h, emb, ctx)
      for k: h, skips, (pre, cat, out) = unet.up(k, h, skips, emb, ctx)
      eps = unet.head(h)
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "auto"
  remat: bool = False

  def setup(self):
    c = self.config
    kw = dict(config=c, attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype)
    wrap = (lambda cls: nn.remat(cls, static_argnums=(5,) if cls is UpBlock else ())) \
        if self.remat else (lambda cls: cls)
    n = c.num_blocks
    self.time_embedding = TimestepEmbedding(c.time_embed_dim, c.act_fn, dtype=self.dtype,
                                            param_dtype=self.param_dtype)
    if c.addition_embed_type == "text_time":
      self.add_embedding = TimestepEmbedding(c.time_embed_dim, c.act_fn, dtype=self.dtype,
                                             param_dtype=self.param_dtype)
    self.conv_in = conv(c.block_out_channels[0], c.conv_in_kernel, self.dtype, self.param_dtype)
    self.down_blocks = [wrap(DownBlock)(block=i, **kw) for i in range(n)]
    self.mid_block = wrap(MidBlock)(block=n - 1, **kw)
    # up block k mirrors down block n-1-k
    self.up_blocks = [wrap(UpBlock)(block=n - 1 - k, up_index=k, **kw) for k in range(n)]
    self.conv_norm_out = group_norm(c.norm_num_groups, c.norm_eps, self.param_dtype)
    # The head runs in fp32 whatever `dtype` (see `head`).
    self.conv_out = conv(c.out_channels, c.conv_out_kernel, jnp.float32, self.param_dtype)

  def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
    return self.head(self.body(sample, timestep, encoder_hidden_states, added_cond_kwargs))

  def body(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
    """Everything before the output head: the last up block's features, in `dtype`."""
    emb = self.embed(timestep, sample.shape[0], added_cond_kwargs)
    ctx = self.context(encoder_hidden_states)
    h = self.stem(sample)
    skips = [h]
    for i in range(self.config.num_blocks):
      h, block_skips = self.down(i, h, emb, ctx)
      skips.extend(block_skips)
    h = self.mid(h, emb, ctx)
    for k in range(self.config.num_blocks):
      h, skips, _ = self.up(k, h, skips, emb, ctx)
    return h

  # ------------------------------------------------------------- the pieces
  def embed(self, timestep, batch: int, added_cond_kwargs=None):
    """Time (and SDXL's text/size) embedding, BxD."""
    c = self.config
    t_B = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (batch,))
    t_emb = timestep_embedding(t_B, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
    emb = self.time_embedding(t_emb)
    if c.addition_embed_type == "text_time":
      emb = emb + self._text_time_embedding(added_cond_kwargs, batch)
    if c.time_embedding_act_fn is not None:
      emb = activation(c.time_embedding_act_fn)(emb)
    return emb

  def context(self, encoder_hidden_states):
    return encoder_hidden_states.astype(self.dtype)

  def stem(self, sample):
    """conv_in (after `center_input_sample`): the first skip."""
    x = sample.astype(self.dtype)
    if self.config.center_input_sample:
      x = 2 * x - 1.0
    return self.conv_in(x)

  def down(self, i: int, h, emb, ctx):
    """Down block i -> (h, its skips)."""
    return self.down_blocks[i](h, emb, ctx)

  def mid(self, h, emb, ctx):
    return self.mid_block(h, emb, ctx)

  def up(self, k: int, h, skips: list, emb, ctx):
    """Up block k eats the last layers+1 skips -> (h, the skips left, (pre, cat, out))."""
    c = self.config
    n_skips = c.layers[c.num_blocks - 1 - k] + 1
    block_skips, skips = tuple(reversed(skips[-n_skips:])), list(skips[:-n_skips])
    upsample_size = tuple(skips[-1].shape[1:3]) if k < c.num_blocks - 1 else None
    h, feats = self.up_blocks[k](h, block_skips, emb, ctx, upsample_size)
    return h, skips, feats

  def head(self, h):
    """conv_norm_out, activation, conv_out: the model's prediction, computed and returned in
    fp32 whatever `dtype`. At t = 999 the one-step generator multiplies this output by
    sqrt((1 - a) / a) ~ 14.6 (SD 1.5) to make x0: a bf16 output would put every generated
    latent on a visible lattice (~0.024 RMS for unit latents; docs/precision.md)."""
    h = self.conv_norm_out(h)  # fp32 in and out
    h = activation(self.config.act_fn)(h.astype(jnp.float32))
    return self.conv_out(h)

  def _text_time_embedding(self, added_cond_kwargs, b: int):
    c = self.config
    if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs \
        or "time_ids" not in added_cond_kwargs:
      raise ValueError("this UNet has addition_embed_type='text_time' (SDXL): pass "
                       "added_cond_kwargs={'text_embeds': (B, D) pooled text embeddings, "
                       "'time_ids': (B, 6) original size, crop top-left, target size}")
    text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
    time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
    time_ids = jnp.broadcast_to(time_ids.reshape(-1, time_ids.shape[-1]), (b, time_ids.shape[-1]))
    time_emb = timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim,
                                  c.flip_sin_to_cos, c.freq_shift).reshape(b, -1)
    add = jnp.concatenate([jnp.broadcast_to(text_embeds, (b, text_embeds.shape[-1])).astype(
        jnp.float32), time_emb], axis=-1)
    if add.shape[-1] != c.projection_class_embeddings_input_dim:
      raise ValueError(f"text_embeds ({text_embeds.shape[-1]}) + time_ids embedding "
                       f"({time_emb.shape[-1]}) = {add.shape[-1]} features, but this UNet's "
                       f"projection_class_embeddings_input_dim is "
                       f"{c.projection_class_embeddings_input_dim}")
    return self.add_embedding(add)


def init_shapes(config: UNetConfig, param_dtype=jnp.float32, batch: int = 1, size: int = 8):
  """The param tree of `config` as ShapeDtypeStructs (no memory allocated)."""
  module = UNet(config, param_dtype=param_dtype)
  n_down = 2 ** (config.num_blocks - 1)
  size = max(size, n_down)
  sample = jax.ShapeDtypeStruct((batch, size, size, config.in_channels), jnp.float32)
  ctx = jax.ShapeDtypeStruct((batch, 2, config.cross_dims[0]), jnp.float32)
  added = None
  if config.addition_embed_type == "text_time":
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": jax.ShapeDtypeStruct((batch, text_dim), jnp.float32),
             "time_ids": jax.ShapeDtypeStruct((batch, 6), jnp.float32)}
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  shapes = jax.eval_shape(lambda s, tt, cc, a: module.init(jax.random.key(0), s, tt, cc, a),
                          sample, t, ctx, added)
  return shapes["params"]


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
