"""diffusers AutoencoderKL folders <-> (AutoencoderKL module, Flax params).

    module, params = load_vae("sd15/vae")              # config.json + weights
    save_vae(module, params, "export/vae")             # diffusers loads it back

A folder holds `config.json` and `diffusion_pytorch_model[.fp16].safetensors` (or
`.bin`, or the sharded index form). Checkpoints written before diffusers 0.15 name
the mid-block attention `query/key/value/proj_attn`; they load as `to_q/to_k/to_v/
to_out.0`. Export always writes the current names.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterator

import jax.numpy as jnp
import numpy as np

from d2g_jax.convert import core
from d2g_jax.models.vae import AutoencoderKL, VAEConfig

WEIGHTS_STEM = "diffusion_pytorch_model"
LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
              "upsamplers", "to_out")
_DEPRECATED = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_RENAMED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_table(config: VAEConfig) -> tuple[core.Table, Any]:
  """The conversion table of `config` and its param shapes."""
  shapes = AutoencoderKL(config).init_shapes()
  return core.module_table(shapes, LIST_NAMES), shapes


def with_current_attention_names(source: core.TensorSource) -> core.TensorSource:
  """`source` with pre-0.15 attention keys (query, key, ...) under their current names."""
  renamed = {}
  for key in source.keys():
    m = _DEPRECATED.match(key)
    renamed[f"{m.group(1)}{_RENAMED[m.group(2)]}.{m.group(3)}" if m else key] = key
  if len(renamed) != len(source):
    raise core.ConversionError(f"{source.description} holds both old (query/key/value/proj_attn) "
                               "and new (to_q/to_k/to_v/to_out.0) attention names")
  if all(k == v for k, v in renamed.items()):
    return source
  return core.TensorSource(source.description, {k: source.shape(v) for k, v in renamed.items()},
                           lambda k: source.get(renamed[k]))


def params_from_source(config: VAEConfig, source: core.TensorSource, dtype=np.float32,
                       progress: Callable[[Iterator], Iterator] | None = None) -> dict:
  """Strict conversion of a tensor source (file or state dict) to Flax params."""
  table, shapes = vae_table(config)
  return core.to_flax(table, shapes, with_current_attention_names(source), dtype=dtype,
                      progress=progress)


def params_from_state_dict(config: VAEConfig, state: dict, dtype=np.float32) -> dict:
  """Flax params from an in-memory diffusers state dict (torch tensors or numpy)."""
  return params_from_source(config, core.from_state_dict(state), dtype)


def load_vae(path: str, dtype=jnp.float32, param_dtype=jnp.float32, variant: str | None = None,
             implementation: str = "auto",
             progress: Callable[[Iterator], Iterator] | None = None
             ) -> tuple[AutoencoderKL, dict]:
  """(AutoencoderKL module, params) from a diffusers VAE folder; strict about every tensor."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"VAE folder {path!r} does not exist; expected a diffusers "
                            "AutoencoderKL folder (config.json + diffusion_pytorch_model."
                            "safetensors), e.g. <pipeline>/vae")
  config = VAEConfig.from_diffusers(core.load_json(os.path.join(path, "config.json"), "VAE config"))
  source = core.open_weights(path, WEIGHTS_STEM, variant)
  params = params_from_source(config, source, dtype=jnp.dtype(param_dtype), progress=progress)
  return AutoencoderKL(config, implementation, dtype=dtype, param_dtype=param_dtype), params


def state_dict(config: VAEConfig, params, dtype=None) -> dict[str, np.ndarray]:
  """The diffusers state dict (numpy) of `params`."""
  table, _ = vae_table(config)
  return core.to_torch(table, params, dtype=dtype)


def save_vae(module: AutoencoderKL, params: Any, path: str, dtype=None):
  """Writes a diffusers AutoencoderKL folder: config.json + diffusion_pytorch_model.safetensors.

  Weights first and config.json last, each atomically, so a folder with a config.json
  always has whole weights beside it.
  """
  table, _ = vae_table(module.config)
  core.save_model_folder(table, params, module.config.to_diffusers(), path,
                         WEIGHTS_STEM + ".safetensors", dtype=dtype)
