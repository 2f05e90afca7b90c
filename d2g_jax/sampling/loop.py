"""DDIM sampling with classifier-free guidance: the whole trajectory is one `lax.scan`.

Legend: B batch, H/W height/width, C latent channels.

`model_fn(latents_BxHxWxC, t_B, cond) -> prediction_BxHxWxC` is any traceable
function (the teacher UNet with its params bound, for instance); `cond` is a
pytree whose leaves have the batch on axis 0. With guidance, the model sees
uncond and cond in one call of batch 2B, as diffusers' pipelines do, but
interleaved per example (u0, c0, u1, c1, ...) rather than concatenated
([u; c]): the model is per-example, so results are the same, and a batch
sharded over devices stays where it is (concatenating needs collectives at
every step). Timesteps and DDIM constants are static numpy arrays, so under
`jax.jit` the model is traced once, whatever the number of steps.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.sampling.ddim import ddim_update, step_coefficients, variance_noise
from d2g_jax.sampling.schedule import ScheduleConfig

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def rescale_guidance(pred_BxHxWxC: jax.Array, pred_cond_BxHxWxC: jax.Array,
                     guidance_rescale: float) -> jax.Array:
  """diffusers `rescale_noise_cfg` (arXiv 2305.08891 sec. 3.4): match the per-sample
  std of the conditional prediction, blended by `guidance_rescale`."""
  axes = tuple(range(1, pred_BxHxWxC.ndim))
  std_cond = jnp.std(pred_cond_BxHxWxC, axis=axes, keepdims=True, ddof=1)
  std_cfg = jnp.std(pred_BxHxWxC, axis=axes, keepdims=True, ddof=1)
  rescaled = pred_BxHxWxC * (std_cond / std_cfg)
  return guidance_rescale * rescaled + (1 - guidance_rescale) * pred_BxHxWxC


def interleave(a_BxN: jax.Array, b_BxN: jax.Array) -> jax.Array:
  """[a0, b0, a1, b1, ...] along axis 0 (batch 2B)."""
  return jnp.stack([a_BxN, b_BxN], axis=1).reshape((-1,) + a_BxN.shape[1:])


def guided_prediction(model_fn: ModelFn, x_BxHxWxC: jax.Array, t, cond_in: Any,
                      guidance_scale: float, guidance_rescale: float = 0.0) -> jax.Array:
  """The (guided) fp32 model prediction at `x` and timestep `t` (scalar).

  With `guidance_scale > 1`, `cond_in` must be the interleaved uncond/cond batch
  (see `cfg_condition`); otherwise it is the conditional batch alone.
  """
  do_cfg = guidance_scale > 1
  x_in = interleave(x_BxHxWxC, x_BxHxWxC) if do_cfg else x_BxHxWxC
  t_B = jnp.full((x_in.shape[0],), t, jnp.int32)
  pred = model_fn(x_in, t_B, cond_in).astype(jnp.float32)
  if not do_cfg:
    return pred
  pred = pred.reshape((-1, 2) + pred.shape[1:])
  pred_uncond, pred_cond = pred[:, 0], pred[:, 1]
  pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
  if guidance_rescale > 0:
    pred = rescale_guidance(pred, pred_cond, guidance_rescale)
  return pred


def cfg_condition(cond: Any, uncond: Any, guidance_scale: float) -> Any:
  """The condition the model sees: uncond and cond interleaved along axis 0 with
  guidance (`interleave`), else cond. `uncond` leaves of batch 1 (one empty-prompt
  embedding for all) are broadcast to cond's batch."""
  if not guidance_scale > 1:
    return cond
  if uncond is None:
    raise ValueError(f"guidance_scale={guidance_scale} > 1 needs `uncond` (the negative / "
                     "empty-prompt condition); pass guidance_scale <= 1 for a conditional pass")
  s_cond, s_uncond = jax.tree.structure(cond), jax.tree.structure(uncond)
  if s_cond != s_uncond:
    raise ValueError(f"cond and uncond must have the same structure; got {s_cond} and {s_uncond}")
  return jax.tree.map(lambda u, c: interleave(jnp.broadcast_to(u, jnp.shape(c)), c),
                      uncond, cond)


def sample(model_fn: ModelFn, schedule: ScheduleConfig, z_BxHxWxC: jax.Array, cond: Any,
           uncond: Any, guidance_scale: float, num_steps: int, eta: float = 0.0,
           key: jax.Array | None = None, guidance_rescale: float = 0.0) -> jax.Array:
  """DDIM + CFG from initial noise `z` to the final latents (diffusers'
  `output_type="latent"`), in z's dtype; the update itself runs in fp32.

  Matches a diffusers SD / SDXL pipeline with `DDIMScheduler.from_config(...)` of
  `schedule`. `guidance_scale`, `num_steps`, `eta` and `guidance_rescale` are
  static Python numbers; `guidance_scale <= 1` does one conditional model call per
  step and ignores `uncond`. `eta > 0` draws noise from `key` (`variance_noise`).
  Call it inside `jax.jit` (or use `make_sampler`).
  """
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  if eta > 0 and key is None:
    raise ValueError(f"eta={eta} > 0 needs a PRNG `key` for the variance noise")
  cond_in = cfg_condition(cond, uncond, guidance_scale)
  coef = step_coefficients(schedule, num_steps, eta)
  timesteps = schedule.timesteps(num_steps).astype(np.int32)
  clip = schedule.clip_sample_range if schedule.clip_sample else None
  dtype = z_BxHxWxC.dtype

  def body(x, xs):
    i, t, a, a_prev, direction, std = xs
    pred = guided_prediction(model_fn, x, t, cond_in, guidance_scale, guidance_rescale)
    noise = variance_noise(key, i, x.shape) if eta > 0 else None
    x_prev, _ = ddim_update(x, pred, a, a_prev, direction, std, schedule.prediction_type,
                            clip, noise)
    return x_prev.astype(dtype), None

  xs = (np.arange(len(timesteps), dtype=np.int32), timesteps, *coef)
  x = (z_BxHxWxC * schedule.init_noise_sigma).astype(dtype)
  x, _ = jax.lax.scan(body, x, xs)
  return x


def make_sampler(apply_fn: Callable[[Any, jax.Array, jax.Array, Any], jax.Array],
                 schedule: ScheduleConfig, num_steps: int, guidance_scale: float,
                 eta: float = 0.0, guidance_rescale: float = 0.0):
  """One jitted `f(params, z, cond, uncond, key=None) -> latents` for
  `apply_fn(params, latents, t_B, cond)`; compiles once per input shape."""

  def run(params, z_BxHxWxC, cond, uncond, key=None):
    model_fn = lambda x, t, c: apply_fn(params, x, t, c)
    return sample(model_fn, schedule, z_BxHxWxC, cond, uncond, guidance_scale, num_steps,
                  eta=eta, key=key, guidance_rescale=guidance_rescale)

  return jax.jit(run)
