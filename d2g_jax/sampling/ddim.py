"""The DDIM step of diffusers' `DDIMScheduler`, and conversions between predictions.

Legend: B batch, H/W height/width, C channels. `alpha_bar` (diffusers'
`alphas_cumprod[t]`) is a scalar or a [B] array, broadcast over the other axes.
Helpers compute in fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.sampling.schedule import ScheduleConfig


# ------------------------------------------------------------- conversions
def alpha_bar(schedule: ScheduleConfig, t) -> jax.Array:
  """alpha_bar at integer timestep(s) `t` (Python int or int array, traced or not)."""
  return jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t)]


def _expand(a, x: jax.Array) -> jax.Array:
  a = jnp.asarray(a, jnp.float32)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def add_noise(x0, eps, alpha_bar) -> jax.Array:
  """x_t = sqrt(a) x0 + sqrt(1 - a) eps (diffusers `add_noise`)."""
  a = _expand(alpha_bar, x0)
  return jnp.sqrt(a) * _f32(x0) + jnp.sqrt(1 - a) * _f32(eps)


def velocity(x0, eps, alpha_bar) -> jax.Array:
  """v = sqrt(a) eps - sqrt(1 - a) x0 (diffusers `get_velocity`)."""
  a = _expand(alpha_bar, x0)
  return jnp.sqrt(a) * _f32(eps) - jnp.sqrt(1 - a) * _f32(x0)


def x0_from_eps(x_t, eps, alpha_bar) -> jax.Array:
  a = _expand(alpha_bar, x_t)
  return (_f32(x_t) - jnp.sqrt(1 - a) * _f32(eps)) / jnp.sqrt(a)


def eps_from_x0(x_t, x0, alpha_bar) -> jax.Array:
  a = _expand(alpha_bar, x_t)
  return (_f32(x_t) - jnp.sqrt(a) * _f32(x0)) / jnp.sqrt(1 - a)


def x0_from_v(x_t, v, alpha_bar) -> jax.Array:
  a = _expand(alpha_bar, x_t)
  return jnp.sqrt(a) * _f32(x_t) - jnp.sqrt(1 - a) * _f32(v)


def eps_from_v(x_t, v, alpha_bar) -> jax.Array:
  a = _expand(alpha_bar, x_t)
  return jnp.sqrt(a) * _f32(v) + jnp.sqrt(1 - a) * _f32(x_t)


def to_x0_eps(pred, x_t, alpha_bar, prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """(x0, eps) from a model prediction of kind `prediction_type` at noisy `x_t`."""
  if prediction_type == "epsilon":
    return x0_from_eps(x_t, pred, alpha_bar), _f32(pred)
  if prediction_type == "v_prediction":
    return x0_from_v(x_t, pred, alpha_bar), eps_from_v(x_t, pred, alpha_bar)
  if prediction_type == "sample":
    return _f32(pred), eps_from_x0(x_t, pred, alpha_bar)
  raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, "
                   "v_prediction or sample")


def from_x0_eps(x0, eps, alpha_bar, prediction_type: str) -> jax.Array:
  """The model prediction of kind `prediction_type` that corresponds to (x0, eps)."""
  if prediction_type == "epsilon":
    return _f32(eps)
  if prediction_type == "v_prediction":
    return velocity(x0, eps, alpha_bar)
  if prediction_type == "sample":
    return _f32(x0)
  raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, "
                   "v_prediction or sample")


# ---------------------------------------------------------------- the step
class StepCoefficients(NamedTuple):
  """Per-step DDIM constants for one (schedule, num_steps, eta), float32 [S] each."""
  alpha_bar: np.ndarray       # alpha_bar_t
  alpha_bar_prev: np.ndarray  # alpha_bar of the target timestep
  direction: np.ndarray       # sqrt(1 - alpha_bar_prev - std^2), weight of eps
  std: np.ndarray             # eta * sigma_t, weight of the fresh noise


def _coefficients(a, a_prev, eta: float) -> StepCoefficients:
  a, a_prev = np.asarray(a, np.float64), np.asarray(a_prev, np.float64)
  variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)  # sigma_t^2 of DDIM eq. 16
  std = eta * np.sqrt(np.maximum(variance, 0.0))
  direction = np.sqrt(np.maximum(1 - a_prev - std**2, 0.0))
  f32 = lambda x: np.asarray(x, np.float32)
  return StepCoefficients(f32(a), f32(a_prev), f32(direction), f32(std))


def step_coefficients(schedule: ScheduleConfig, num_steps: int,
                      eta: float = 0.0) -> StepCoefficients:
  """DDIM constants for every step of `schedule.timesteps(num_steps)`, computed in fp64."""
  return _coefficients(schedule.alphas_cumprod[schedule.timesteps(num_steps)],
                       schedule.alpha_bar_prev(num_steps), eta)


def ddim_update(x_t, pred, alpha_bar, alpha_bar_prev, direction, std,
                prediction_type: str, clip_sample_range: float | None = None,
                noise=None) -> tuple[jax.Array, jax.Array]:
  """One DDIM update from precomputed constants -> (x_prev, x0), both fp32.

  `clip_sample_range` clips x0 (diffusers `clip_sample`); eps stays the model's,
  as in diffusers. `noise` (same shape as x_t) is required when `std` > 0.
  """
  x0, eps = to_x0_eps(pred, x_t, alpha_bar, prediction_type)
  if clip_sample_range is not None:
    x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
  x_prev = _expand(jnp.sqrt(_f32(alpha_bar_prev)), x0) * x0 + _expand(direction, eps) * eps
  if noise is not None:
    x_prev = x_prev + _expand(std, x_prev) * _f32(noise)
  return x_prev, x0


def variance_noise(key: jax.Array, step_index, shape, dtype=jnp.float32) -> jax.Array:
  """The eta > 0 noise the sampling loop draws at step `step_index` from `key`."""
  return jax.random.normal(jax.random.fold_in(key, step_index), shape, dtype)


def step(schedule: ScheduleConfig, model_output, t: int, x_t, num_steps: int,
         eta: float = 0.0, noise=None) -> tuple[jax.Array, jax.Array]:
  """`DDIMScheduler.step(model_output, t, x_t, eta, variance_noise=noise)` after
  `set_timesteps(num_steps)` -> (prev_sample, pred_original_sample), fp32.

  `t` is a static Python int (any training timestep, as in diffusers).
  """
  if eta > 0 and noise is None:
    raise ValueError("eta > 0 needs `noise` (e.g. variance_noise(key, i, x_t.shape))")
  t = int(t)
  prev = t - schedule.num_train_timesteps // num_steps
  ac = schedule.alphas_cumprod
  a_prev = ac[prev] if prev >= 0 else schedule.final_alpha_cumprod
  coef = _coefficients(ac[t], a_prev, eta)
  clip = schedule.clip_sample_range if schedule.clip_sample else None
  return ddim_update(x_t, model_output, *coef, schedule.prediction_type, clip,
                     noise if eta > 0 else None)
