"""Teacher: prompt encoding vs diffusers' pipelines, loading, one-step pipeline export, errors.

Tiny SD 1.x / SD 2.x / SDXL pipelines (random weights, a 70-token BPE vocabulary) are
assembled with diffusers and saved once per module.
"""

import json
import os
import shutil
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_utils import assert_close_to_scale, nchw, nhwc, randn

from d2g_jax import teacher as teacher_lib
from d2g_jax.convert import pipeline as pipeline_lib
from d2g_jax.convert.unet import load_unet
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.models.vae import VAEConfig
from d2g_jax.tiny import build

PROMPTS = ["a photo of the cat", "the cat of the cat of the cat of the cat of a cat", ""]
NEGATIVES = ["blurry", "the ugly cat", "a"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipes")
  out = {}
  for name, family, zeros in [("sd1", "sd1", True), ("sd2", "sd2", True),
                              ("sdxl", "sdxl", True), ("sdxl_nozeros", "sdxl", False)]:
    folder = str(root / name)
    out[name] = (folder, build(family, folder, zeros))
  return out


def close(ours, ref):
  np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_sd_encode_prompt_matches_diffusers(pipes, name):
  folder, pipe = pipes[name]
  teacher = teacher_lib.load_teacher(folder, components=("text",))
  assert teacher.family == name and teacher.unet is None and teacher.vae is None
  # diffusers 0.42's clip_skip path calls `text_encoder.text_model.final_layer_norm`, which
  # transformers 5's CLIPTextModel no longer has (its modules moved up a level): alias it.
  te = pipe.text_encoder
  object.__setattr__(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm))
  for negatives, clip_skip in [(None, None), (NEGATIVES, 1)]:
    ref, ref_neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=negatives,
                                      clip_skip=clip_skip)
    cond, uncond = teacher.encode_prompt(PROMPTS, negatives, clip_skip=clip_skip)
    assert set(cond) == {"encoder_hidden_states"}
    close(cond["encoder_hidden_states"], ref)
    close(uncond["encoder_hidden_states"], ref_neg)


@pytest.mark.parametrize("name", ["sdxl", "sdxl_nozeros"])
def test_sdxl_encode_prompt_matches_diffusers(pipes, name):
  folder, pipe = pipes[name]
  teacher = teacher_lib.load_teacher(folder, components=("text",))
  assert teacher.family == "sdxl"
  for negatives, clip_skip in [(None, None), (NEGATIVES, 1)]:
    ref = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                             do_classifier_free_guidance=True, negative_prompt=negatives,
                             clip_skip=clip_skip)
    cond, uncond = teacher.encode_prompt(PROMPTS, negatives, clip_skip=clip_skip)
    close(cond["encoder_hidden_states"], ref[0])
    close(uncond["encoder_hidden_states"], ref[1])
    close(cond["added_cond_kwargs"]["text_embeds"], ref[2])
    close(uncond["added_cond_kwargs"]["text_embeds"], ref[3])
  if name == "sdxl":  # force_zeros_for_empty_prompt: the absent negative is zeros
    _, uncond = teacher.encode_prompt(PROMPTS)
    assert not np.any(np.asarray(uncond["encoder_hidden_states"]))
  sizes = dict(original_size=(40, 24), crops_coords_top_left=(4, 2), target_size=(32, 48))
  ref_ids = pipe._get_add_time_ids(sizes["original_size"], sizes["crops_coords_top_left"],
                                   sizes["target_size"], torch.float32, 32)
  cond, uncond = teacher.encode_prompt(PROMPTS[:2], **sizes)
  np.testing.assert_array_equal(cond["added_cond_kwargs"]["time_ids"],
                                np.tile(ref_ids.numpy(), (2, 1)))
  np.testing.assert_array_equal(uncond["added_cond_kwargs"]["time_ids"],
                                cond["added_cond_kwargs"]["time_ids"])
  default = teacher.encode_prompt(PROMPTS[:1])[0]["added_cond_kwargs"]["time_ids"]
  np.testing.assert_array_equal(default, [[32, 32, 0, 0, 32, 32]])  # unet 16 x vae 2


def test_load_all_components(pipes):
  folder, pipe = pipes["sd1"]
  teacher = teacher_lib.load_teacher(folder)
  unet_config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
  assert teacher.unet.config == UNetConfig.from_diffusers(unet_config)
  assert teacher.vae.config == VAEConfig.tiny()
  assert teacher.schedule.steps_offset == 1 and not teacher.schedule.clip_sample
  assert teacher.default_size == (32, 32)
  z = randn(0, 1, 4, 4, 4)
  with torch.no_grad():
    ref = pipe.vae.decode(torch.from_numpy(nchw(z))).sample
  ours = teacher.vae.apply({"params": teacher.vae_params}, jnp.asarray(z),
                           method=type(teacher.vae).decode)
  assert_close_to_scale(ours, nhwc(ref), 1e-4)


@pytest.mark.parametrize("name,timestep,prediction_type", [
    ("sd1", 999, "epsilon"), ("sdxl", 749, "sample"), ("sd2", 999, "v_prediction")])
def test_export_one_step_pipeline(pipes, tmp_path, name, timestep, prediction_type):
  """diffusers runs the exported pipeline for one step; its latent equals our generator's."""
  folder, _ = pipes[name]
  teacher = teacher_lib.load_teacher(folder, components=("text",))
  unet, params = load_unet(os.path.join(folder, "unet"))
  params = jax.tree_util.tree_map(lambda p: p * 1.01, params)  # "the student"
  out = str(tmp_path / "student")
  pipeline_lib.export_pipeline(folder, unet, params, out, timestep=timestep,
                               prediction_type=prediction_type)
  cls = diffusers.StableDiffusionXLPipeline if name == "sdxl" else diffusers.StableDiffusionPipeline
  pipe = cls.from_pretrained(out)
  assert type(pipe.scheduler).__name__ == "DDIMScheduler"
  pipe.set_progress_bar_config(disable=True)
  z = randn(5, 2, 16, 16, 4)
  prompts = PROMPTS[:2]
  with torch.no_grad():
    ref = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, height=32, width=32,
               latents=torch.from_numpy(nchw(z)), output_type="latent").images

  cond, _ = teacher.encode_prompt(prompts)
  pred = unet.apply({"params": params}, jnp.asarray(z), jnp.full((2,), timestep), **cond)
  ab = float(teacher.schedule.alphas_cumprod[timestep])
  if prediction_type == "epsilon":
    x0 = (z - np.sqrt(1 - ab) * pred) / np.sqrt(ab)
  elif prediction_type == "sample":
    x0 = pred
  else:
    x0 = np.sqrt(ab) * z - np.sqrt(1 - ab) * pred
  assert_close_to_scale(x0, nhwc(ref), 1e-4)
  # The copied components are the teacher's, byte for byte.
  with open(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"), "rb") as a, \
      open(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"), "rb") as b:
    assert a.read() == b.read()
  with pytest.raises(FileExistsError, match="overwrite"):
    pipeline_lib.export_pipeline(folder, unet, params, out)


def _copy(pipes, name, tmp_path):
  dst = str(tmp_path / name)
  shutil.copytree(pipes[name][0], dst)
  return dst


def _edit(path, **changes):
  with open(path) as fh:
    d = json.load(fh)
  d.update(changes)
  with open(path, "w") as fh:
    json.dump(d, fh)


def test_errors(pipes, tmp_path):
  with pytest.raises(FileNotFoundError, match="pipeline folder"):
    teacher_lib.load_teacher(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    teacher_lib.load_teacher(str(tmp_path))
  sd = _copy(pipes, "sd1", tmp_path)
  _edit(os.path.join(sd, "model_index.json"), _class_name="FluxPipeline")
  with pytest.raises(pipeline_lib.PipelineError, match="FluxPipeline.*not supported"):
    teacher_lib.load_teacher(sd)
  _edit(os.path.join(sd, "model_index.json"), _class_name="StableDiffusionPipeline")
  shutil.rmtree(os.path.join(sd, "vae"))
  with pytest.raises(pipeline_lib.PipelineError, match="vae"):
    teacher_lib.load_teacher(sd)
  # An SD 1.x UNet with an SDXL-width text encoder: mismatched components.
  sd = _copy(pipes, "sd2", tmp_path)
  shutil.rmtree(os.path.join(sd, "text_encoder"))
  shutil.copytree(os.path.join(pipes["sdxl"][0], "text_encoder"), os.path.join(sd, "text_encoder"))
  with pytest.raises(pipeline_lib.PipelineError,
                     match="cross_attention_dim 24.*hidden_size \\[16\\]"):
    teacher_lib.load_teacher(sd)
  xl = _copy(pipes, "sdxl", tmp_path)
  _edit(os.path.join(xl, "text_encoder_2", "config.json"), projection_dim=40)
  with pytest.raises(pipeline_lib.PipelineError, match="projection_dim 40"):
    teacher_lib.load_teacher(xl)
  _edit(os.path.join(xl, "text_encoder_2", "config.json"), projection_dim=32)
  _edit(os.path.join(xl, "model_index.json"), text_encoder_2=[None, None])
  with pytest.raises(pipeline_lib.PipelineError, match="text_encoder_2"):
    teacher_lib.load_teacher(xl)
  _edit(os.path.join(xl, "model_index.json"), text_encoder_2=["transformers",
                                                              "CLIPTextModelWithProjection"],
        tokenizer=[None, None])
  with pytest.raises(pipeline_lib.PipelineError, match="both present or both null"):
    teacher_lib.load_teacher(xl)
  teacher = teacher_lib.load_teacher(pipes["sd1"][0], components=("vae",))
  with pytest.raises(ValueError, match="without its text encoders"):
    teacher.encode_prompt(["a cat"])
  with pytest.raises(ValueError, match="negative prompts"):
    teacher_lib.load_teacher(pipes["sd1"][0], components=("text",)).encode_prompt(
        ["a", "b"], ["c"])
  with pytest.raises(ValueError, match="unknown components"):
    teacher_lib.load_teacher(pipes["sd1"][0], components=("unet", "safety"))
