"""Parity of d2g_jax.sampling with diffusers' DDIMScheduler and SD / SDXL pipelines.

The whole-trajectory tests run diffusers' own `StableDiffusionPipeline` and
`StableDiffusionXLPipeline` (output_type="latent"), first with a small
deterministic torch "UNet" whose JAX mirror is passed to `sample` (many schedule
and guidance options, fast), then with a real tiny `UNet2DConditionModel` and our
Flax copy of it (`load_unet`).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
  DDIMScheduler,
  PNDMScheduler,
  StableDiffusionPipeline,
  StableDiffusionXLPipeline,
  UNet2DConditionModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from d2g_jax import sampling
from d2g_jax.convert.unet import load_unet
from d2g_jax.models.unet_config import UNetConfig
from d2g_jax.sampling import ScheduleConfig

SD15_JSON = {  # stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False}
SDXL_JSON = {  # stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False}
SD21_JSON = {  # stable-diffusion-2-1 (768, v-prediction) scheduler/scheduler_config.json
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
SCALED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
FIELDS = [f.name for f in dataclasses.fields(ScheduleConfig) if f.name != "source"]


def assert_close(actual, expected, tol=1e-4, what=""):
  """fp32 parity: relative 1e-4 and absolute 1e-4 of the reference's scale."""
  expected = np.asarray(expected, np.float64)
  scale = max(float(np.abs(expected).max()), 1e-6)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol,
                             atol=tol * scale, err_msg=what)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor):
  return x.detach().numpy().transpose(0, 2, 3, 1)


# ------------------------------------------------------------ configs
@pytest.mark.parametrize("config", [SD15_JSON, SDXL_JSON, SD21_JSON, {},
                                    {**LINEAR, "timestep_spacing": "trailing",
                                     "rescale_betas_zero_snr": True},
                                    {"_class_name": "PNDMScheduler", **SCALED}],
                         ids=["sd15", "sdxl", "sd21", "empty", "zero_snr", "no_clip_key"])
def test_from_diffusers_matches_ddim_from_config(config):
  ours = ScheduleConfig.from_diffusers(config)
  ref = DDIMScheduler.from_config(config)
  for name in FIELDS:
    assert getattr(ours, name) == ref.config[name], name
  # A loaded scheduler's .config (with `_use_default_values`) gives the same DDIM.
  loaded = dict(PNDMScheduler.from_config(config).config)
  assert ScheduleConfig.from_diffusers(loaded) == ours
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9)
  assert ours.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod), rel=1e-6)


@pytest.mark.parametrize("beta", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_betas_and_alphas_cumprod(beta, zero_snr):
  kw = {**(SCALED if beta == "scaled_linear" else {}), "beta_schedule": beta,
        "rescale_betas_zero_snr": zero_snr, "num_train_timesteps": 1000}
  ours, ref = ScheduleConfig(**kw), DDIMScheduler(**kw)
  assert ours.betas.dtype == np.float32 and ours.alphas_cumprod.dtype == np.float32
  # Zero-SNR betas are 1 - ratio of fp32 numbers near 1: both sides round at ~1e-7.
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-4 if zero_snr else 1e-5,
                             atol=1e-6 if zero_snr else 1e-9)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5,
                             atol=1e-9)


def test_trained_betas():
  betas = np.linspace(1e-4, 0.03, 50).tolist()
  ours = ScheduleConfig.from_diffusers({"trained_betas": betas, "num_train_timesteps": 50})
  ref = DDIMScheduler(trained_betas=betas, num_train_timesteps=50)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_set_timesteps(spacing, offset):
  for n_train, steps in [(1000, 1), (1000, 3), (1000, 7), (1000, 50), (1000, 999),
                         (1000, 1000), (100, 30)]:
    ref = DDIMScheduler(num_train_timesteps=n_train, timestep_spacing=spacing,
                        steps_offset=offset)
    ref.set_timesteps(steps)
    ours = ScheduleConfig(num_train_timesteps=n_train, timestep_spacing=spacing,
                          steps_offset=offset)
    np.testing.assert_array_equal(ours.timesteps(steps), ref.timesteps.numpy(),
                                  err_msg=f"{spacing} {n_train} {steps}")


def test_sd15_50_step_timesteps():
  ts = ScheduleConfig.from_diffusers(SD15_JSON).timesteps(50)
  np.testing.assert_array_equal(ts, np.arange(981, 0, -20))


def test_from_folder(tmp_path):
  (tmp_path / "scheduler").mkdir()
  path = tmp_path / "scheduler" / "scheduler_config.json"
  path.write_text(json.dumps(SD21_JSON))
  for where in [tmp_path, tmp_path / "scheduler", path]:
    cfg = ScheduleConfig.from_folder(str(where))
    assert cfg == ScheduleConfig.from_diffusers(SD21_JSON) and cfg.source == str(path)
  assert ScheduleConfig.stable_diffusion("v_prediction") == cfg
  with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
    ScheduleConfig.from_folder(str(tmp_path / "missing"))
  path.write_text(json.dumps({**SD15_JSON, "thresholding": True}))
  with pytest.raises(ValueError, match=r"thresholding=True in .*scheduler_config.json"):
    ScheduleConfig.from_folder(str(tmp_path))


@pytest.mark.parametrize("bad", [{"timestep_spacing": "karras"}, {"prediction_type": "flow"},
                                 {"beta_schedule": "sigmoid"}, {"thresholding": True}])
def test_unsupported_options_raise(bad):
  (name, value), = bad.items()
  with pytest.raises(ValueError, match=f"{name}={value!r}"):
    ScheduleConfig.from_diffusers({**SD15_JSON, **bad})


def test_num_steps_out_of_range():
  with pytest.raises(ValueError, match="num_steps=1001"):
    ScheduleConfig().timesteps(1001)


# ------------------------------------------------------------ one step
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("betas", ["linear", "scaled_linear"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_step_matches_ddim_scheduler(spacing, prediction, betas, offset, set_alpha_to_one):
  kw = dict(**(LINEAR if betas == "linear" else SCALED), timestep_spacing=spacing,
            prediction_type=prediction, steps_offset=offset, set_alpha_to_one=set_alpha_to_one,
            clip_sample=False)
  ours, ref = ScheduleConfig(**kw), DDIMScheduler(**kw)
  num_steps = 10
  ref.set_timesteps(num_steps)
  rng = np.random.default_rng(0)
  for t in ref.timesteps.tolist():
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    out = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    prev, x0 = sampling.step(ours, out, t, x, num_steps)
    ref_prev, ref_x0 = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), return_dict=False)
    assert_close(prev, ref_prev.numpy(), what=f"prev_sample t={t}")
    assert_close(x0, ref_x0.numpy(), what=f"pred_original_sample t={t}")


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_step_with_eta_and_clip(eta, clip):
  kw = dict(**SCALED, prediction_type="v_prediction", timestep_spacing="trailing",
            clip_sample=clip, clip_sample_range=0.8)
  ours, ref = ScheduleConfig(**kw), DDIMScheduler(**kw)
  ref.set_timesteps(8)
  key = jax.random.key(3)
  rng = np.random.default_rng(1)
  for i, t in enumerate(ref.timesteps.tolist()):
    x = 2 * rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    out = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    noise = np.array(sampling.variance_noise(key, i, x.shape))
    prev, x0 = sampling.step(ours, out, t, x, 8, eta=eta, noise=noise)
    ref_prev, ref_x0 = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta,
                                variance_noise=torch.from_numpy(noise), return_dict=False)
    assert_close(prev, ref_prev.numpy(), what=f"prev_sample t={t}")
    assert_close(x0, ref_x0.numpy(), what=f"pred_original_sample t={t}")


def test_conversions_match_diffusers():
  ref = DDIMScheduler(**SCALED)
  cfg = ScheduleConfig(**SCALED)
  rng = np.random.default_rng(2)
  x0, eps = (rng.standard_normal((3, 4, 4, 2)).astype(np.float32) for _ in range(2))
  t = np.array([999, 500, 1])
  a = sampling.alpha_bar(cfg, t)
  tt = torch.from_numpy(t)
  x_t = sampling.add_noise(x0, eps, a)
  assert_close(x_t, nhwc(ref.add_noise(nchw(x0), nchw(eps), tt)))
  v = sampling.velocity(x0, eps, a)
  assert_close(v, nhwc(ref.get_velocity(nchw(x0), nchw(eps), tt)))
  assert_close(sampling.x0_from_eps(x_t, eps, a), x0, tol=1e-3)  # t=999 amplifies ~15x
  assert_close(sampling.eps_from_x0(x_t, x0, a), eps, tol=1e-3)
  assert_close(sampling.x0_from_v(x_t, v, a), x0)
  assert_close(sampling.eps_from_v(x_t, v, a), eps)
  for kind in ["epsilon", "v_prediction", "sample"]:
    pred = sampling.from_x0_eps(x0, eps, a, kind)
    got_x0, got_eps = sampling.to_x0_eps(pred, x_t, a, kind)
    assert_close(got_x0, x0, tol=1e-3, what=kind)
    assert_close(got_eps, eps, tol=1e-3, what=kind)


# ------------------------------------------------------------ trajectories
C, D, E, L = 4, 6, 5, 3  # latent channels, text width, pooled width, text length
_rng = np.random.default_rng(42)
W_CxC = (0.4 * np.eye(C) + 0.2 * _rng.standard_normal((C, C))).astype(np.float32)
P_DxC = (0.3 * _rng.standard_normal((D, C))).astype(np.float32)
Q_ExC = (0.3 * _rng.standard_normal((E, C))).astype(np.float32)
PHASE_C = _rng.uniform(0, 3, C).astype(np.float32)


def jax_model(x_BxHxWxC, t_B, cond):
  """Stand-in UNet: channel mix + tanh + f(t) + text (and SDXL added) conditioning."""
  t = t_B.astype(jnp.float32)[:, None, None, None]
  out = x_BxHxWxC @ W_CxC + 0.1 * jnp.tanh(x_BxHxWxC) + 0.2 * jnp.sin(t / 150 + PHASE_C)
  out = out + (cond["encoder_hidden_states"].mean(1) @ P_DxC)[:, None, None, :]
  added = cond.get("added_cond_kwargs")
  if added is not None:
    extra = added["text_embeds"] @ Q_ExC + 1e-4 * added["time_ids"].sum(-1, keepdims=True)
    out = out + extra[:, None, None, :]
  return out


class TorchModel(ModelMixin, ConfigMixin):
  """The same function as `jax_model`, NCHW, with the attributes diffusers pipelines read."""

  @register_to_config
  def __init__(self, in_channels=C, sample_size=8, time_cond_proj_dim=None,
               addition_time_embed_dim=None, add_embed_in=0):
    super().__init__()
    self.unused = torch.nn.Parameter(torch.zeros(()))  # pipelines read .dtype / .device
    if addition_time_embed_dim is not None:
      self.add_embedding = torch.nn.Module()
      self.add_embedding.linear_1 = torch.nn.Linear(add_embed_in, 1)
    self.calls = []

  def forward(self, x, t, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
              added_cond_kwargs=None, return_dict=True):
    self.calls.append((x.shape[0], int(t)))
    tf = torch.as_tensor(t, dtype=torch.float32)
    out = (torch.einsum("bchw,cd->bdhw", x, torch.from_numpy(W_CxC)) + 0.1 * torch.tanh(x)
           + 0.2 * torch.sin(tf / 150 + torch.from_numpy(PHASE_C))[None, :, None, None])
    out = out + (encoder_hidden_states.mean(1) @ torch.from_numpy(P_DxC))[:, :, None, None]
    if added_cond_kwargs is not None:
      extra = (added_cond_kwargs["text_embeds"] @ torch.from_numpy(Q_ExC)
               + 1e-4 * added_cond_kwargs["time_ids"].sum(-1, keepdim=True))
      out = out + extra[:, :, None, None]
    return (out,)


def make_inputs(batch=2, hw=8, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return f(batch, hw, hw, C), f(batch, L, D), f(batch, L, D), f(batch, E), f(batch, E)


SD_CASES = [  # (scheduler config, guidance, guidance_rescale, steps)
    ({**SD15_JSON}, 7.5, 0.0, 50),
    ({**SD15_JSON, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
     3.0, 0.7, 12),
    ({**SD15_JSON, "timestep_spacing": "linspace"}, 1.0, 0.0, 10),
    ({**LINEAR, "prediction_type": "sample", "steps_offset": 0, "set_alpha_to_one": True},
     8.0, 0.0, 7),
    ({**SD21_JSON, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 5.0, 0.3, 10),
]


@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")
@pytest.mark.parametrize("config,guidance,rescale,steps", SD_CASES,
                         ids=["sd15_cfg7.5", "trailing_v_rescale", "linspace_nocfg",
                              "linear_sample_offset0", "zero_snr_v"])
def test_trajectory_matches_stable_diffusion_pipeline(config, guidance, rescale, steps):
  z, text, neg, _, _ = make_inputs()
  unet = TorchModel()
  pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                 scheduler=DDIMScheduler.from_config(config), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  ref = pipe(prompt_embeds=torch.from_numpy(text), negative_prompt_embeds=torch.from_numpy(neg),
             latents=nchw(z), height=64, width=64, num_inference_steps=steps,
             guidance_scale=guidance, guidance_rescale=rescale, output_type="latent").images

  # The SD pipeline forces steps_offset=1 and clip_sample=False on its scheduler.
  schedule = ScheduleConfig.from_diffusers(config).with_sd_pipeline_fixes()
  run = jax.jit(lambda z, c, u: sampling.sample(jax_model, schedule, z, c, u, guidance, steps,
                                                guidance_rescale=rescale))
  uncond = {"encoder_hidden_states": neg} if guidance > 1 else None
  ours = run(z, {"encoder_hidden_states": text}, uncond)
  np.testing.assert_array_equal([t for _, t in unet.calls], schedule.timesteps(steps))
  assert {b for b, _ in unet.calls} == {2 * len(z) if guidance > 1 else len(z)}
  assert_close(ours, nhwc(ref), what="final latents")


def test_trajectory_matches_sdxl_pipeline():
  z, text, neg, pooled, neg_pooled = make_inputs(batch=3, hw=6, seed=1)
  add_dim = 2
  unet = TorchModel(sample_size=6, addition_time_embed_dim=add_dim, add_embed_in=6 * add_dim + E)
  pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None,
                                   tokenizer=None, tokenizer_2=None, unet=unet,
                                   scheduler=DDIMScheduler.from_config(SDXL_JSON),
                                   add_watermarker=False)
  pipe.set_progress_bar_config(disable=True)
  ref = pipe(prompt_embeds=torch.from_numpy(text), negative_prompt_embeds=torch.from_numpy(neg),
             pooled_prompt_embeds=torch.from_numpy(pooled),
             negative_pooled_prompt_embeds=torch.from_numpy(neg_pooled), latents=nchw(z),
             height=48, width=48, num_inference_steps=9, guidance_scale=5.0,
             guidance_rescale=0.5, output_type="latent").images

  time_ids = np.tile(np.array([[48, 48, 0, 0, 48, 48]], np.float32), (3, 1))
  cond = {"encoder_hidden_states": text,
          "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
  uncond = {"encoder_hidden_states": neg,
            "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": time_ids}}
  schedule = ScheduleConfig.from_diffusers(SDXL_JSON)
  ours = jax.jit(lambda z, c, u: sampling.sample(jax_model, schedule, z, c, u, 5.0, 9,
                                                 guidance_rescale=0.5))(z, cond, uncond)
  assert_close(ours, nhwc(ref), what="final latents")


def reference_loop(config, z, text, neg, guidance, steps, eta, key, rescale):
  """The SD pipeline's loop written out with DDIMScheduler, variance noise from `key`."""
  sched = DDIMScheduler.from_config(config)
  sched.set_timesteps(steps)
  model = TorchModel()
  latents = nchw(z) * sched.init_noise_sigma
  emb = torch.from_numpy(np.concatenate([neg, text]))
  for i, t in enumerate(sched.timesteps):
    pred = model(torch.cat([latents] * 2), t, emb)[0]
    uncond, cond = pred.chunk(2)
    pred = uncond + guidance * (cond - uncond)
    if rescale > 0:
      pred = rescale_noise_cfg(pred, cond, guidance_rescale=rescale)
    noise = nchw(sampling.variance_noise(key, i, z.shape))
    latents = sched.step(pred, t, latents, eta=eta, variance_noise=noise, return_dict=False)[0]
  return nhwc(latents)


@pytest.mark.parametrize("eta,clip", [(0.5, False), (1.0, True)])
def test_trajectory_with_eta_and_clip_matches_reference_loop(eta, clip):
  config = {**LINEAR, "steps_offset": 0, "clip_sample": clip, "set_alpha_to_one": True,
            "timestep_spacing": "linspace", "prediction_type": "v_prediction"}
  z, text, neg, _, _ = make_inputs(seed=3)
  key = jax.random.key(7)
  ref = reference_loop(config, z, text, neg, 4.0, 15, eta, key, rescale=0.2)
  schedule = ScheduleConfig.from_diffusers(config)
  ours = jax.jit(lambda z, c, u, k: sampling.sample(
      jax_model, schedule, z, c, u, 4.0, 15, eta=eta, key=k, guidance_rescale=0.2))(
          z, {"encoder_hidden_states": text}, {"encoder_hidden_states": neg}, key)
  assert_close(ours, ref, what="final latents")


# ------------------------------------------------------------ with the real (tiny) UNet
def tiny_unet(preset, folder):
  """A random-weight diffusers UNet of a tiny preset, and our Flax copy of it."""
  torch.manual_seed(0)
  model = UNet2DConditionModel.from_config(UNetConfig.preset(preset).to_diffusers()).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder)
  module, params = load_unet(folder)
  return model, module, params


def unet_model_fn(module, params):
  return lambda x, t_B, c: module.apply({"params": params}, x, t_B, c["encoder_hidden_states"],
                                        added_cond_kwargs=c.get("added_cond_kwargs"))


def test_sd_pipeline_with_real_unet(tmp_path):
  model, module, params = tiny_unet("tiny_sd15", str(tmp_path))
  config, guidance, steps = SD15_JSON, 7.5, 6
  rng = np.random.default_rng(5)
  z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  text, neg = (rng.standard_normal((2, 7, 24)).astype(np.float32) for _ in range(2))
  pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=model,
                                 scheduler=DDIMScheduler.from_config(config), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    ref = pipe(prompt_embeds=torch.from_numpy(text), negative_prompt_embeds=torch.from_numpy(neg),
               latents=nchw(z), height=64, width=64, num_inference_steps=steps,
               guidance_scale=guidance, output_type="latent").images
  schedule = ScheduleConfig.from_diffusers(config)
  run = sampling.make_sampler(lambda p, x, t, c: unet_model_fn(module, p)(x, t, c), schedule,
                              steps, guidance)
  ours = run(params, z, {"encoder_hidden_states": text}, {"encoder_hidden_states": neg})
  assert_close(ours, nhwc(ref), what="final latents")


def test_sdxl_pipeline_with_real_unet(tmp_path):
  model, module, params = tiny_unet("tiny_sdxl", str(tmp_path))
  rng = np.random.default_rng(6)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  z, text, neg, pooled, neg_pooled = f(2, 8, 8, 4), f(2, 5, 32), f(2, 5, 32), f(2, 32), f(2, 32)
  pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None,
                                   tokenizer=None, tokenizer_2=None, unet=model,
                                   scheduler=DDIMScheduler.from_config(SDXL_JSON),
                                   add_watermarker=False)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    ref = pipe(prompt_embeds=torch.from_numpy(text), negative_prompt_embeds=torch.from_numpy(neg),
               pooled_prompt_embeds=torch.from_numpy(pooled),
               negative_pooled_prompt_embeds=torch.from_numpy(neg_pooled), latents=nchw(z),
               height=64, width=64, num_inference_steps=5, guidance_scale=6.0,
               output_type="latent").images
  time_ids = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1))
  cond = {"encoder_hidden_states": text,
          "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
  uncond = {"encoder_hidden_states": neg,
            "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": time_ids}}
  schedule = ScheduleConfig.from_diffusers(SDXL_JSON)
  run = sampling.make_sampler(lambda p, x, t, c: unet_model_fn(module, p)(x, t, c), schedule,
                              5, 6.0)
  assert_close(run(params, z, cond, uncond), nhwc(ref), what="final latents")


# ------------------------------------------------------------ loop mechanics
def test_make_sampler_traces_model_once_and_keeps_dtype():
  traces = []

  def apply_fn(params, x, t_B, cond):
    traces.append((x.shape, t_B.shape, t_B.dtype))
    return jax_model(x, t_B, cond) * params["scale"]

  schedule = ScheduleConfig.stable_diffusion()
  run = sampling.make_sampler(apply_fn, schedule, num_steps=50, guidance_scale=3.0)
  z, text, neg, _, _ = make_inputs()
  params = {"scale": jnp.float32(1.0)}
  a = run(params, z, {"encoder_hidden_states": text}, {"encoder_hidden_states": neg})
  b = run(params, z + 1, {"encoder_hidden_states": text}, {"encoder_hidden_states": neg})
  assert traces == [((4, 8, 8, C), (4,), jnp.int32)]  # one trace, 2B batch, int timesteps
  one_neg = run(params, z, {"encoder_hidden_states": text}, {"encoder_hidden_states": neg[:1]})
  tiled = run(params, z, {"encoder_hidden_states": text},
              {"encoder_hidden_states": np.repeat(neg[:1], len(z), 0)})
  np.testing.assert_array_equal(one_neg, tiled)  # a batch-1 uncond is broadcast
  assert a.shape == z.shape and a.dtype == jnp.float32 and not np.allclose(a, b)
  out = jax.jit(lambda z: sampling.sample(jax_model, schedule, z, {"encoder_hidden_states": text},
                                          None, 1.0, 4))(z.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_sharded_batch_needs_no_communication():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  z, text, neg, _, _ = make_inputs(batch=len(jax.devices()))
  schedule = ScheduleConfig.stable_diffusion()
  fn = lambda z, c, u: sampling.sample(jax_model, schedule, z, c, u, 7.5, 10)
  sharded = jax.jit(fn, in_shardings=batch, out_shardings=batch)
  args = (z, {"encoder_hidden_states": text}, {"encoder_hidden_states": neg})
  assert_close(sharded(*args), jax.jit(fn)(*args))
  hlo = sharded.lower(*args).compile().as_text()
  for op in ("all-to-all", "collective-permute", "all-gather", "all-reduce"):
    assert op not in hlo, f"{op} in the sharded sampling loop: the CFG batch layout moved data"


def test_sample_errors_are_actionable():
  schedule = ScheduleConfig.stable_diffusion()
  z, text, _, _, _ = make_inputs()
  with pytest.raises(ValueError, match="needs `uncond`"):
    sampling.sample(jax_model, schedule, z, {"encoder_hidden_states": text}, None, 7.5, 5)
  with pytest.raises(ValueError, match="needs a PRNG `key`"):
    sampling.sample(jax_model, schedule, z, {"encoder_hidden_states": text}, None, 1.0, 5,
                    eta=0.5)
  with pytest.raises(ValueError, match="same structure"):
    sampling.sample(jax_model, schedule, z, {"encoder_hidden_states": text},
                    {"encoder_hidden_states": text, "extra": text}, 7.5, 5)
