"""diffusers UNet2DConditionModel folders <-> (UNet module, Flax params).

    module, params = load_unet("sd15/unet")              # config.json + weights
    save_unet(module, params, "student/unet")            # diffusers loads it back

A folder holds `config.json` and `diffusion_pytorch_model[.fp16].safetensors` (or
`.bin`, or the sharded `*.safetensors.index.json` form).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import jax.numpy as jnp
import numpy as np

from d2g_jax.convert import core
from d2g_jax.models.unet import UNet, init_shapes
from d2g_jax.models.unet_config import UNetConfig

WEIGHTS_STEM = "diffusion_pytorch_model"
# Flax `<name>_<i>` components that are PyTorch ModuleLists (`<name>.<i>`).
LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
              "upsamplers", "transformer_blocks", "to_out", "net")


def unet_table(config: UNetConfig) -> tuple[core.Table, Any]:
  """The conversion table of `config` and its param shapes."""
  shapes = init_shapes(config)
  return core.module_table(shapes, LIST_NAMES), shapes


def load_unet(path: str, dtype=jnp.float32, param_dtype=jnp.float32, variant: str | None = None,
              attention: str = "auto", remat: bool = False,
              progress: Callable[[Iterator], Iterator] | None = None,
              place: Callable[[np.ndarray], Any] | None = None):
  """(UNet module, params) from a diffusers UNet folder; strict about every tensor.

  `dtype` is the compute dtype, `param_dtype` the dtype the params are returned in:
  numpy arrays on the host, or whatever `place` (e.g. `jax.device_put`) makes of each
  tensor as it is read.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"UNet folder {path!r} does not exist; expected a diffusers UNet "
                            "folder (config.json + diffusion_pytorch_model.safetensors), e.g. "
                            "<pipeline>/unet")
  config = UNetConfig.from_json(os.path.join(path, "config.json"))
  source = core.open_weights(path, WEIGHTS_STEM, variant)
  table, shapes = unet_table(config)
  params = core.to_flax(table, shapes, source, dtype=jnp.dtype(param_dtype), progress=progress,
                        place=place)
  module = UNet(config, dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat)
  return module, params


def save_unet(module: UNet, params: Any, path: str, dtype=None,
              progress: Callable[[Iterator], Iterator] | None = None):
  """Writes a diffusers UNet folder: config.json + diffusion_pytorch_model.safetensors.

  The weights are written first and config.json last, each atomically, so a folder
  with a config.json always has whole weights beside it.
  """
  table, _ = unet_table(module.config)
  core.save_model_folder(table, params, module.config.to_diffusers(), path,
                         WEIGHTS_STEM + ".safetensors", dtype=dtype, progress=progress)
