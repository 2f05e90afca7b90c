"""attention="flash" (JAX's Pallas TPU flash-attention kernel) on CPU, in Pallas interpret mode.

What runs here: the kernel's own program (forward and both backward kernels) through
Pallas' HLO interpreter, our wrapper's layout ([B, T, N, K] <-> the kernel's
[B, N, T, K]), block sizes, `shard_map` over the context mesh, and the fallbacks. What
does not: Mosaic's TPU code generation, which only the TPU compiles of
tests/test_train_compile.py (libtpu installed) and benchmarks/train_compile.py check.

Interpret mode: `force_tpu_interpret_mode(True)` selects the plain HLO interpreter (a
`jax.jit` of a scan over the kernel's grid). The TPU-simulating interpreter
(`InterpretParams()`) runs the single-device cases too, but its backward kernels hang
inside a `shard_map` over 8 fake CPU devices (jax 0.10.2).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from test_unet import inputs, make_diffusers_unet, reference
from torch_utils import assert_close_to_scale

from d2g_jax import parallel
from d2g_jax.convert.unet import load_unet
from d2g_jax.models import flash_attention
from d2g_jax.models.attention import attention, resolve_implementation


def interpret():
  return pltpu.force_tpu_interpret_mode(True)


def qkv(b, t, s, n, k, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, n, k)), jax.random.normal(ks[1], (b, s, n, k)),
          jax.random.normal(ks[2], (b, s, n, k)))


def loss(impl):
  """A loss whose gradient weighs every output channel differently."""
  return lambda q, k, v: jnp.sum(attention(q, k, v, implementation=impl)
                                 * jnp.arange(1, q.shape[-1] + 1))


def test_flash_matches_xla_forward_and_gradients():
  """T != S and SD 1.5's head width 40 (not a multiple of the 128 lanes)."""
  q, kk, v = qkv(2, 128, 256, 2, 40)
  with interpret():
    out = jax.jit(lambda *a: attention(*a, implementation="flash"))(q, kk, v)
    grads = jax.jit(jax.grad(loss("flash"), argnums=(0, 1, 2)))(q, kk, v)
    assert "pallas_call" in str(jax.make_jaxpr(loss("flash"))(q, kk, v))
  assert_close_to_scale(out, attention(q, kk, v, implementation="xla"), 1e-4)
  for ours, ref in zip(grads, jax.grad(loss("xla"), argnums=(0, 1, 2))(q, kk, v)):
    assert_close_to_scale(ours, ref, 1e-4)


def test_flash_runs_per_shard_of_the_context_mesh():
  """On a 2 x 4 mesh the kernel runs in a shard_map over (data, fsdp): each device
  attends its own rows, nothing is gathered, and the result is the unsharded one."""
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  q, k, v = qkv(8, 128, 128, 2, 16, seed=1)
  sh = parallel.batch_sharding(mesh)
  step = jax.value_and_grad(loss("flash"), argnums=(0, 1, 2))
  fn = jax.jit(parallel.under_mesh(step, mesh), in_shardings=(sh, sh, sh))
  with interpret():
    assert "shard_map" in str(jax.make_jaxpr(parallel.under_mesh(step, mesh))(q, k, v))
    hlo = fn.lower(q, k, v).compile().as_text()
    value, grads = fn(q, k, v)
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  ref_value, ref_grads = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  assert_close_to_scale(value, ref_value, 1e-4)
  for ours, ref in zip(grads, ref_grads):
    assert grads[0].sharding.spec == sh.spec
    assert_close_to_scale(ours, ref, 1e-4)


@pytest.mark.parametrize("t,s,b,why", [(256, 77, 2, "multiples of 128"),  # cross-attention
                                       (64, 64, 2, "multiples of 128"),   # 8x8 latents
                                       (256, 256, 3, "not divisible")])   # batch vs 8 devices
def test_shapes_the_kernel_cannot_take_use_xla(t, s, b, why):
  mesh = parallel.make_mesh({"data": 8})
  q, k, v = qkv(b, t, s, 2, 8)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    assert why in flash_attention.supported(q, k)
    jaxpr = str(jax.make_jaxpr(lambda *a: attention(*a, implementation="flash"))(q, k, v))
    with pytest.raises(ValueError, match="use attention='xla'"):
      flash_attention.flash(q, k, v)
    out = attention(q, k, v, implementation="flash")
  assert "pallas_call" not in jaxpr
  np.testing.assert_allclose(out, attention(q, k, v, implementation="xla"), atol=1e-6)


def test_block_sizes_divide_the_sequences():
  b = flash_attention.block_sizes(4096, 1024)
  assert (b.block_q, b.block_k_major, b.block_k, b.block_q_dq, b.block_k_dkv) == (
      512, 512, 512, 512, 512)
  assert b.block_k_major_dq == b.block_k_dq == 128
  b = flash_attention.block_sizes(384, 256)
  assert (b.block_q, b.block_k) == (128, 256)


def test_auto_picks_flash_on_tpu_only():
  assert resolve_implementation("auto", jnp.bfloat16, "tpu") == "flash"
  assert resolve_implementation("auto", jnp.float32, "tpu") == "flash"
  assert resolve_implementation("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert resolve_implementation("auto", jnp.float32, "gpu") == "xla"
  assert resolve_implementation("auto", jnp.float32, "cpu") == "chunked"
  assert resolve_implementation("auto", jnp.float32) == "chunked"  # this machine
  assert resolve_implementation("xla", jnp.float32, "tpu") == "xla"


def test_unet_with_flash_attention_matches_diffusers(tmp_path):
  """The tiny SD 1.5 UNet at 16x16 latents: its 256-token self-attentions take the kernel
  (the 64-token ones and the cross-attentions fall back); the output is diffusers'."""
  model = make_diffusers_unet("tiny_sd15", str(tmp_path))
  module, params = load_unet(str(tmp_path))
  flash = module.clone(attention="flash")
  x, t, ctx, added = inputs(module.config, size=16)
  with interpret():
    jaxpr = str(jax.make_jaxpr(flash.apply)({"params": params}, x, t, ctx))
    assert len(re.findall(r"name=flash_attention\b", jaxpr)) == 3  # down 0 (1), up 1 (2)
    out = jax.jit(flash.apply)({"params": params}, x, t, ctx, added)
  assert_close_to_scale(out, reference(model, x, t, ctx, added), 1e-4)
