"""CLIP score: cosine similarity of image and caption embeddings, clipped at 0, averaged.

Legend: B batch, H/W image height/width, S text tokens, P projection width.

    scorer = load_clip_scorer("/models/clip-vit-large-patch14")   # a transformers CLIPModel folder
    ids_BxS = scorer.tokenize(["a photo of a cat", ...])           # host
    cos_B = scorer.cosine(scorer.params, pixels_BxHxWx3, ids_BxS)  # jit-able; pixels in [0, 255]
    score = clip_score(cos_N, scale=1.0)                           # mean of max(cos, 0) x scale

Scaling convention. The score is `scale * mean_i max(cos(E_img(x_i), E_txt(c_i)), 0)`.
The Diffusion2GAN and GigaGAN papers report the plain cosine (SDXL: 0.347), which is
`scale=1` (our default). torchmetrics' `CLIPScore` (and many papers citing "CLIP score
31.5") multiply by 100: `scale=100` (config `eval.clip.scale=100`). Both clip at 0 first.

Preprocessing is the folder's `preprocessor_config.json` (OpenAI's values when absent), as
`CLIPImageProcessor` applies it to 8-bit images: bicubic resize of the shorter side to
`size.shortest_edge` with PIL's 8-bit arithmetic (`evaluate.resize`, `quantize=True`),
centre crop to `crop_size`, `rescale_factor` (1/255), mean / std. Measured against
transformers 5's `CLIPImageProcessor` and `CLIPImageProcessorPil`: at most 1/255 apart on
a pixel, on 0.6% / 0.02% of them. Captions are tokenised with the folder's tokenizer,
padded to `max_position_embeddings` and truncated there (CLIP's 77 tokens), as
torchmetrics truncates them; the causal text tower makes padding irrelevant to the
pooled embedding.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from d2g_jax.evaluate.resize import center_crop, resize, shortest_edge_size
from d2g_jax.files import load_json
from d2g_jax.models.clip_vision import CLIPModel, cosine

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.BICUBIC, the only resample we implement


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """The parts of `preprocessor_config.json` CLIP score uses."""
  shortest_edge: int = 224
  crop_size: tuple[int, int] = (224, 224)
  do_center_crop: bool = True
  rescale_factor: float = 1 / 255
  mean: tuple[float, ...] = OPENAI_MEAN
  std: tuple[float, ...] = OPENAI_STD

  @classmethod
  def from_folder(cls, path: str) -> "Preprocess":
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(file):
      return cls()
    c = load_json(file, "CLIP preprocessor config")
    if c.get("resample", BICUBIC) != BICUBIC:
      raise ValueError(f"{file}: resample={c['resample']}; only bicubic (3) is implemented")
    size, crop = c.get("size", {"shortest_edge": 224}), c.get("crop_size", 224)
    edge = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    return cls(int(edge), tuple(int(v) for v in crop), bool(c.get("do_center_crop", True)),
               float(c.get("rescale_factor", 1 / 255)),
               tuple(c.get("image_mean", OPENAI_MEAN)), tuple(c.get("image_std", OPENAI_STD)))


def preprocess(pixels_BxHxWx3, pp: Preprocess):
  """8-bit images (floats in [0, 255]) -> normalised CLIP input, jit-able."""
  _, H, W, _ = pixels_BxHxWx3.shape
  x = resize(pixels_BxHxWx3, shortest_edge_size(H, W, pp.shortest_edge), quantize=True)
  if pp.do_center_crop:
    x = center_crop(x, pp.crop_size)
  x = x * pp.rescale_factor
  return (x - jnp.asarray(pp.mean, jnp.float32)) / jnp.asarray(pp.std, jnp.float32)


@dataclasses.dataclass(frozen=True)
class ClipScorer:
  module: CLIPModel
  params: Any
  tokenizer: Any
  pp: Preprocess

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    n = self.module.config.text.max_position_embeddings
    out = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=n,
                         return_tensors="np")
    return out["input_ids"].astype(np.int32)

  def cosine(self, params, pixels_BxHxWx3, input_ids_BxS):
    """cos(image embedding, caption embedding) per example, fp32 (jit-able)."""
    img = self.module.apply({"params": params}, preprocess(pixels_BxHxWx3, self.pp),
                            method=CLIPModel.get_image_features)
    txt = self.module.apply({"params": params}, input_ids_BxS, method=CLIPModel.get_text_features)
    return cosine(img, txt)


def load_clip_scorer(path: str, dtype: Any = jnp.float32) -> ClipScorer:
  """A transformers CLIPModel folder (weights, tokenizer, preprocessor config) as a scorer."""
  from transformers import AutoTokenizer

  from d2g_jax.convert.clip_model import load_clip_model
  module, params = load_clip_model(path, dtype=dtype)
  try:
    tokenizer = AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f"no tokenizer in the CLIP folder {path!r} ({e}); save the "
                            "CLIPProcessor (or CLIPTokenizer) beside the model") from e
  return ClipScorer(module, params, tokenizer, Preprocess.from_folder(path))


def clip_score(cosines_N: np.ndarray, scale: float = 1.0) -> float:
  """scale x mean(max(cos, 0)): 1 as the paper reports (0.347), 100 as torchmetrics."""
  cosines_N = np.asarray(cosines_N, np.float64).reshape(-1)
  return float(scale * np.mean(np.maximum(cosines_N, 0.0)))
