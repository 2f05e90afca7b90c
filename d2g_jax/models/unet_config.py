"""`UNetConfig`: the hyperparameters of a diffusers `UNet2DConditionModel`.

Built from (and written back to) a diffusers `config.json`. Every option diffusers
knows is either supported, or allowed only at the value that leaves the network
unchanged: anything else raises `UnsupportedConfigError` naming the option, so an
unfamiliar checkpoint never loads as a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "presets")
DIFFUSERS_VERSION = "0.42.1"

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


class UnsupportedConfigError(ValueError):
  """A diffusers UNet option this implementation does not support."""


# Options accepted only at the value that diffusers' SD/SDXL UNets use.
_FIXED = {
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "num_attention_heads": None,
    "dropout": 0.0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}
# Options with no effect on the network's function.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size",
            "addition_embed_type_num_heads"}


def _tup(x):
  return tuple(_tup(v) for v in x) if isinstance(x, (list, tuple)) else x


def _per_block(value, n: int, name: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise UnsupportedConfigError(f"{name} has {len(value)} entries but there are {n} down blocks")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyperparameters of a UNet2DConditionModel, named as in diffusers' config.json."""
  in_channels: int = 4
  out_channels: int = 4
  sample_size: int | None = None
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  only_cross_attention: Any = False
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: Any = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: Any = 1280
  transformer_layers_per_block: Any = 1
  reverse_transformer_layers_per_block: Any = None
  attention_head_dim: Any = 8
  use_linear_projection: bool = False
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  upcast_attention: bool = False
  time_embedding_dim: int | None = None
  time_embedding_act_fn: str | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  # ------------------------------------------------------------ validation
  def __post_init__(self):
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise UnsupportedConfigError(
          f"down_block_types ({len(self.down_block_types)}), up_block_types "
          f"({len(self.up_block_types)}) and block_out_channels ({n}) must have equal lengths")
    for t in self.down_block_types:
      if t not in DOWN_TYPES:
        raise UnsupportedConfigError(f"down block type {t!r} is not supported; supported: {DOWN_TYPES}")
    for t in self.up_block_types:
      if t not in UP_TYPES:
        raise UnsupportedConfigError(f"up block type {t!r} is not supported; supported: {UP_TYPES}")
    if any(_per_block(self.only_cross_attention, n, "only_cross_attention")):
      raise UnsupportedConfigError("only_cross_attention=True is not supported")
    if self.addition_embed_type not in (None, "text_time"):
      raise UnsupportedConfigError(
          f"addition_embed_type={self.addition_embed_type!r} is not supported; "
          "supported: None (SD 1.5/2.x) and 'text_time' (SDXL)")
    if self.addition_embed_type == "text_time" and not (
        self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
      raise UnsupportedConfigError("addition_embed_type='text_time' needs addition_time_embed_dim "
                                   "and projection_class_embeddings_input_dim")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise UnsupportedConfigError(f"block_out_channels {c} is not divisible by "
                                     f"norm_num_groups {self.norm_num_groups}")
    for c, h in zip(self.block_out_channels, self.heads):
      if c % h:
        raise UnsupportedConfigError(f"block_out_channels {c} is not divisible by {h} attention heads")
    if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
      raise UnsupportedConfigError("conv_in_kernel and conv_out_kernel must be odd")

  # ------------------------------------------------------- derived values
  @property
  def num_blocks(self) -> int:
    return len(self.block_out_channels)

  @property
  def heads(self) -> tuple:
    # diffusers reads `attention_head_dim` as the number of heads (a naming quirk it keeps
    # for compatibility): SD 1.5's 8 means 8 heads of 40/80/160 channels.
    return _per_block(self.attention_head_dim, self.num_blocks, "attention_head_dim")

  @property
  def layers(self) -> tuple:
    return _per_block(self.layers_per_block, self.num_blocks, "layers_per_block")

  @property
  def cross_dims(self) -> tuple:
    return _per_block(self.cross_attention_dim, self.num_blocks, "cross_attention_dim")

  @property
  def down_transformer_layers(self) -> tuple:
    return _per_block(self.transformer_layers_per_block, self.num_blocks,
                      "transformer_layers_per_block")

  @property
  def up_transformer_layers(self) -> tuple:
    """Per up block, per resnet: number of transformer layers."""
    if self.reverse_transformer_layers_per_block is not None:
      rev = self.reverse_transformer_layers_per_block
      return tuple(_per_block(r, lay + 1, "reverse_transformer_layers_per_block")
                   for r, lay in zip(rev, reversed(self.layers)))
    return tuple((t,) * (lay + 1) for t, lay in zip(reversed(self.down_transformer_layers),
                                                  reversed(self.layers)))

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or self.block_out_channels[0] * 4

  # ----------------------------------------------------------- (de)serialise
  @classmethod
  def from_diffusers(cls, config: dict, source: str = "config") -> "UNetConfig":
    """Validates a diffusers UNet config dict; `source` names it in errors."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in config.items():
      if key in fields:
        kwargs[key] = _tup(value)
      elif key in _FIXED:
        if _tup(value) != _tup(_FIXED[key]) and not (key == "dropout" and value == 0):
          raise UnsupportedConfigError(
              f"{source}: UNet option {key}={value!r} is not supported (only {_FIXED[key]!r}); "
              "d2g_jax implements the SD 1.5 / SD 2.x / SDXL UNet2DConditionModel")
      elif key not in _IGNORED:
        warnings.warn(f"{source}: unknown UNet option {key}={value!r} ignored", stacklevel=2)
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
      raise UnsupportedConfigError(
          f"{source}: _class_name is {config['_class_name']!r}; expected UNet2DConditionModel")
    try:
      return cls(**kwargs)
    except UnsupportedConfigError as e:
      raise UnsupportedConfigError(f"{source}: {e}") from None

  @classmethod
  def from_json(cls, path: str) -> "UNetConfig":
    from d2g_jax.files import load_json
    return cls.from_diffusers(load_json(path, "UNet config"), source=path)

  def to_diffusers(self) -> dict:
    """The config.json that diffusers' UNet2DConditionModel.from_pretrained reads."""
    out = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION}
    out.update(_FIXED)
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      out[f.name] = json.loads(json.dumps(v))  # tuples -> lists
    return out

  # ----------------------------------------------------------------- presets
  @classmethod
  def preset(cls, name: str) -> "UNetConfig":
    """A shipped real config: `sd15`, `sd21`, `sdxl_base`; or `tiny_sd15/tiny_sd2/tiny_sdxl`."""
    if name in TINY:
      return cls(**TINY[name])
    path = os.path.join(PRESETS_DIR, f"unet_{name}.json")
    if not os.path.isfile(path):
      names = sorted(list(TINY) + [f[5:-5] for f in os.listdir(PRESETS_DIR) if f.startswith("unet_")])
      raise ValueError(f"unknown UNet preset {name!r}; available: {names}")
    return cls.from_json(path)


_TINY_COMMON = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16)
TINY = {
    # SD 1.5 shape: conv projections, a single head count for all blocks.
    "tiny_sd15": dict(_TINY_COMMON, cross_attention_dim=24, attention_head_dim=2),
    # SD 2.x shape: linear projections, per-block heads, upcast attention.
    "tiny_sd2": dict(_TINY_COMMON, cross_attention_dim=24, attention_head_dim=(2, 4),
                     use_linear_projection=True, upcast_attention=True),
    # SDXL shape: text_time embedding, no attention in the first block, 2 transformer layers.
    "tiny_sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
                      cross_attention_dim=32, use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=16),
}
