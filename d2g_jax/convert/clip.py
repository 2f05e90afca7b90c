"""transformers CLIP text encoder folders <-> Flax `CLIPTextModel` params.

A folder is `config.json` plus `model.safetensors` (or its sharded index, or
`pytorch_model.bin`), as `CLIPTextModel.save_pretrained` / a diffusers pipeline's
`text_encoder/` and `text_encoder_2/` hold them. Checkpoints written by transformers
< 5 prefix the keys of a projection-less model with `text_model.` and some carry the
`text_model.embeddings.position_ids` buffer; transformers 5 writes no prefix. Both
load. Export writes the prefixed form, which transformers 4 and 5 both load.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.convert import core
from d2g_jax.models.clip_text import CLIPTextConfig, CLIPTextModel

PREFIX = "text_model."
# Non-persistent buffers that older checkpoints saved; consumed and ignored.
IGNORED_KEYS = ("text_model.embeddings.position_ids", "embeddings.position_ids")


def clip_table(config: CLIPTextConfig) -> core.Table:
  """Flax path -> transformers key (with the `text_model.` prefix) for `config`."""
  return core.module_table(CLIPTextModel(config).init_shapes(), ["layers"])


def _table_for(config: CLIPTextConfig, keys) -> core.Table:
  """The table matching a checkpoint's key style (prefixed or transformers-5 bare)."""
  table = clip_table(config)
  keys = set(keys) - set(IGNORED_KEYS)
  bare = not config.with_projection and keys and not any(k.startswith(PREFIX) for k in keys)
  if bare:
    table = {p: core.Entry(e.torch_key[len(PREFIX):], e.hook) for p, e in table.items()}
  return table


def params_from_source(config: CLIPTextConfig, source: core.TensorSource,
                       dtype=np.float32) -> dict:
  """Strict conversion of a tensor source (file or state dict) to Flax params."""
  shapes = CLIPTextModel(config).init_shapes()
  table = _table_for(config, source.keys())
  return core.to_flax(table, shapes, source, dtype=dtype, ignore=IGNORED_KEYS)


def params_from_state_dict(config: CLIPTextConfig, state: dict, dtype=np.float32) -> dict:
  """Flax params from an in-memory transformers state dict (torch tensors or numpy)."""
  return params_from_source(config, core.from_state_dict(state), dtype)


def load_clip_text(path: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   variant: str | None = None) -> tuple[CLIPTextModel, dict]:
  """(module, params) from a transformers CLIPTextModel[WithProjection] folder.

  `dtype` is the compute dtype, `param_dtype` the dtype of the returned (numpy) params.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"text encoder folder {path!r} does not exist; expected a transformers "
                            "CLIPTextModel folder (config.json + model.safetensors), e.g. "
                            "<pipeline>/text_encoder")
  config_path = os.path.join(path, "config.json")
  config = CLIPTextConfig.from_transformers(core.load_json(config_path, "CLIP text encoder config"))
  source = core.open_weights(path, "model", variant)
  try:
    params = params_from_source(config, source, dtype=jnp.dtype(param_dtype))
  except core.ConversionError as e:
    hint = ""
    if config.with_projection != ("text_projection.weight" in source.keys()):
      hint = (f"\n{config_path} says architectures={config.to_transformers()['architectures']} but "
              "the weights " + ("have" if not config.with_projection else "lack") +
              " text_projection.weight: fix `architectures` in config.json.")
    raise core.ConversionError(str(e) + hint) from None
  return CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype), params


def state_dict(config: CLIPTextConfig, params, dtype=None) -> dict[str, np.ndarray]:
  """The transformers state dict (numpy) of `params`, keys prefixed `text_model.`."""
  return core.to_torch(clip_table(config), params, dtype=dtype)


def save_clip_text(module: CLIPTextModel, params, path: str, dtype=None):
  """Writes a folder that `transformers.CLIPTextModel[WithProjection].from_pretrained` loads.

  Weights first and config.json last, each atomically, so a folder with a config.json
  always has whole weights beside it. `dtype` (e.g. np.float16) casts the weights.
  """
  cfg = module.config.to_transformers()
  leaf = jax.tree_util.tree_leaves(params)[0]
  cfg["dtype"] = jnp.dtype(dtype if dtype is not None else leaf.dtype).name
  core.save_model_folder(clip_table(module.config), params, cfg, path, "model.safetensors",
                         dtype=dtype)
