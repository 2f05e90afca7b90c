"""Flax UNet vs diffusers' UNet2DConditionModel: parity, export round trip, errors, presets."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.numpy import load_file, save_file
from torch_utils import assert_close_to_scale, nchw, nhwc, randn

from d2g_jax.convert import core
from d2g_jax.convert.unet import load_unet, save_unet
from d2g_jax.models.unet import UNet, count_params, init_shapes
from d2g_jax.models.unet_config import UNetConfig, UnsupportedConfigError

FAMILIES = ["tiny_sd15", "tiny_sd2", "tiny_sdxl"]


def make_diffusers_unet(preset: str, folder: str, seed: int = 0) -> UNet2DConditionModel:
  """A random-weight diffusers UNet of a tiny preset, saved to `folder`."""
  torch.manual_seed(seed)
  model = UNet2DConditionModel.from_config(UNetConfig.preset(preset).to_diffusers()).eval()
  with torch.no_grad():  # zero-initialised layers (e.g. none here) would hide errors: perturb all
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


def inputs(config: UNetConfig, batch=2, size=16, tokens=5, seed=1):
  x = randn(seed, batch, size, size, config.in_channels)
  ctx = randn(seed + 1, batch, tokens, config.cross_dims[0])
  t = np.array([999.0, 37.0][:batch], np.float32)
  added = None
  if config.addition_embed_type == "text_time":
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": randn(seed + 2, batch, text_dim),
             "time_ids": np.tile(np.array([[512, 512, 0, 0, 512, 512]], np.float32), (batch, 1))}
  return x, t, ctx, added


def reference(model, x, t, ctx, added):
  kw = {}
  if added is not None:
    kw["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
  with torch.no_grad():
    out = model(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx), **kw).sample
  return nhwc(out)


@pytest.mark.parametrize("preset", FAMILIES)
def test_parity_with_diffusers(preset, tmp_path):
  model = make_diffusers_unet(preset, str(tmp_path))
  module, params = load_unet(str(tmp_path))
  x, t, ctx, added = inputs(module.config)
  ours = jax.jit(module.apply)({"params": params}, x, t, ctx, added)
  assert_close_to_scale(ours, reference(model, x, t, ctx, added), 1e-4)


def test_odd_latent_size_and_chunked_attention(tmp_path):
  """Sizes not divisible by 2**blocks take diffusers' upsample_size path; chunked attention."""
  model = make_diffusers_unet("tiny_sd15", str(tmp_path))
  _, params = load_unet(str(tmp_path))
  module = UNet(UNetConfig.preset("tiny_sd15"), attention="chunked")
  x, t, ctx, added = inputs(module.config, batch=1, size=13)
  ours = module.apply({"params": params}, x, t[:1], ctx, added)
  assert_close_to_scale(ours, reference(model, x, t[:1], ctx, added), 1e-4)


@pytest.mark.parametrize("chunk", [None, 16, 64, 100])
def test_chunked_attention_matches_dot_product_attention(chunk):
  """169 queries: several blocks, the last one padded; gradients too."""
  from d2g_jax.models.attention import attention
  q, k, v = (jnp.asarray(randn(i, 2, 169, 3, 8)) for i in range(3))
  k, v = k[:, :150], v[:, :150]
  ref = jax.nn.dot_product_attention(q, k, v)
  np.testing.assert_allclose(attention(q, k, v, implementation="chunked", chunk=chunk), ref,
                             atol=1e-6)
  grad = lambda impl: jax.grad(lambda q_: jnp.sum(jnp.sin(
      attention(q_, k, v, implementation=impl, chunk=chunk))))(q)
  np.testing.assert_allclose(grad("chunked"), grad("xla"), atol=1e-6)


def test_chunked_attention_default_blocks_split_queries_evenly(monkeypatch):
  """With a small score budget the default splits 169 queries into 4 blocks of 43 (3 padded)."""
  from d2g_jax.models import attention as attention_lib
  monkeypatch.setattr(attention_lib, "CHUNK_BUDGET", 150 * 50)
  q, k, v = (jnp.asarray(randn(i, 2, 169, 3, 8)) for i in range(3))
  k, v = k[:, :150], v[:, :150]
  blocks = jax.make_jaxpr(lambda *a: attention_lib.attention(*a, implementation="chunked"))(q, k, v)
  assert "f32[6,4,43,8]" in str(blocks)  # (batch x heads, blocks, queries per block, width)
  np.testing.assert_allclose(attention_lib.attention(q, k, v, implementation="chunked"),
                             jax.nn.dot_product_attention(q, k, v), atol=1e-6)


@pytest.mark.parametrize("width", [1, 2, 15, 16, 17, 33, 77, 150, 4096])
def test_row_max_by_halving_is_exact(width):
  """Odd widths take overlapping halves: still exactly the row maximum."""
  from d2g_jax.models.attention import _row_max
  s = jnp.asarray(randn(width, 6, width))
  s = s.at[0, -1].set(1e30).at[1, 0].set(-jnp.inf)  # the maximum at an edge; -inf entries
  np.testing.assert_array_equal(_row_max(s), s.max(-1, keepdims=True))


def test_chunked_attention_stays_exact_with_huge_logits():
  """Scores of +-1e3 overflow exp() unless the row maximum is subtracted."""
  from d2g_jax.models.attention import attention
  q, k, v = (jnp.asarray(randn(i, 1, 37, 2, 8)) for i in range(3))
  q = q * 300.0
  out = attention(q, k, v, implementation="chunked", chunk=16)
  assert bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("branch", ["cpu", "accelerator"])
@pytest.mark.parametrize("shape", [(2, 7, 5, 64), (1, 33, 3, 96), (1, 64, 64, 32)])
def test_group_norm_matches_torch_in_float64(shape, branch, monkeypatch):
  """Odd spatial sizes exercise pairwise_sum's carried rows; checked against float64. The
  accelerator branch (XLA's reduction, chosen when lowering for TPU or GPU) run on CPU."""
  from d2g_jax.models import layers
  from d2g_jax.models.layers import GroupNorm
  if branch == "accelerator":
    monkeypatch.setattr(layers, "middle_sum", layers.reduce_sum)
  x = randn(0, *shape) * 3 + 2
  scale, bias = randn(1, shape[-1]), randn(2, shape[-1])
  ours = GroupNorm(32, 1e-6).apply({"params": {"scale": scale, "bias": bias}}, x)
  ref = torch.nn.GroupNorm(32, shape[-1], eps=1e-6).double()
  ref.weight.data, ref.bias.data = torch.tensor(scale).double(), torch.tensor(bias).double()
  expected = nhwc(ref(torch.tensor(nchw(x)).double()).detach()).astype(np.float64)
  np.testing.assert_allclose(np.asarray(ours, np.float64), expected, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
    GroupNorm(32).init(jax.random.PRNGKey(0), np.zeros((1, 2, 2, 48), np.float32))


def test_group_norm_sum_is_chosen_by_the_lowering_platform():
  """The CPU lowering has pairwise_sum's halving slices; a TPU lowering (an ahead-of-time
  compile from this host, when libtpu is installed) has XLA's reduction alone."""
  import importlib.util

  from d2g_jax.models.layers import middle_sum
  x = jnp.ones((2, 4096, 64))
  assert "stablehlo.slice" in jax.jit(middle_sum).trace(x).lower().as_text()
  if importlib.util.find_spec("libtpu") is None:
    return  # the TPU half needs the `tpu` extra
  from d2g_jax.aot import target
  dev = target.devices("v5p:2x2x1")[0]
  s = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(dev))
  text = jax.jit(middle_sum).trace(s).lower().as_text()
  assert "stablehlo.slice" not in text and "stablehlo.reduce" in text


def test_scalar_timestep_and_remat_gradients(tmp_path):
  make_diffusers_unet("tiny_sd15", str(tmp_path))
  module, params = load_unet(str(tmp_path))
  x, _, ctx, added = inputs(module.config, size=8)
  out_vec = module.apply({"params": params}, x, np.array([500.0, 500.0]), ctx, added)
  out_scalar = module.apply({"params": params}, x, 500, ctx, added)
  np.testing.assert_array_equal(out_vec, out_scalar)
  remat = UNet(module.config, remat=True)
  loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, x, 500, ctx, added) ** 2)
  g_plain = jax.jit(jax.grad(loss(module)))(params)
  g_remat = jax.jit(jax.grad(loss(remat)))(params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         g_plain, g_remat)


@pytest.mark.parametrize("preset", FAMILIES)
def test_export_round_trip_is_bit_identical(preset, tmp_path):
  src, dst = tmp_path / "src", tmp_path / "dst"
  model = make_diffusers_unet(preset, str(src))
  module, params = load_unet(str(src))
  save_unet(module, params, str(dst))
  a = load_file(str(src / "diffusion_pytorch_model.safetensors"))
  b = load_file(str(dst / "diffusion_pytorch_model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  reloaded, info = UNet2DConditionModel.from_pretrained(str(dst), output_loading_info=True)
  assert not any(info.values()), info
  strip = lambda c: {k: v for k, v in c.items() if k != "_name_or_path"}
  assert strip(reloaded.config) == strip(model.config)
  x, t, ctx, added = inputs(module.config, batch=1)
  # Same weights and config; torch may pick another kernel for a fresh module (~1e-6).
  assert_close_to_scale(reference(reloaded, x, t[:1], ctx, added),
                        reference(model, x, t[:1], ctx, added), 1e-5)


def test_sharded_fp16_and_bin_weights(tmp_path):
  model = make_diffusers_unet("tiny_sd15", str(tmp_path / "ref"))
  _, ref_params = load_unet(str(tmp_path / "ref"))
  model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json")
  model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
  model.half().save_pretrained(str(tmp_path / "fp16"), variant="fp16")
  for name, tol in (("sharded", 0), ("bin", 0), ("fp16", 1e-3)):
    _, p = load_unet(str(tmp_path / name))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max()),
                           p, ref_params)


def _write_tiny(tmp_path, preset="tiny_sd15"):
  make_diffusers_unet(preset, str(tmp_path))
  return tmp_path / "diffusion_pytorch_model.safetensors"


def test_missing_folder_says_where_it_looked(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_unet(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_unet(str(tmp_path / "empty"))


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
  weights = _write_tiny(tmp_path)
  state = load_file(str(weights))
  del state["conv_in.bias"]
  state["extra.weight"] = np.zeros(3, np.float32)
  state["conv_out.weight"] = state["conv_out.weight"][:, :-1]
  save_file(state, str(weights))
  with pytest.raises(core.ConversionError) as e:
    load_unet(str(tmp_path))
  msg = str(e.value)
  assert str(weights) in msg
  assert "missing keys (1): ['conv_in.bias']" in msg
  assert "unexpected keys (1): ['extra.weight']" in msg
  assert "conv_out.weight (checkpoint (4, 31, 3, 3), model expects (4, 32, 3, 3))" in msg


def test_no_weights_file(tmp_path):
  weights = _write_tiny(tmp_path)
  os.remove(weights)
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    load_unet(str(tmp_path))


@pytest.mark.parametrize("option,value", [
    ("class_embed_type", "timestep"), ("resnet_time_scale_shift", "scale_shift"),
    ("addition_embed_type", "text"), ("only_cross_attention", True),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"])])
def test_unsupported_option_is_named(tmp_path, option, value):
  _write_tiny(tmp_path)
  cfg_path = tmp_path / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg[option] = value
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(UnsupportedConfigError, match=str(cfg_path)) as e:
    load_unet(str(tmp_path))
  assert option.split("_types")[0].replace("_", " ") in str(e.value).replace("_", " ")


def test_sdxl_without_added_cond_kwargs_explains():
  module = UNet(UNetConfig.preset("tiny_sdxl"))
  x, t, ctx, added = inputs(module.config)
  with pytest.raises(ValueError, match="text_embeds"):
    jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, ctx, None))


@pytest.mark.parametrize("preset,expected", [("sd15", 859_520_964), ("sdxl_base", 2_567_463_684),
                                             ("sd21", 865_910_724)])
def test_real_preset_param_counts(preset, expected):
  """jax.eval_shape of the shipped real configs gives exactly diffusers' parameter counts."""
  assert count_params(init_shapes(UNetConfig.preset(preset))) == expected


def test_tiny_param_counts_match_diffusers():
  for preset in FAMILIES:
    ref = UNet2DConditionModel.from_config(UNetConfig.preset(preset).to_diffusers())
    assert count_params(init_shapes(UNetConfig.preset(preset))) == sum(
        p.numel() for p in ref.parameters()), preset
