"""Attention and the spatial transformer of the SD UNet, named as diffusers names them.

Legend: B batch, T query tokens, S key tokens, N heads, K head width, D model width,
H/W height/width, C channels.

`attention()` is the one place where scaled dot-product attention happens. Choices:
  "xla"     jax.nn.dot_product_attention, XLA implementation (any backend);
  "cudnn"   jax.nn.dot_product_attention's fused cuDNN kernel (GPU, fp16/bf16);
  "chunked" queries processed in blocks of `chunk` with `lax.map`, so the score
            matrix is never larger than chunk x S per head: much faster on CPU and
            far lighter on memory for the 4,096-token self-attention at 64x64.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from d2g_jax.models.layers import group_norm

Dtype = Any
IMPLEMENTATIONS = ("xla", "cudnn", "chunked")


def attention(q_BxTxNxK: jax.Array, k_BxSxNxK: jax.Array, v_BxSxNxK: jax.Array, *,
              implementation: str = "xla", chunk: int = 1024, upcast: bool = False,
              is_causal: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(K)) v, with the score and softmax in fp32 when `upcast`."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  dtype = q_BxTxNxK.dtype
  if upcast:
    q_BxTxNxK, k_BxSxNxK, v_BxSxNxK = (a.astype(jnp.float32) for a in (q_BxTxNxK, k_BxSxNxK, v_BxSxNxK))
  T = q_BxTxNxK.shape[1]
  if implementation == "chunked" and T > chunk and not is_causal:
    n = -(-T // chunk)
    pad = n * chunk - T
    q = jnp.pad(q_BxTxNxK, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_nxBxCxNxK = jnp.moveaxis(q.reshape(q.shape[0], n, chunk, *q.shape[2:]), 1, 0)
    out = jax.lax.map(
        lambda qc: jax.nn.dot_product_attention(qc, k_BxSxNxK, v_BxSxNxK, implementation="xla"),
        q_nxBxCxNxK)
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape)[:, :T]
  else:
    impl = "cudnn" if implementation == "cudnn" else "xla"
    out = jax.nn.dot_product_attention(q_BxTxNxK, k_BxSxNxK, v_BxSxNxK, is_causal=is_causal,
                                       implementation=impl)
  return out.astype(dtype)


class Attention(nn.Module):
  """diffusers `Attention` without norms: to_q, to_k, to_v, to_out.0."""
  heads: int
  head_dim: int
  out_dim: int
  qkv_bias: bool = False
  upcast: bool = False
  implementation: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, ctx_BxSxE=None):
    ctx = x_BxTxD if ctx_BxSxE is None else ctx_BxSxE
    inner = self.heads * self.head_dim
    proj = lambda name, bias: nn.Dense(inner, use_bias=bias, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
    split = lambda a: a.reshape(*a.shape[:2], self.heads, self.head_dim)
    q = split(proj("to_q", self.qkv_bias)(x_BxTxD))
    k = split(proj("to_k", self.qkv_bias)(ctx.astype(self.dtype)))
    v = split(proj("to_v", self.qkv_bias)(ctx.astype(self.dtype)))
    o = attention(q, k, v, implementation=self.implementation, upcast=self.upcast)
    o = o.reshape(*o.shape[:2], inner)
    return nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="to_out_0")(o)


class FeedForward(nn.Module):
  """diffusers `FeedForward` with GEGLU: net.0.proj -> value * gelu(gate) -> net.2."""
  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    inner = self.dim * self.mult
    h = nn.Dense(2 * inner, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="proj")(x_BxTxD)  # lives at net_0/proj, see GEGLUNet
    value, gate = jnp.split(h, 2, axis=-1)
    return value * nn.gelu(gate, approximate=False)


class GEGLUNet(nn.Module):
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    h = FeedForward(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x_BxTxD)
    return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm + residual."""
  dim: int
  heads: int
  head_dim: int
  upcast_attention: bool = False
  implementation: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, ctx_BxSxE):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype,
                                   name=name)
    attn = lambda name: Attention(self.heads, self.head_dim, self.dim, upcast=self.upcast_attention,
                                  implementation=self.implementation, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)
    x = x_BxTxD
    x = x + attn("attn1")(ln("norm1")(x).astype(self.dtype))
    x = x + attn("attn2")(ln("norm2")(x).astype(self.dtype), ctx_BxSxE)
    x = x + GEGLUNet(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="ff")(ln("norm3")(x).astype(self.dtype))
    return x


class Transformer2DModel(nn.Module):
  """diffusers `Transformer2DModel` on continuous NHWC input."""
  heads: int
  head_dim: int
  num_layers: int = 1
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  upcast_attention: bool = False
  implementation: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, ctx_BxSxE):
    b, h, w, c = x_BxHxWxC.shape
    inner = self.heads * self.head_dim
    if self.use_linear_projection:
      proj = lambda feats, name: nn.Dense(feats, dtype=self.dtype, param_dtype=self.param_dtype,
                                          name=name)
    else:
      proj = lambda feats, name: nn.Conv(feats, (1, 1), dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
    y = group_norm(self.norm_num_groups, 1e-6, self.param_dtype, "norm")(x_BxHxWxC).astype(self.dtype)
    if self.use_linear_projection:
      y = proj(inner, "proj_in")(y.reshape(b, h * w, c))
    else:
      y = proj(inner, "proj_in")(y).reshape(b, h * w, inner)
    for i in range(self.num_layers):
      y = BasicTransformerBlock(inner, self.heads, self.head_dim, self.upcast_attention,
                                self.implementation, dtype=self.dtype, param_dtype=self.param_dtype,
                                name=f"transformer_blocks_{i}")(y, ctx_BxSxE)
    if self.use_linear_projection:
      y = proj(c, "proj_out")(y).reshape(b, h, w, c)
    else:
      y = proj(c, "proj_out")(y.reshape(b, h, w, inner))
    return y + x_BxHxWxC.astype(self.dtype)
