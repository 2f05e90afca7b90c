"""Whole trajectories: the pair stage's teacher sampling against diffusers' own pipelines.

Our `teacher_fns` (tokenisers, Flax text encoders, Flax UNet, DDIM + CFG in one scan) on
a tiny random pipeline folder against `StableDiffusionPipeline` /
`StableDiffusionXLPipeline` loaded from the same folder with a `DDIMScheduler` built
from its scheduler config, `output_type="latent"` and the same initial latents.
"""

import json
import os

import diffusers
import jax
import numpy as np
import pytest
import torch
from torch_utils import assert_close_to_scale, nchw, nhwc, randn

from d2g_jax.data.teacher_pairs import teacher_fns
from d2g_jax.teacher import load_teacher
from d2g_jax.tiny import build

PROMPTS = ["a photo of the cat", "the cat of the cat"]
GUIDANCE, STEPS = 3.0, 5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("trajectory")
  out = {}
  for family in ("sd1", "sd2", "sdxl"):
    folder = str(root / family)
    build(family, folder)
    out[family] = folder
  # SD 2.x 768-v predicts v. The tiny SDXL folder has EulerDiscreteScheduler's defaults,
  # which DDIM reads as linspace spacing, x0 clipped to [-1, 1] and set_alpha_to_one:
  # set SDXL base's real values instead (leading, no clipping, alpha_bar[0] last). With
  # clipping the output's scale is pinned at 1 while the random UNet's eps is ~20x
  # larger, so "1e-4 of the output scale" would be a much tighter test than elsewhere.
  patch_scheduler(out["sd2"], prediction_type="v_prediction")
  patch_scheduler(out["sdxl"], clip_sample=False, set_alpha_to_one=False,
                  timestep_spacing="leading")
  return out


def patch_scheduler(folder, **changes):
  path = os.path.join(folder, "scheduler", "scheduler_config.json")
  with open(path) as fh:
    cfg = json.load(fh)
  with open(path, "w") as fh:
    json.dump({**cfg, **changes}, fh)


def reference(folder, family, z_BxHxWxC, negative, height, width):
  """diffusers' pipeline from `folder` with DDIM: the final latents, NHWC."""
  cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
  config = diffusers.DDIMScheduler.load_config(folder, subfolder="scheduler")
  # Passed to from_pretrained (not assigned afterwards) so that the SD pipeline's __init__
  # applies its scheduler fixes (steps_offset=1, clip_sample=False), as load_teacher does.
  pipe = cls.from_pretrained(folder, scheduler=diffusers.DDIMScheduler.from_config(config))
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    out = pipe(prompt=PROMPTS, negative_prompt=[negative] * len(PROMPTS) if negative else None,
               latents=torch.from_numpy(nchw(z_BxHxWxC)), height=height, width=width,
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").images
  return pipe.scheduler, nhwc(out)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family,negative,size,seed", [
    ("sd1", "blurry", None, 0),      # epsilon, a negative prompt, 16x16 latents
    ("sd2", "", None, 1),            # v-prediction, the empty negative prompt
    ("sdxl", "", (24, 40), 2),       # force_zeros_for_empty_prompt, non-square time_ids
])
def test_trajectory_matches_diffusers_pipeline(folders, family, negative, size, seed):
  folder = folders[family]
  teacher = load_teacher(folder, components=("unet", "text"))
  height, width = size or teacher.default_size
  f = teacher.info.vae.downscale
  z = randn(seed, len(PROMPTS), height // f, width // f, 4)

  sched, ref = reference(folder, family, z, negative, height, width)
  assert type(sched).__name__ == "DDIMScheduler"
  assert sched.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
  assert teacher.schedule.prediction_type == sched.config.prediction_type
  assert teacher.schedule.clip_sample == sched.config.clip_sample

  encode_fn, generate_fn, params = teacher_fns(
      teacher, guidance_scale=GUIDANCE, num_steps=STEPS, height=height, width=width,
      negative_prompt=negative)
  out = jax.jit(generate_fn)(params, z, encode_fn(PROMPTS))
  assert out["x"].shape == z.shape and out["x"].dtype == np.float32
  assert not np.allclose(ref, z, atol=0.1)  # the trajectory moved
  assert_close_to_scale(out["x"], ref, 1e-4)
