"""Flash attention on TPU: JAX's Pallas TPU kernel, sharded over the context mesh.

Legend: B batch, T query tokens, S key tokens, N heads, K head width.

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):   # parallel.under_mesh does this
      o_BxTxNxK = flash(q_BxTxNxK, k_BxSxNxK, v_BxSxNxK)

The kernel (`jax.experimental.pallas.ops.tpu.flash_attention`) streams key blocks
through VMEM with an online softmax and never writes the T x S score matrix to HBM;
its backward pass recomputes the scores block by block. Its constraints decide when
it runs (`supported`): the key length S must be a multiple of 128 (its lane width),
and so must T here (SD 1.5 at 64x64 latents: T = S = 4096, 1024, 256; the 77-token
cross-attention and the 8x8 mid block (T = 64) are not). Any head width works: the
kernel pads K to 128 lanes in VMEM (SD 1.5's K = 40 fills 40/128 of the MXU, SDXL's
64 half of it).

A Mosaic kernel cannot be partitioned by XLA's SPMD pass, so on a mesh it runs in a
`shard_map` over the batch axes of the context mesh (`jax.sharding.get_abstract_mesh()`,
set by `parallel.under_mesh` around every jitted stage function): each device
attends its own rows, no communication. With no context mesh it is called directly
(one device). A batch not divisible by the mesh (e.g. single-sample R1) is not
flash-able and `supported` says so; the caller falls back to XLA's attention.

Mosaic refuses bf16 operands under `jax_default_matmul_precision="highest"` (it asks
for an fp32-precision matmul: "Bad lhs type"); keep the default precision on TPU.

On CPU the kernel runs only in Pallas' TPU interpret mode
(`jax.experimental.pallas.tpu.force_tpu_interpret_mode()`), which the tests use.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LANES = 128  # the kernel's key/query block granularity
BLOCK = 512  # preferred block (queries and keys); the largest of 512/256/128 dividing T and S


def _block(n: int) -> int:
  return next(b for b in (BLOCK, 256, LANES) if n % b == 0)


def block_sizes(t: int, s: int):
  """The kernel's BlockSizes (forward and backward) for T queries and S keys.

  The dq kernel's key block stays at 128: the kernel broadcasts a per-query fp32 row sum
  to B x N x T x block in HBM before it runs (512 would make that a quarter of the T x S
  score matrix at SD 1.5's T = S = 4096, as large as the saving we want).
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  bq, bk = _block(t), _block(s)
  return fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                       block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk,
                       block_q_dkv=bq, block_k_major_dq=LANES, block_k_dq=LANES, block_q_dq=bq)


def _batch_axes():
  """(context mesh axes the batch is split over, their device count); ((), 1) without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), 1
  axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
  return axes, math.prod(mesh.shape[a] for a in axes)


def supported(q_BxTxNxK: jax.Array, k_BxSxNxK: jax.Array, is_causal: bool = False) -> str:
  """'' if the kernel can run on these inputs here, else why not (for a fallback)."""
  b, t = q_BxTxNxK.shape[:2]
  s = k_BxSxNxK.shape[1]
  if is_causal:
    return "causal masks are not wired to the kernel here"
  if t % LANES or s % LANES:
    return f"T={t} and S={s} must be multiples of {LANES}"
  _, n = _batch_axes()
  if b % n:
    return f"batch {b} is not divisible by the {n} devices of the context mesh"
  return ""


def _kernel(q_BxNxTxK, k_BxNxSxK, v_BxNxSxK):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  t, s, k = q_BxNxTxK.shape[2], k_BxNxSxK.shape[2], q_BxNxTxK.shape[3]
  return fa.flash_attention(q_BxNxTxK, k_BxNxSxK, v_BxNxSxK, sm_scale=k ** -0.5,
                            block_sizes=block_sizes(t, s))


def flash(q_BxTxNxK: jax.Array, k_BxSxNxK: jax.Array, v_BxSxNxK: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(K)) v through the Pallas TPU kernel (see `supported`)."""
  why = supported(q_BxTxNxK, k_BxSxNxK)
  if why:
    raise ValueError(f"flash attention cannot run on q {q_BxTxNxK.shape}, k {k_BxSxNxK.shape}: "
                     f"{why}; use attention='xla' for these shapes")
  heads_first = lambda a: jnp.transpose(a, (0, 2, 1, 3))
  q, k, v = (heads_first(a) for a in (q_BxTxNxK, k_BxSxNxK, v_BxSxNxK))
  axes, _ = _batch_axes()
  if axes:
    spec = P(axes)
    o_BxNxTxK = jax.shard_map(_kernel, mesh=jax.sharding.get_abstract_mesh(),
                              in_specs=(spec, spec, spec), out_specs=spec,
                              check_vma=False)(q, k, v)
  else:
    o_BxNxTxK = _kernel(q, k, v)
  return heads_first(o_BxNxTxK)
