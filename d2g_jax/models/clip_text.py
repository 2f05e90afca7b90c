"""The CLIP text transformer (transformers' `CLIPTextModel[WithProjection]`) in Flax.

Legend: B batch, T tokens, N heads, K head width, D model width, F MLP width, P projection width.

Parameter names mirror transformers' `CLIPTextModelWithProjection` state dict
(`text_model.embeddings.token_embedding`, `text_model.encoder.layers_{i}.self_attn.q_proj`,
..., `text_projection`), so `d2g_jax.convert.clip` is a name table. The SD 1.x text
encoder is ViT-L/14 (`CLIPTextConfig.vit_l14()`), SDXL's second encoder is OpenCLIP
bigG with projection (`CLIPTextConfig.openclip_bigg()`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

Dtype = Any
PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "presets")

# transformers' ACT2FN names for the activations CLIP checkpoints use.
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
# Pre-2023 configs say eos_token_id=2; transformers then pools at argmax(input_ids).
LEGACY_EOS_TOKEN_ID = 2


class TowerChecks:
  """What the text and vision towers' configs share: checks and the head width."""
  hidden_act: str
  hidden_size: int
  num_attention_heads: int

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unsupported CLIP hidden_act {self.hidden_act!r}; supported: "
                       f"{sorted(_ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(TowerChecks):
  """Hyperparameters of a CLIP text encoder, as in transformers' `config.json`."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 768
  with_projection: bool = False  # CLIPTextModelWithProjection (text_projection, no bias)
  bos_token_id: int = 0
  eos_token_id: int = 2
  pad_token_id: int = 1

  @classmethod
  def from_transformers(cls, config: dict) -> "CLIPTextConfig":
    """From a transformers `CLIPTextConfig` dict (a text encoder folder's config.json)."""
    if "text_config" in config or config.get("model_type") == "clip":
      raise ValueError("this is a full CLIPModel config (text and vision); expected the config of "
                       "a CLIPTextModel / CLIPTextModelWithProjection, e.g. a diffusers pipeline's "
                       "text_encoder/config.json")
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
      raise ValueError(f"expected model_type 'clip_text_model', found {model_type!r}")
    arch = config.get("architectures") or ["CLIPTextModel"]
    names = {f.name for f in dataclasses.fields(cls)} - {"with_projection"}
    kwargs = {k: config[k] for k in names if config.get(k) is not None}
    return cls(with_projection="CLIPTextModelWithProjection" in arch, **kwargs)

  def to_transformers(self) -> dict:
    """The transformers config.json dict of this model."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d.pop("with_projection")
    arch = "CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"
    return {"architectures": [arch], "model_type": "clip_text_model", "attention_dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02, **d}

  @classmethod
  def from_preset(cls, name: str) -> "CLIPTextConfig":
    """A config shipped in d2g_jax/presets/<name>.json."""
    path = os.path.join(PRESETS_DIR, name + ".json")
    with open(path) as fh:
      return cls.from_transformers(json.load(fh))

  @classmethod
  def vit_l14(cls) -> "CLIPTextConfig":
    """OpenAI CLIP ViT-L/14 text encoder: SD 1.x, and SDXL's first encoder."""
    return cls.from_preset("clip_vit_l14_text")

  @classmethod
  def openclip_bigg(cls) -> "CLIPTextConfig":
    """OpenCLIP ViT-bigG/14 text encoder with projection: SDXL's second encoder."""
    return cls.from_preset("openclip_bigg_text")

  @classmethod
  def tiny(cls, with_projection: bool = False, hidden_act: str = "quick_gelu",
           eos_token_id: int = 2) -> "CLIPTextConfig":
    """A few-thousand-parameter model for tests."""
    return cls(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
               num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
               projection_dim=24, with_projection=with_projection, eos_token_id=eos_token_id)


@struct.dataclass
class CLIPTextOutput:
  """last_hidden_state: final layer norm applied; hidden_states: embeddings then every
  layer's output (no final norm), so hidden_states[-2] is the penultimate layer;
  pooled: last_hidden_state at the EOS token; text_embeds: projected pooled (or None)."""
  last_hidden_state: jax.Array  # BxTxD
  hidden_states: tuple[jax.Array, ...]  # (num_hidden_layers + 1) x BxTxD
  pooled: jax.Array  # BxD
  text_embeds: jax.Array | None  # BxP


class CLIPAttention(nn.Module):
  """Multi-head self-attention; causal for the text tower, not for the vision tower."""
  config: CLIPTextConfig  # or models.clip_vision.CLIPVisionConfig: the same fields are read
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT=None):
    cfg = self.config
    dense = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=name)
    split = lambda a: a.reshape(*a.shape[:2], cfg.num_attention_heads, cfg.head_dim)
    q_BxTxNxK = split(dense("q_proj")(x_BxTxD))
    k_BxTxNxK = split(dense("k_proj")(x_BxTxD))
    v_BxTxNxK = split(dense("v_proj")(x_BxTxD))
    mask = None if mask_BxT is None else mask_BxT.astype(bool)[:, None, None, :]
    o = jax.nn.dot_product_attention(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, mask=mask,
                                     is_causal=self.causal)
    return dense("out_proj")(o.reshape(*o.shape[:2], cfg.hidden_size))


class CLIPMLP(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.config
    h_BxTxF = nn.Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="fc1")(x_BxTxD)
    h_BxTxF = _ACTIVATIONS[cfg.hidden_act](h_BxTxF)
    return nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="fc2")(h_BxTxF)


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm self-attention and MLP, each with a residual."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT=None):
    ln = lambda name: nn.LayerNorm(self.config.layer_norm_eps, dtype=jnp.float32,
                                   param_dtype=self.param_dtype, name=name)
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    attn = CLIPAttention(**kw, causal=self.causal, name="self_attn")
    x = x_BxTxD
    x = x + attn(ln("layer_norm1")(x).astype(self.dtype), mask_BxT)
    x = x + CLIPMLP(**kw, name="mlp")(ln("layer_norm2")(x).astype(self.dtype))
    return x


class CLIPEncoder(nn.Module):
  """The stack of layers; returns the input and every layer's output."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT=None) -> tuple[jax.Array, ...]:
    hidden = [x_BxTxD]
    for i in range(self.config.num_hidden_layers):
      hidden.append(CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, self.causal,
                                     name=f"layers_{i}")(hidden[-1], mask_BxT))
    return tuple(hidden)


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxT):
    cfg = self.config
    T = input_ids_BxT.shape[-1]
    if T > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, param_dtype=self.param_dtype, name=name)
    tok_BxTxD = embed(cfg.vocab_size, "token_embedding")(input_ids_BxT)
    pos_TxD = embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(T))
    return (tok_BxTxD + pos_TxD[None]).astype(jnp.float32)


class CLIPTextTransformer(nn.Module):
  """transformers' `CLIPTextModel.text_model`: embeddings, encoder, final layer norm."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxT, attention_mask_BxT=None):
    cfg = self.config
    x = CLIPTextEmbeddings(cfg, self.param_dtype, name="embeddings")(input_ids_BxT)
    hidden = CLIPEncoder(cfg, self.dtype, self.param_dtype, name="encoder")(x, attention_mask_BxT)
    last_BxTxD = nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype,
                              name="final_layer_norm")(hidden[-1])
    ids = input_ids_BxT.astype(jnp.int32)
    if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
      eos_B = jnp.argmax(ids, axis=-1)
    else:  # first EOS (padding may also be EOS)
      eos_B = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
    pooled_BxD = jnp.take_along_axis(last_BxTxD, eos_B[:, None, None], axis=1)[:, 0]
    return last_BxTxD, hidden, pooled_BxD


class CLIPTextModel(nn.Module):
  """CLIP text encoder; with `config.with_projection`, also `text_embeds = pooled @ W`.

  `model.apply({"params": p}, input_ids_BxT)` -> `CLIPTextOutput`.
  `attention_mask_BxT` (1 = token, 0 = padding) is optional; SD pipelines pass none.
  """
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxT, attention_mask_BxT=None) -> CLIPTextOutput:
    last, hidden, pooled = CLIPTextTransformer(self.config, self.dtype, self.param_dtype,
                                               name="text_model")(input_ids_BxT, attention_mask_BxT)
    embeds = None
    if self.config.with_projection:
      embeds = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="text_projection")(pooled)
    return CLIPTextOutput(last, hidden, pooled, embeds)

  def init_shapes(self, seq_len: int | None = None):
    """The param tree as `jax.ShapeDtypeStruct`s, without allocating."""
    T = seq_len or self.config.max_position_embeddings
    ids = jax.ShapeDtypeStruct((1, T), jnp.int32)
    return jax.eval_shape(lambda i: self.init(jax.random.PRNGKey(0), i), ids)["params"]
