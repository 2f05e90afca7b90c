"""CLIP's vision tower and the whole two-tower `CLIPModel` (transformers' layout) in Flax.

Legend: B batch, H/W image height/width, G patches per side, T tokens (G*G + 1),
D model width, P projection width, S text tokens.

The vision transformer is transformers' `CLIPVisionTransformer`: a stride-`patch_size`
conv (no bias) cuts the image into patches, a learned class token is prepended, learned
position embeddings added, then `pre_layrnorm` (transformers' spelling), the same
pre-LayerNorm encoder layers as the text tower but without a causal mask, and
`post_layernorm` on the class token: the pooled output. `CLIPModel` adds both
projections (no bias) and `logit_scale`; its parameter tree mirrors transformers'
`CLIPModel` state dict (`vision_model.embeddings.class_embedding`,
`visual_projection.weight`, `text_model....`, `logit_scale`), so
`d2g_jax.convert.clip_model` is a name table.

    model = CLIPModel(config)
    img_BxP = model.apply({"params": p}, pixels_BxHxWx3, method=CLIPModel.get_image_features)
    txt_BxP = model.apply({"params": p}, ids_BxS, method=CLIPModel.get_text_features)

Pixels are NHWC, already normalised with the image processor's mean and std
(`d2g_jax.evaluate.clip_score.preprocess`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from d2g_jax.models.clip_text import CLIPEncoder, CLIPTextConfig, CLIPTextTransformer, TowerChecks

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(TowerChecks):
  """Hyperparameters of a CLIP vision tower; defaults are transformers' `CLIPVisionConfig`."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_transformers(cls, config: dict) -> "CLIPVisionConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: config[k] for k in names if config.get(k) is not None})


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A transformers `CLIPModel` config: both towers, the projection width, logit scale."""
  text: CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_transformers(cls, config: dict, source: str = "config.json") -> "CLIPConfig":
    text = config.get("text_config") or config.get("text_config_dict")
    vision = config.get("vision_config") or config.get("vision_config_dict")
    if config.get("model_type") not in (None, "clip") or not text or not vision:
      raise ValueError(f"{source}: model_type {config.get('model_type')!r}, text_config "
                       f"{'present' if text else 'absent'}, vision_config "
                       f"{'present' if vision else 'absent'}; expected a whole transformers "
                       "CLIPModel (model_type 'clip', both towers), e.g. "
                       "openai/clip-vit-large-patch14, not a text or vision encoder alone")
    text = {k: v for k, v in text.items() if k != "architectures"}
    text.setdefault("model_type", "clip_text_model")
    return cls(CLIPTextConfig.from_transformers(text), CLIPVisionConfig.from_transformers(vision),
               int(config.get("projection_dim", 512)),
               float(config.get("logit_scale_init_value", 2.6592)))


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels_BxHxWx3):
    cfg = self.config
    B, H, W, _ = pixels_BxHxWx3.shape
    if (H, W) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"CLIP vision input is {H}x{W}; this model takes "
                       f"{cfg.image_size}x{cfg.image_size} (preprocess the images first)")
    cls_D = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,),
                       self.param_dtype)
    p = cfg.patch_size
    patches_BxGxGxD = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID",
                              use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="patch_embedding")(pixels_BxHxWx3.astype(self.dtype))
    patches = patches_BxGxGxD.reshape(B, -1, cfg.hidden_size).astype(jnp.float32)
    cls_Bx1xD = jnp.broadcast_to(cls_D.astype(jnp.float32), (B, 1, cfg.hidden_size))
    x_BxTxD = jnp.concatenate([cls_Bx1xD, patches], axis=1)
    pos_TxD = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, param_dtype=self.param_dtype,
                       name="position_embedding")(jnp.arange(cfg.num_patches + 1))
    return x_BxTxD + pos_TxD[None].astype(jnp.float32)


class CLIPVisionTransformer(nn.Module):
  """transformers' `CLIPVisionModel.vision_model`; returns the pooled output BxD."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels_BxHxWx3):
    cfg = self.config
    ln = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32,
                                   param_dtype=self.param_dtype, name=name)
    x = CLIPVisionEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(pixels_BxHxWx3)
    x = ln("pre_layrnorm")(x)
    hidden = CLIPEncoder(cfg, self.dtype, self.param_dtype, causal=False, name="encoder")(x)
    return ln("post_layernorm")(hidden[-1][:, 0].astype(jnp.float32))


class CLIPModel(nn.Module):
  """Both towers with their projections and `logit_scale` (transformers' `CLIPModel`)."""
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.text_model = CLIPTextTransformer(cfg.text, self.dtype, self.param_dtype)
    self.vision_model = CLIPVisionTransformer(cfg.vision, self.dtype, self.param_dtype)
    proj = lambda: nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                            param_dtype=self.param_dtype)
    self.text_projection, self.visual_projection = proj(), proj()
    self.logit_scale = self.param("logit_scale",
                                  nn.initializers.constant(cfg.logit_scale_init_value), (),
                                  self.param_dtype)

  def get_text_features(self, input_ids_BxS, attention_mask_BxS=None):
    """Projected text embeddings BxP (not normalised), fp32."""
    _, _, pooled_BxD = self.text_model(input_ids_BxS, attention_mask_BxS)
    return self.text_projection(pooled_BxD).astype(jnp.float32)

  def get_image_features(self, pixels_BxHxWx3):
    """Projected image embeddings BxP (not normalised), fp32."""
    return self.visual_projection(self.vision_model(pixels_BxHxWx3)).astype(jnp.float32)

  def __call__(self, input_ids_BxS, pixels_BxHxWx3):
    """(text BxP, image BxP, logit scale): everything, so that `init` makes every param."""
    return (self.get_text_features(input_ids_BxS), self.get_image_features(pixels_BxHxWx3),
            self.logit_scale)

  def init_shapes(self):
    """The param tree as `jax.ShapeDtypeStruct`s, without allocating."""
    s = self.config.vision.image_size
    ids = jax.ShapeDtypeStruct((1, self.config.text.max_position_embeddings), jnp.int32)
    px = jax.ShapeDtypeStruct((1, s, s, self.config.vision.num_channels), jnp.float32)
    return jax.eval_shape(lambda i, x: self.init(jax.random.PRNGKey(0), i, x), ids, px)["params"]


def cosine(a_BxP: jax.Array, b_BxP: jax.Array) -> jax.Array:
  """Row-wise cosine similarity, fp32 (embeddings normalised as transformers / torchmetrics do)."""
  a = a_BxP.astype(jnp.float32)
  b = b_BxP.astype(jnp.float32)
  a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
  return jnp.sum(a * b, axis=-1)
