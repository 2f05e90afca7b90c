"""The multi-scale conditional discriminator: init from the teacher, zero-init additions,
readouts per config, SD 1.5 / SD 2 / SDXL-like tiny teachers, parameter summaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from d2g_jax.models import discriminator as disc
from d2g_jax.models.unet import UNet, count_params, init_shapes
from d2g_jax.models.unet_config import UNetConfig

PRESETS = ["tiny_sd15", "tiny_sd2", "tiny_sdxl"]
ALL_ON = disc.DiscriminatorOptions()


def inputs(cfg: UNetConfig, b=2, size=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (b, size, size, cfg.in_channels))
  z = jax.random.normal(ks[1], x.shape)
  cond = {"encoder_hidden_states": jax.random.normal(ks[2], (b, 3, cfg.cross_dims[0]))}
  if cfg.addition_embed_type == "text_time":
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    cond["added_cond_kwargs"] = {"text_embeds": jax.random.normal(ks[3], (b, text_dim)),
                                 "time_ids": jnp.tile(jnp.asarray([[32., 32, 0, 0, 32, 32]]),
                                                      (b, 1))}
  return x, z, cond, jnp.full((b,), 0, jnp.int32)


def teacher_params(cfg: UNetConfig, seed=1):
  x, _, cond, t = inputs(cfg)
  return UNet(cfg).init(jax.random.key(seed), x, t, cond["encoder_hidden_states"],
                        cond.get("added_cond_kwargs"))["params"]


@pytest.fixture(scope="module", params=PRESETS)
def setup(request):
  cfg = UNetConfig.preset(request.param)
  tp = teacher_params(cfg)
  module = disc.Discriminator(cfg, ALL_ON)
  return cfg, tp, module, disc.init_discriminator(module, tp, jax.random.key(2))


def test_trunk_is_the_teacher(setup):
  cfg, tp, _, params = setup
  trunk = traverse_util.flatten_dict(dict(params["unet"]), sep="/")
  teacher = traverse_util.flatten_dict(dict(tp), sep="/")
  # Every trunk tensor is the teacher's; only the output head is left out.
  assert set(teacher) - set(trunk) == {"conv_norm_out/scale", "conv_norm_out/bias",
                                       "conv_out/kernel", "conv_out/bias"}
  for k, v in trunk.items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(teacher[k]), err_msg=k)


def test_readouts_per_config(setup):
  cfg, _, module, params = setup
  x, z, cond, t = inputs(cfg)
  logits = jax.jit(module.apply)({"params": params}, x, z, cond, t)
  n = cfg.num_blocks
  assert len(logits) == 3 * n == len(module.readout_names())
  # Up block k works at 16 / 2**(n-1-k); its three readouts share that size.
  for k in range(n):
    size = 16 // 2 ** (n - 1 - k)
    for l in logits[3 * k:3 * k + 3]:
      assert l.shape == (2, size, size) and l.dtype == jnp.float32
  # Plain diffusion D: one readout at the last decoder output.
  plain = disc.Discriminator(cfg, disc.DiscriminatorOptions(False, False, False))
  p_plain = disc.init_discriminator(plain, teacher_params(cfg), jax.random.key(3))
  assert sorted(p_plain) == ["readout", "unet"]
  out = jax.jit(plain.apply)({"params": p_plain}, x, z, cond, t)
  assert [l.shape for l in out] == [(2, 16, 16)] and plain.readout_names() == ["readout"]


def test_zero_init_additions_are_exactly_ignored_but_trainable(setup):
  cfg, tp, module, params = setup
  x, z, cond, t = inputs(cfg)
  apply = jax.jit(lambda p, m, zz: m.apply({"params": p}, x, zz, cond, t), static_argnums=1)
  base = apply(params, module, z)
  # z does not change the output at all ...
  for a, b in zip(base, apply(params, module, 5.0 * z + 3.0)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... nor do the multi-scale input convs: same readouts as D without them.
  no_inject = disc.Discriminator(cfg, disc.DiscriminatorOptions(True, False, True))
  p_no = {k: v for k, v in params.items() if not k.startswith("input_convs")}
  for a, b in zip(base, apply(p_no, no_inject, z)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Yet their parameters get gradients, so training switches them on.
  grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(l) for l in apply(p, module, z))))(params)
  for name in ["z_conv"] + [f"input_convs_{i}" for i in range(cfg.num_blocks)]:
    g = np.abs(np.asarray(grads[name]["kernel"])).max()
    assert g > 0, f"{name} kernel has a zero gradient"
  assert not np.asarray(params["z_conv"]["kernel"]).any()


def test_teacher_mismatch_error():
  module = disc.Discriminator(UNetConfig.preset("tiny_sd15"))
  with pytest.raises(ValueError, match="does not fit the discriminator's trunk: missing"):
    disc.init_discriminator(module, teacher_params(UNetConfig.preset("tiny_sd2")) | {
        "down_blocks_0": {}}, jax.random.key(0))


@pytest.mark.parametrize("preset,readouts", [("sd15", 12), ("sdxl_base", 9)])
def test_real_preset_summary(preset, readouts, capsys):
  cfg = UNetConfig.preset(preset)
  module = disc.Discriminator(cfg)
  counts = disc.summary(disc.param_shapes(module))
  unet = count_params(init_shapes(cfg))
  head = cfg.block_out_channels[0] * 2 + 9 * cfg.block_out_channels[0] * cfg.out_channels \
      + cfg.out_channels
  assert counts["trunk"] == unet - head
  assert counts["z_conv"] == 9 * cfg.in_channels ** 2 + cfg.in_channels
  assert len(module.readout_names()) == readouts
  assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
  print(preset, counts)


def test_z_path_in_float32_under_bf16():
  """D in bf16: the z_conv computes in fp32 and its sum with x reaches conv_in in fp32."""
  cfg = UNetConfig.preset("tiny_sd15")
  module = disc.Discriminator(cfg, ALL_ON, dtype=jnp.bfloat16)
  params = disc.init_discriminator(module, teacher_params(cfg), jax.random.key(2))
  params = jax.tree.map(lambda p: p + 0.01, params)  # z_conv no longer zero
  x, z, cond, t = inputs(cfg)
  logits, inter = module.apply({"params": params}, x, z, cond, t,
                               capture_intermediates=True, mutable=["intermediates"])
  z_out = inter["intermediates"]["z_conv"]["__call__"][0]
  assert z_out.dtype == jnp.float32
  ref = disc.zero_conv(cfg.in_channels, 3, jnp.float32, jnp.float32, "z_conv").apply(
      {"params": params["z_conv"]}, z)
  np.testing.assert_allclose(z_out, ref, rtol=1e-6, atol=1e-6)
  assert inter["intermediates"]["unet"]["conv_in"]["__call__"][0].dtype == jnp.bfloat16
  assert all(l.dtype == jnp.float32 for l in logits)


def test_readouts_at_their_documented_places(setup):
  """Each readout reads its decoder scale where the docs say, checked against the UNet's own
  modules' inputs and outputs (recorded by a method interceptor, not D's feature tuple):
  `pre` = what enters up block k, `cat` = what enters its first resnet (that plus the first
  skip, concatenated), `out` = what enters its upsampler (the last block: what it returns).
  And D's output depends on the prompt: every readout changes with encoder_hidden_states."""
  from flax import linen as nn
  cfg, _, module, params = setup
  params = jax.tree.map(lambda p: p + 0.01, params)  # zero convs switched on
  x, z, cond, t = inputs(cfg)
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      seen[context.module.path] = (args, out)
    return out
  with nn.intercept_methods(record):
    logits = module.apply({"params": params}, x, z, cond, t)
  n = cfg.num_blocks
  for k in range(n):
    block = ("unet", f"up_blocks_{k}")
    pre = seen[block][0][0]
    cat = seen[block + ("resnets_0",)][0][0]
    out = seen[block + ("upsamplers_0",)][0][0] if k < n - 1 else seen[block][1][0]
    assert cat.shape[-1] > pre.shape[-1]
    np.testing.assert_array_equal(cat[..., :pre.shape[-1]], pre)  # pre, then the skip
    for place, want in zip(disc.PLACES, (pre, cat, out)):
      got = seen[(f"readout_{k}_{place}",)][0][0]
      assert got.shape == want.shape, (k, place, got.shape, want.shape)
      np.testing.assert_array_equal(got, want, err_msg=f"readout_{k}_{place}")
  names = module.readout_names()
  for name, l in zip(names, logits):
    np.testing.assert_array_equal(l, seen[(name,)][1], err_msg=name)

  other = dict(cond, encoder_hidden_states=cond["encoder_hidden_states"][::-1])
  for name, a, b in zip(names, logits, module.apply({"params": params}, x, z, other, t)):
    assert not np.allclose(a, b, atol=1e-5), f"{name} ignores the prompt"
