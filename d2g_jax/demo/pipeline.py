"""Assembles trained components into a diffusers `StableDiffusionPipeline` folder.

    write_sd_pipeline(folder, unet=(module, params), vae=(module, params),
                      text_encoder=(module, params), tokenizer=tokenizer)

Written with the project's exporters (`save_unet`, `save_vae`, `save_clip_text`), the
tokenizer's `save_pretrained` and a `DDIMScheduler` config of SD's schedule (scaled
linear betas 0.00085..0.012, `steps_offset` 1, no clipping, epsilon prediction), so the
pipeline's own sampler is the DDIM that `d2g_jax.sampling` implements. The
`digits_teacher` stage writes it through `folders.build` (whole or absent).
"""

from __future__ import annotations

import os

from d2g_jax.convert.clip import save_clip_text
from d2g_jax.convert.unet import save_unet
from d2g_jax.convert.vae import save_vae
from d2g_jax.files import save_json
from d2g_jax.models.unet_config import DIFFUSERS_VERSION
from d2g_jax.sampling.schedule import ScheduleConfig


def scheduler_config(schedule: ScheduleConfig) -> dict:
  """The diffusers `DDIMScheduler` config.json of `schedule`."""
  return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
          "num_train_timesteps": schedule.num_train_timesteps,
          "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
          "beta_schedule": schedule.beta_schedule, "trained_betas": None,
          "clip_sample": schedule.clip_sample, "set_alpha_to_one": schedule.set_alpha_to_one,
          "steps_offset": schedule.steps_offset, "prediction_type": schedule.prediction_type,
          "thresholding": False, "timestep_spacing": schedule.timestep_spacing,
          "rescale_betas_zero_snr": schedule.rescale_betas_zero_snr}


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None], "image_encoder": [None, None],
    "requires_safety_checker": False, "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def write_sd_pipeline(folder: str, *, unet, vae, text_encoder, tokenizer,
                      schedule: ScheduleConfig | None = None):
  """Writes the pipeline's parts into `folder`; `unet`, `vae`, `text_encoder` are
  (module, params). model_index.json is written last."""
  schedule = schedule or ScheduleConfig.stable_diffusion()
  save_unet(*unet, os.path.join(folder, "unet"))
  save_vae(*vae, os.path.join(folder, "vae"))
  save_clip_text(*text_encoder, os.path.join(folder, "text_encoder"))
  tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
  save_json(scheduler_config(schedule), os.path.join(folder, "scheduler", "scheduler_config.json"))
  save_json(MODEL_INDEX, os.path.join(folder, "model_index.json"))
