"""CLIP text encoder: parity with transformers, conversion both ways, presets, errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from d2g_jax.convert import clip as clip_convert
from d2g_jax.convert import core
from d2g_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from d2g_jax.models.unet import count_params as num_params


def _torch_model(cfg: CLIPTextConfig, seed=0):
  torch.manual_seed(seed)
  tcfg = transformers.CLIPTextConfig(**cfg.to_transformers())
  cls = (transformers.CLIPTextModelWithProjection if cfg.with_projection
         else transformers.CLIPTextModel)
  model = cls(tcfg).eval()
  with torch.no_grad():  # LayerNorms start at (1, 0): perturb them so they are tested too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _ids(cfg, seed=0, B=3, T=12):
  """Random tokens with EOS (and for the legacy config, the max id) at varied places."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, cfg.vocab_size - 1, size=(B, T))
  ids[:, 0] = cfg.bos_token_id
  for b, pos in enumerate([T - 1, 5, 3][:B]):
    eos = cfg.eos_token_id if cfg.eos_token_id != 2 else cfg.vocab_size - 1
    ids[b, pos:] = eos  # EOS then EOS-padding, like the SD tokenizers with pad = eos
  return ids


CASES = [
    dict(with_projection=False, hidden_act="quick_gelu", eos_token_id=2),
    dict(with_projection=True, hidden_act="gelu", eos_token_id=2),
    dict(with_projection=True, hidden_act="quick_gelu", eos_token_id=97),
]


@pytest.mark.parametrize("kw", CASES, ids=["vitl-like", "bigg-like", "new-eos"])
def test_parity_with_transformers(kw):
  cfg = CLIPTextConfig.tiny(**kw)
  tmodel = _torch_model(cfg)
  ids = _ids(cfg)
  if kw["eos_token_id"] != 2:  # a token id above EOS: first-EOS and argmax pooling differ
    ids[:, 1] = cfg.vocab_size - 1
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(ids), output_hidden_states=True)
  params = clip_convert.params_from_state_dict(cfg, tmodel.state_dict())
  out = jax.jit(CLIPTextModel(cfg).apply)({"params": params}, jnp.asarray(ids))
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-5, atol=1e-5)
  close(out.last_hidden_state, ref.last_hidden_state)
  assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    close(ours, theirs)
  if cfg.with_projection:
    close(out.text_embeds, ref.text_embeds)
    pooled_ref = tmodel.text_model(torch.from_numpy(ids)).pooler_output.detach()
  else:
    assert out.text_embeds is None
    pooled_ref = ref.pooler_output
  close(out.pooled, pooled_ref)


def test_attention_mask_matches_transformers():
  cfg = CLIPTextConfig.tiny()
  tmodel = _torch_model(cfg, seed=1)
  ids = _ids(cfg, seed=1)
  mask = np.ones_like(ids)
  mask[1, :2] = 0  # left padding: changes every later token
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  params = clip_convert.params_from_state_dict(cfg, tmodel.state_dict())
  out = CLIPTextModel(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(out.last_hidden_state)[:, 2:],
                             ref.last_hidden_state.numpy()[:, 2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_projection", [False, True])
def test_folder_round_trip(tmp_path, with_projection):
  cfg = CLIPTextConfig.tiny(with_projection=with_projection)
  tmodel = _torch_model(cfg, seed=2)
  src = tmp_path / "src"
  tmodel.save_pretrained(src)  # transformers 5 layout (no text_model. prefix without projection)
  module, params = clip_convert.load_clip_text(str(src))
  assert module.config == cfg
  clip_convert.save_clip_text(module, params, str(tmp_path / "out"))
  reloaded, info = type(tmodel).from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  for k, v in tmodel.state_dict().items():
    assert torch.equal(reloaded.state_dict()[k], v), k
  _, params2 = clip_convert.load_clip_text(str(tmp_path / "out"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_loads_legacy_prefixed_keys_with_position_ids(tmp_path):
  """transformers 4 checkpoints: `text_model.` prefix plus the position_ids buffer."""
  cfg = CLIPTextConfig.tiny()
  tmodel = _torch_model(cfg, seed=3)
  state = {"text_model." + k: v.numpy() for k, v in tmodel.state_dict().items()}
  state["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
  core.save_safetensors(state, str(tmp_path / "model.safetensors"))
  core.save_json(cfg.to_transformers(), str(tmp_path / "config.json"))
  _, params = clip_convert.load_clip_text(str(tmp_path))
  np.testing.assert_array_equal(params["text_model"]["final_layer_norm"]["scale"],
                                tmodel.state_dict()["final_layer_norm.weight"].numpy())


def test_sharded_and_bin_folders(tmp_path):
  cfg = CLIPTextConfig.tiny(with_projection=True)
  tmodel = _torch_model(cfg, seed=4)
  tmodel.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  _, p1 = clip_convert.load_clip_text(str(tmp_path / "sharded"))
  ref = clip_convert.params_from_state_dict(cfg, tmodel.state_dict())
  jax.tree_util.tree_map(np.testing.assert_array_equal, p1, ref)
  bin_dir = tmp_path / "pt"  # a pytorch_model.bin folder, as older transformers wrote
  bin_dir.mkdir()
  torch.save(tmodel.state_dict(), bin_dir / "pytorch_model.bin")
  core.save_json(cfg.to_transformers(), str(bin_dir / "config.json"))
  _, p2 = clip_convert.load_clip_text(str(bin_dir))
  jax.tree_util.tree_map(np.testing.assert_array_equal, p2, ref)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    clip_convert.load_clip_text(str(tmp_path / "nowhere"))
  cfg = CLIPTextConfig.tiny(with_projection=True)
  tmodel = _torch_model(cfg)
  tmodel.save_pretrained(tmp_path / "m")
  # Weights of a projection model under a config that says "no projection".
  conf = json.load(open(tmp_path / "m" / "config.json"))
  conf["architectures"] = ["CLIPTextModel"]
  json.dump(conf, open(tmp_path / "m" / "config.json", "w"))
  with pytest.raises(core.ConversionError, match="text_projection.weight"):
    clip_convert.load_clip_text(str(tmp_path / "m"))
  # Wrong width in the config: mis-shaped keys are named.
  conf["architectures"] = ["CLIPTextModelWithProjection"]
  conf["intermediate_size"] = 40
  json.dump(conf, open(tmp_path / "m" / "config.json", "w"))
  with pytest.raises(core.ConversionError, match="mis-shaped.*fc1"):
    clip_convert.load_clip_text(str(tmp_path / "m"))
  os.remove(tmp_path / "m" / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="no weights"):
    clip_convert.load_clip_text(str(tmp_path / "m"))
  with pytest.raises(ValueError, match="hidden_act"):
    CLIPTextConfig.tiny(hidden_act="relu6")
  with pytest.raises(ValueError, match="full CLIPModel"):
    CLIPTextConfig.from_transformers({"model_type": "clip", "text_config": {}})


PRESETS = {  # public parameter counts (transformers, meta device)
    "vit_l14": 123_060_480,
    "openclip_bigg": 694_659_840,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_counts(name):
  cfg = getattr(CLIPTextConfig, name)()
  ours = num_params(CLIPTextModel(cfg).init_shapes())
  tcfg = transformers.CLIPTextConfig(**cfg.to_transformers())
  cls = (transformers.CLIPTextModelWithProjection if cfg.with_projection
         else transformers.CLIPTextModel)
  with torch.device("meta"):
    tmodel = cls(tcfg)
  theirs = sum(p.numel() for p in tmodel.parameters())
  assert ours == theirs == PRESETS[name]
  # Every Flax path maps to a distinct transformers key with the same shape.
  table = clip_convert.clip_table(cfg)
  tshapes = {("text_model." + k if cls is transformers.CLIPTextModel else k): tuple(v.shape)
             for k, v in tmodel.state_dict().items()}
  src = core.TensorSource("meta", tshapes, lambda k: None)
  core.check_table(table, CLIPTextModel(cfg).init_shapes(), src)


def test_config_round_trip():
  for cfg in (CLIPTextConfig.vit_l14(), CLIPTextConfig.openclip_bigg(),
              CLIPTextConfig.tiny(with_projection=True, eos_token_id=97)):
    assert CLIPTextConfig.from_transformers(cfg.to_transformers()) == cfg
  assert CLIPTextConfig.vit_l14().hidden_act == "quick_gelu"
  assert CLIPTextConfig.openclip_bigg().with_projection


def test_export_bfloat16(tmp_path):
  cfg = CLIPTextConfig.tiny(with_projection=True)
  tmodel = _torch_model(cfg, seed=5)
  params = clip_convert.params_from_state_dict(cfg, tmodel.state_dict())
  clip_convert.save_clip_text(CLIPTextModel(cfg), params, str(tmp_path), dtype=jnp.bfloat16)
  reloaded, info = transformers.CLIPTextModelWithProjection.from_pretrained(
      tmp_path, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert reloaded.dtype == torch.bfloat16
  for k, v in tmodel.state_dict().items():
    assert torch.equal(reloaded.state_dict()[k], v.to(torch.bfloat16)), k


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_full_size_parity(name):
  """Random full-size encoders (bigG: ~6 GB of host memory), 77 tokens."""
  cfg = getattr(CLIPTextConfig, name)()
  tmodel = _torch_model(cfg, seed=6)
  ids = _ids(cfg, B=2, T=77)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(ids), output_hidden_states=True)
  params = clip_convert.params_from_state_dict(cfg, tmodel.state_dict())
  out = jax.jit(CLIPTextModel(cfg).apply)({"params": params}, jnp.asarray(ids))
  for ours, theirs in [(out.last_hidden_state, ref.last_hidden_state),
                       (out.hidden_states[-2], ref.hidden_states[-2])]:
    scale = float(theirs.abs().max())
    assert float(np.abs(np.asarray(ours) - theirs.numpy()).max()) <= 1e-4 * scale
