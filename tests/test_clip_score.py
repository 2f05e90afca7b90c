"""CLIP vision tower, CLIPModel loader and CLIP score vs transformers (tiny random CLIPModel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from torch_utils import assert_close_to_scale, nchw

from d2g_jax import tiny
from d2g_jax.convert import core
from d2g_jax.convert.clip_model import load_clip_model, params_from_state_dict
from d2g_jax.evaluate import clip_score as cs
from d2g_jax.models.clip_vision import CLIPConfig, CLIPModel

SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("clip"))
  tiny.build_clip_model(path, image_size=SIZE)
  return path


@pytest.fixture(scope="module")
def reference(folder):
  return transformers.CLIPModel.from_pretrained(folder).eval()


def test_towers_match_transformers(folder, reference):
  module, params = load_clip_model(folder)
  pixels = np.random.default_rng(0).standard_normal((3, SIZE, SIZE, 3)).astype(np.float32)
  ids = np.array([[58, 27, 15, 59, 59, 59, 59, 59, 59, 59, 59, 59],
                  [58, 54, 41, 57, 7, 8, 9, 10, 11, 12, 13, 59],
                  [58, 59, 59, 59, 59, 59, 59, 59, 59, 59, 59, 59]], np.int32)
  img = module.apply({"params": params}, jnp.asarray(pixels), method=CLIPModel.get_image_features)
  txt = module.apply({"params": params}, jnp.asarray(ids), method=CLIPModel.get_text_features)
  with torch.no_grad():
    pooled = reference.vision_model(pixel_values=torch.from_numpy(nchw(pixels))).pooler_output
    want_img = reference.visual_projection(pooled).numpy()
    want_txt = reference.text_projection(
        reference.text_model(input_ids=torch.from_numpy(ids).long()).pooler_output).numpy()
  assert_close_to_scale(img, want_img)
  assert_close_to_scale(txt, want_txt)
  np.testing.assert_allclose(float(params["logit_scale"]), reference.logit_scale.item())


def test_preprocess_matches_clip_image_processor():
  """Our jit-able preprocessing vs transformers' PIL and torchvision CLIP processors, on a
  non-square 8-bit image (resize of the shorter side, centre crop, normalisation)."""
  image = np.random.default_rng(1).integers(0, 256, (40, 57, 3)).astype(np.uint8)
  pp = cs.Preprocess(shortest_edge=24, crop_size=(24, 24))
  ours = np.asarray(cs.preprocess(jnp.asarray(image, jnp.float32)[None], pp))[0]
  std = np.asarray(pp.std)
  for cls in (transformers.CLIPImageProcessorPil, transformers.CLIPImageProcessor):
    proc = cls(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    want = proc(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    levels = np.abs(ours - want) * std * 255  # difference in 8-bit levels
    assert levels.max() <= 1.0 + 1e-3, (cls.__name__, levels.max())
    assert (levels > 0.5).mean() < 0.02, (cls.__name__, (levels > 0.5).mean())


def test_clip_score_end_to_end(folder, reference):
  """Scorer cosine (tokenise, preprocess, both towers) vs transformers' processor + CLIPModel."""
  scorer = cs.load_clip_scorer(folder)
  prompts = ["the cat", "a photo of the cat", "cat of the photo"]
  pixels = np.random.default_rng(2).integers(0, 256, (3, 48, 48, 3)).astype(np.uint8)
  got = jax.jit(scorer.cosine)(scorer.params, jnp.asarray(pixels, jnp.float32),
                               jnp.asarray(scorer.tokenize(prompts)))
  processor = transformers.CLIPImageProcessorPil.from_pretrained(folder)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  with torch.no_grad():
    inputs = processor(images=list(pixels), return_tensors="pt")
    img = reference.visual_projection(reference.vision_model(**inputs).pooler_output)
    tok = tokenizer(prompts, padding=True, return_tensors="pt")
    txt = reference.text_projection(reference.text_model(**tok).pooler_output)
    want = torch.nn.functional.cosine_similarity(img, txt).numpy()
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-3)
  # The convention: mean of max(cos, 0), times 1 (the paper) or 100 (torchmetrics).
  cos = np.array([-0.2, 0.3, 0.5])
  assert cs.clip_score(cos) == pytest.approx(0.8 / 3)
  assert cs.clip_score(cos, scale=100) == pytest.approx(80 / 3)


def test_loader_errors(folder, tmp_path):
  text_only = tmp_path / "text_encoder"
  tiny.make_text_encoder(16, "quick_gelu").save_pretrained(str(text_only))
  with pytest.raises(ValueError, match="expected a whole transformers CLIPModel"):
    load_clip_model(str(text_only))
  config = CLIPConfig.from_transformers(core.load_json(f"{folder}/config.json"))
  state = dict(transformers.CLIPModel.from_pretrained(folder).state_dict())
  del state["vision_model.embeddings.class_embedding"]
  with pytest.raises(core.ConversionError, match="class_embedding"):
    params_from_state_dict(config, state)
  with pytest.raises(FileNotFoundError, match="CLIPModel folder"):
    load_clip_model(str(tmp_path / "nowhere"))
