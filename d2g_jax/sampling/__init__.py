"""Noise schedules, the DDIM step and the classifier-free-guidance sampling loop."""

from d2g_jax.sampling.ddim import (
  StepCoefficients,
  add_noise,
  alpha_bar,
  ddim_update,
  eps_from_v,
  eps_from_x0,
  from_x0_eps,
  step,
  step_coefficients,
  to_x0_eps,
  variance_noise,
  velocity,
  x0_from_eps,
  x0_from_v,
)
from d2g_jax.sampling.loop import (
  cfg_condition,
  guided_prediction,
  interleave,
  make_sampler,
  rescale_guidance,
  sample,
)
from d2g_jax.sampling.schedule import ScheduleConfig

__all__ = [
    "ScheduleConfig",
    "StepCoefficients",
    "add_noise",
    "alpha_bar",
    "cfg_condition",
    "ddim_update",
    "eps_from_v",
    "eps_from_x0",
    "from_x0_eps",
    "guided_prediction",
    "interleave",
    "make_sampler",
    "rescale_guidance",
    "sample",
    "step",
    "step_coefficients",
    "to_x0_eps",
    "variance_noise",
    "velocity",
    "x0_from_eps",
    "x0_from_v",
]
