"""transformers `CLIPModel` folders (both towers) <-> Flax `models.clip_vision.CLIPModel` params.

A folder is what `CLIPModel.save_pretrained` (plus `CLIPProcessor.save_pretrained`) writes:
`config.json` (model_type "clip", `text_config`, `vision_config`, `projection_dim`),
`model.safetensors` (or `pytorch_model.bin`, or a sharded index), the tokenizer files and
`preprocessor_config.json`. E.g. openai/clip-vit-large-patch14, or
laion/CLIP-ViT-g-14-laion2B-s12B-b42K for OpenCLIP ViT-g/14 in transformers' format.
Conversion is strict (every tensor consumed, every shape checked); the `position_ids`
buffers some checkpoints carry are skipped by name.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from d2g_jax.convert import core
from d2g_jax.models.clip_vision import CLIPConfig, CLIPModel

IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
LEAVES = {"class_embedding": "class_embedding", "logit_scale": "logit_scale"}


def clip_model_table(config: CLIPConfig) -> core.Table:
  """Flax path -> transformers `CLIPModel` state-dict key, every tensor."""
  return core.module_table(CLIPModel(config).init_shapes(), ["layers"], leaves=LEAVES)


def params_from_source(config: CLIPConfig, source: core.TensorSource, dtype=np.float32) -> dict:
  return core.to_flax(clip_model_table(config), CLIPModel(config).init_shapes(), source,
                      dtype=dtype, ignore=IGNORED_KEYS)


def params_from_state_dict(config: CLIPConfig, state: dict, dtype=np.float32) -> dict:
  """Flax params from an in-memory transformers `CLIPModel` state dict."""
  return params_from_source(config, core.from_state_dict(state), dtype)


def load_clip_model(path: str, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32) -> tuple[CLIPModel, dict]:
  """(module, params) from a transformers CLIPModel folder."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"CLIP model folder {path!r} does not exist; expected a transformers "
                            "CLIPModel folder (config.json with text_config and vision_config, "
                            "model.safetensors, tokenizer and preprocessor_config.json)")
  config_path = os.path.join(path, "config.json")
  config = CLIPConfig.from_transformers(core.load_json(config_path, "CLIP model config"),
                                        config_path)
  params = params_from_source(config, core.open_weights(path, "model"),
                              dtype=jnp.dtype(param_dtype))
  return CLIPModel(config, dtype=dtype, param_dtype=param_dtype), params
