"""Attention and the spatial transformer of the SD UNet, named as diffusers names them.

Legend: B batch, T query tokens, S key tokens, N heads, K head width, D model width,
H/W height/width, C channels.

`attention()` is the one place where scaled dot-product attention happens. Choices:
  "auto"    the best of the below for the backend and dtype (the default);
  "xla"     jax.nn.dot_product_attention, XLA implementation (any backend);
  "cudnn"   jax.nn.dot_product_attention's fused cuDNN kernel (GPU, fp16/bf16);
  "flash"   JAX's Pallas TPU flash-attention kernel (models/flash_attention.py): no T x S
            score matrix in HBM; self-attention whose T and S are multiples of 128, sharded
            over the context mesh's batch axes; other shapes (the 77-token cross-attention,
            8x8 latents, a batch the mesh does not divide) use "xla";
  "chunked" exact attention, one (example, head) at a time over blocks of queries whose
            score matrix fits a CPU core's L2 (`lax.map`), softmax normalised after the
            value product: on the 2-core x86 CPU of docs/performance.md's benchmarks, the 4,096-token
            self-attention of SD 1.5 at 64x64 runs ~6x faster than "xla" and within
            ~15% of PyTorch's fused CPU kernel, in O(block) memory.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from d2g_jax.models import flash_attention
from d2g_jax.models.layers import group_norm

Dtype = Any
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked", "flash")


def resolve_implementation(implementation: str, dtype, backend: str | None = None) -> str:
  """"auto": flash on TPU, cuDNN on NVIDIA GPUs in fp16/bf16, chunked on CPU, XLA otherwise.

  `backend`: the platform to resolve for (default: JAX's default backend); ahead-of-time
  compiles for a TPU topology on a CPU host pass "tpu".
  """
  if implementation != "auto":
    return implementation
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "flash"
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "chunked" if backend == "cpu" else "xla"


CHUNK_BUDGET = 1 << 18  # score elements per block (1 MB in fp32): fits a CPU core's L2


def _row_max(s_CxS: jax.Array, stop: int = 16) -> jax.Array:
  """Max over the last axis (keepdims) by repeated halving.

  Each halving is an elementwise maximum of two slices, and XLA fuses the chain into one
  vectorised pass over the scores. A plain `max` row reduction is rewritten by XLA:CPU's
  tree-reduction pass into several unfused reduce-window passes, which cost as much as
  the rest of the softmax together. Odd widths take overlapping halves (max is
  idempotent), so the result is exactly `s.max(-1, keepdims=True)`.
  """
  while s_CxS.shape[-1] > stop:
    w = s_CxS.shape[-1]
    h = (w + 1) // 2
    s_CxS = jnp.maximum(s_CxS[..., :h], s_CxS[..., w - h:])
  return s_CxS.max(-1, keepdims=True)


def _chunked(q_BxTxNxK, k_BxSxNxK, v_BxSxNxK, chunk: int | None):
  """Exact attention, one (example, head) at a time over blocks of queries.

  Each block's score matrix (chunk x S) stays in cache; its row maxima come from
  `_row_max`, its row sums from the value product, and the softmax division touches
  chunk x K outputs instead of chunk x S probabilities. Looping over examples and heads
  (rather than batching them into one block) keeps the block size, and so the speed per
  token, the same at every batch size.
  """
  B, T, N, K = q_BxTxNxK.shape
  S = k_BxSxNxK.shape[1]
  if chunk is None:
    n = -(-T // max(16, CHUNK_BUDGET // S))
    chunk = -(-T // n)  # equal blocks: pad at most n - 1 queries
  n = -(-T // chunk)
  G = B * N
  q_GxTxK = (jnp.transpose(q_BxTxNxK, (0, 2, 1, 3)).reshape(G, T, K)
             * jnp.asarray(K ** -0.5, q_BxTxNxK.dtype))
  q_GxnxCxK = jnp.pad(q_GxTxK, ((0, 0), (0, n * chunk - T), (0, 0))).reshape(G, n, chunk, K)
  k_GxKxS = jnp.transpose(k_BxSxNxK, (0, 2, 3, 1)).reshape(G, K, S)
  v_GxSxK = jnp.transpose(v_BxSxNxK, (0, 2, 1, 3)).reshape(G, S, K)

  # A column of ones after V makes the value product also return each row's softmax sum.
  v1_GxSxK1 = jnp.concatenate([v_GxSxK, jnp.ones((G, S, 1), v_GxSxK.dtype)], axis=-1)

  def head(args):
    q_nxCxK, k_KxS, v1_SxK1 = args

    def block(q_CxK):
      s_CxS = jnp.matmul(q_CxK, k_KxS, preferred_element_type=jnp.float32)
      p_CxS = jnp.exp(s_CxS - jax.lax.stop_gradient(_row_max(s_CxS)))
      o_CxK1 = jnp.matmul(p_CxS.astype(v1_SxK1.dtype), v1_SxK1, preferred_element_type=jnp.float32)
      return (o_CxK1[:, :K] / o_CxK1[:, K:]).astype(q_BxTxNxK.dtype)

    return jax.lax.map(block, q_nxCxK)

  o_GxnxCxK = jax.lax.map(head, (q_GxnxCxK, k_GxKxS, v1_GxSxK1))
  o_BxNxTxK = o_GxnxCxK.reshape(B, N, n * chunk, K)[:, :, :T]
  return jnp.transpose(o_BxNxTxK, (0, 2, 1, 3))


def attention(q_BxTxNxK: jax.Array, k_BxSxNxK: jax.Array, v_BxSxNxK: jax.Array, *,
              implementation: str = "xla", chunk: int | None = None, upcast: bool = False,
              is_causal: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(K)) v, with the score and softmax in fp32 when `upcast`.

  `chunk` (implementation "chunked"): queries per block; None picks the largest block
  whose score matrix fits `CHUNK_BUDGET` elements.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  dtype = q_BxTxNxK.dtype
  implementation = resolve_implementation(implementation, jnp.float32 if upcast else dtype)
  if upcast:
    q_BxTxNxK, k_BxSxNxK, v_BxSxNxK = (a.astype(jnp.float32) for a in (q_BxTxNxK, k_BxSxNxK, v_BxSxNxK))
  if implementation == "flash" and flash_attention.supported(q_BxTxNxK, k_BxSxNxK, is_causal):
    implementation = "xla"  # shapes the kernel does not take (see flash_attention.supported)
  if implementation == "chunked" and not is_causal:
    out = _chunked(q_BxTxNxK, k_BxSxNxK, v_BxSxNxK, chunk)
  elif implementation == "flash":
    out = flash_attention.flash(q_BxTxNxK, k_BxSxNxK, v_BxSxNxK)
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
  implementation: str = "auto"
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
  implementation: str = "auto"
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
  implementation: str = "auto"
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
