"""diffusers pipeline folders: what one holds (SD 1.x / SD 2.x / SDXL), and export.

    info = inspect_pipeline("sd15")                       # family, components, checks
    export_pipeline("sd15", unet, params, "student", timestep=999)

`inspect_pipeline` reads `model_index.json` and the component configs only (no
weights), and raises before anything is loaded when the folder is incomplete, of an
unsupported family, or its parts do not fit together (text encoder width vs the
UNet's cross-attention width, SDXL's pooled projection vs its added embedding, VAE
latent channels vs UNet input channels).

`export_pipeline` writes a diffusers pipeline folder whose UNet is the student and
whose other components are the teacher's (copied), with a DDIM scheduler set so that
`pipe(prompt, num_inference_steps=1, guidance_scale=1.0)` is the one-step generator:
its single timestep is the generator's and its target alpha_bar is 1, so the step
returns the model's x0 estimate.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from d2g_jax.convert import core
from d2g_jax.convert.unet import save_unet
from d2g_jax.models.clip_text import CLIPTextConfig
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.models.vae import VAEConfig
from d2g_jax.sampling.schedule import ScheduleConfig

# model_index `_class_name` -> the components it must have (text pairs checked apart).
PIPELINES = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"),
}
FAMILIES = ("sd1", "sd2", "sdxl")
TEXT_PAIRS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


class PipelineError(ValueError):
  """A pipeline folder that is incomplete, unsupported or inconsistent."""


@dataclasses.dataclass(frozen=True)
class PipelineInfo:
  """What a pipeline folder holds, read from its configs."""
  path: str
  class_name: str
  family: str  # "sd1" | "sd2" | "sdxl"
  model_index: dict
  unet: UNetConfig
  vae: VAEConfig
  text_encoders: tuple[tuple[str, CLIPTextConfig], ...]  # (folder name, config), in order
  tokenizers: tuple[str, ...]  # folder names, paired with text_encoders
  force_zeros_for_empty_prompt: bool  # SDXL: the negative of an absent prompt is zeros

  def folder(self, component: str) -> str:
    return os.path.join(self.path, component)


def _components(model_index: dict) -> dict[str, tuple[str, str]]:
  """name -> (library, class) of the non-null components listed in model_index.json."""
  out = {}
  for k, v in model_index.items():
    if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == 2 and v[0] and v[1]:
      out[k] = (v[0], v[1])
  return out


def inspect_pipeline(path: str) -> PipelineInfo:
  """Reads and checks a diffusers SD 1.x / 2.x / SDXL pipeline folder (configs only)."""
  index_path = os.path.join(path, "model_index.json")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"pipeline folder {path!r} does not exist; expected a diffusers "
                            "pipeline folder (model_index.json, unet/, vae/, text_encoder/, ...)")
  model_index = core.load_json(index_path, "pipeline model_index")
  name = model_index.get("_class_name")
  if name not in PIPELINES:
    raise PipelineError(f"{index_path}: pipeline class {name!r} is not supported; supported: "
                        f"{sorted(PIPELINES)} (SD 1.x, SD 2.x, SDXL base)")
  comps = _components(model_index)
  missing = [c for c in PIPELINES[name] if c not in comps]
  if missing:
    raise PipelineError(f"{index_path}: {name} needs components {missing}, which are absent "
                        "or null")
  for c in comps:
    if c in ("safety_checker", "feature_extractor", "image_encoder"):
      continue  # never loaded here; export copies them if present
    if not os.path.isdir(os.path.join(path, c)):
      raise PipelineError(f"{index_path} lists component {c!r} but folder "
                          f"{os.path.join(path, c)!r} does not exist")

  unet = UNetConfig.from_json(os.path.join(path, "unet", "config.json"))
  vae = VAEConfig.from_diffusers(core.load_json(os.path.join(path, "vae", "config.json"),
                                                "VAE config"))
  encoders, tokenizers = [], []
  for enc, tok in TEXT_PAIRS:
    if (enc in comps) != (tok in comps):
      raise PipelineError(f"{index_path}: {enc!r} and {tok!r} must be both present or both null")
    if enc in comps:
      cfg = CLIPTextConfig.from_transformers(
          core.load_json(os.path.join(path, enc, "config.json"), f"{enc} config"))
      encoders.append((enc, cfg))
      tokenizers.append(tok)

  family = _family(name, encoders)
  zeros = family == "sdxl" and bool(model_index.get("force_zeros_for_empty_prompt", True))
  info = PipelineInfo(path=path, class_name=name, family=family, model_index=model_index,
                      unet=unet, vae=vae, text_encoders=tuple(encoders),
                      tokenizers=tuple(tokenizers), force_zeros_for_empty_prompt=zeros)
  _check_consistent(info)
  return info


def _family(class_name: str, encoders) -> str:
  if class_name == "StableDiffusionXLPipeline":
    return "sdxl"
  # SD 1.x uses OpenAI CLIP ViT-L/14 (quick GELU); SD 2.x OpenCLIP ViT-H/14 (GELU).
  return "sd1" if encoders[0][1].hidden_act == "quick_gelu" else "sd2"


def _check_consistent(info: PipelineInfo):
  u, where = info.unet, os.path.join(info.path, "unet", "config.json")
  widths = [c.hidden_size for _, c in info.text_encoders]
  names = [n for n, _ in info.text_encoders]
  cross = set(u.cross_dims)
  text_width = sum(widths) if info.family == "sdxl" else widths[0]
  if cross != {text_width}:
    raise PipelineError(
        f"{where}: cross_attention_dim {u.cross_attention_dim} does not match the text "
        f"encoder{'s' if len(widths) > 1 else ''} {names} (hidden_size {widths}"
        f"{', concatenated' if len(widths) > 1 else ''} = {text_width}): mismatched components")
  if info.vae.latent_channels != u.in_channels:
    raise PipelineError(f"{where}: in_channels {u.in_channels} but the VAE has "
                        f"{info.vae.latent_channels} latent channels: mismatched components")
  if info.family == "sdxl":
    te2 = info.text_encoders[-1][1]
    if not te2.with_projection:
      raise PipelineError(f"{info.path}/text_encoder_2 must be a CLIPTextModelWithProjection "
                          "(its projection is SDXL's pooled text embedding)")
    if u.addition_embed_type != "text_time":
      raise PipelineError(f"{where}: addition_embed_type {u.addition_embed_type!r}; an SDXL UNet "
                          "has 'text_time'")
    want = te2.projection_dim + 6 * u.addition_time_embed_dim
    if u.projection_class_embeddings_input_dim != want:
      raise PipelineError(
          f"{where}: projection_class_embeddings_input_dim "
          f"{u.projection_class_embeddings_input_dim} != text_encoder_2 projection_dim "
          f"{te2.projection_dim} + 6 x addition_time_embed_dim {u.addition_time_embed_dim} = "
          f"{want}: mismatched components")
  elif u.addition_embed_type is not None:
    raise PipelineError(f"{where}: addition_embed_type {u.addition_embed_type!r} in a "
                        f"{info.class_name}; expected none")


# ------------------------------------------------------------------- export
def one_step_scheduler_config(schedule: ScheduleConfig, timestep: int,
                              prediction_type: str) -> dict:
  """A DDIMScheduler config whose 1-step sampling evaluates the model once at `timestep`
  and returns its x0 estimate (target alpha_bar = 1)."""
  n = schedule.num_train_timesteps
  if not 0 <= timestep < n:
    raise ValueError(f"timestep {timestep} must be in [0, {n - 1}]")
  base = {"_class_name": "DDIMScheduler", "clip_sample": False, "set_alpha_to_one": True,
          "steps_offset": 1, "prediction_type": prediction_type, "thresholding": False,
          "timestep_spacing": "trailing"}  # trailing, 1 step: timesteps = [num_train_timesteps - 1]
  if timestep == n - 1:
    return {**base, "num_train_timesteps": n, "beta_start": schedule.beta_start,
            "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule,
            "trained_betas": None if schedule.trained_betas is None
            else [float(b) for b in schedule.trained_betas],
            "rescale_betas_zero_snr": schedule.rescale_betas_zero_snr}
  # Another timestep: the first timestep+1 betas (alpha_bar is their cumulative product,
  # so it is unchanged) make `timestep` the last training step.
  betas = [float(b) for b in np.asarray(schedule.betas[:timestep + 1], np.float32)]
  return {**base, "num_train_timesteps": timestep + 1, "trained_betas": betas,
          "beta_schedule": "linear", "rescale_betas_zero_snr": False}


def export_pipeline(teacher_path: str, unet_module, unet_params: Any, out_path: str, *,
                    timestep: int = 999, prediction_type: str = "epsilon", dtype=None,
                    overwrite: bool = False):
  """Writes a diffusers pipeline folder: the student UNet, the teacher's other parts.

  `prediction_type` says what the student UNet outputs ("epsilon", "sample" for a
  direct x0 parameterisation, "v_prediction"); `timestep` is the generator's. `dtype`
  (e.g. np.float16) casts the UNet weights. The folder is built beside `out_path`
  and renamed into place, so it is whole or absent; an existing `out_path` is only
  replaced with `overwrite=True`.
  """
  info = inspect_pipeline(teacher_path)
  if unet_module.config != info.unet:
    raise PipelineError("the student UNet's config differs from the teacher's "
                        f"({os.path.join(teacher_path, 'unet', 'config.json')}); the exported "
                        "pipeline would not fit its text encoders and VAE")
  if os.path.exists(out_path) and not overwrite:
    raise FileExistsError(f"{out_path!r} exists; pass overwrite=True to replace it")
  schedule = ScheduleConfig.from_folder(teacher_path)
  scheduler = one_step_scheduler_config(schedule, timestep, prediction_type)
  parent = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(out_path) + ".")
  try:
    comps = _components(info.model_index)
    for name in comps:
      if name not in ("unet", "scheduler") and os.path.isdir(info.folder(name)):
        shutil.copytree(info.folder(name), os.path.join(tmp, name))
    save_unet(unet_module, unet_params, os.path.join(tmp, "unet"), dtype=dtype)
    core.save_json(scheduler, os.path.join(tmp, "scheduler", "scheduler_config.json"))
    index = dict(info.model_index)
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    core.save_json(index, os.path.join(tmp, "model_index.json"))
    if os.path.exists(out_path):
      shutil.rmtree(out_path)
    os.replace(tmp, out_path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
