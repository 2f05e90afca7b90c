"""Noise schedules and DDIM timesteps, built from a diffusers scheduler config.

`ScheduleConfig` holds the options of diffusers' `DDIMScheduler` (with its
defaults) and computes, in numpy, the same betas, `alphas_cumprod` and inference
timesteps. A pipeline's `scheduler/scheduler_config.json` may name another class
(SD 1.x ships PNDM, SDXL Euler): like `DDIMScheduler.from_config(...)`, the keys
DDIM knows are used, the rest are ignored, and missing keys take DDIM's defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import numpy as np

from d2g_jax.files import load_json

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The options of diffusers' `DDIMScheduler`, same names and defaults.

  `source` names the file the config came from (for error messages only).
  Dynamic thresholding (`thresholding=True`) is not supported and raises.
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  trained_betas: tuple[float, ...] | None = None
  clip_sample: bool = True
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  prediction_type: str = "epsilon"
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  clip_sample_range: float = 1.0
  sample_max_value: float = 1.0
  timestep_spacing: str = "leading"
  rescale_betas_zero_snr: bool = False
  source: str = dataclasses.field(default="", compare=False)

  def __post_init__(self):
    where = f" in {self.source}" if self.source else ""

    def check(name: str, allowed: tuple[str, ...]):
      value = getattr(self, name)
      if value not in allowed:
        raise ValueError(f"{name}={value!r}{where} is not supported; expected one of "
                         f"{', '.join(allowed)}")

    if self.trained_betas is None:
      check("beta_schedule", BETA_SCHEDULES)
    elif len(self.trained_betas) != self.num_train_timesteps:
      raise ValueError(f"trained_betas{where} has {len(self.trained_betas)} values but "
                       f"num_train_timesteps is {self.num_train_timesteps}; they must match")
    check("timestep_spacing", TIMESTEP_SPACINGS)
    check("prediction_type", PREDICTION_TYPES)
    if self.thresholding:
      raise ValueError(f"thresholding=True{where} is not supported (dynamic thresholding is "
                       "for pixel-space models); set it to false")
    if self.num_train_timesteps < 1:
      raise ValueError(f"num_train_timesteps={self.num_train_timesteps}{where} must be >= 1")

  # ---------------------------------------------------------------- builders
  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], source: str = "") -> "ScheduleConfig":
    """The config `DDIMScheduler.from_config(config)` would build.

    Accepts the dict of any diffusers scheduler (`_class_name` PNDM, Euler, DDIM,
    ...) and `scheduler.config` dumps with `_use_default_values`.
    """
    defaulted = set(config.get("_use_default_values", ()))
    names = {f.name for f in dataclasses.fields(cls)} - {"source"}
    kwargs = {k: v for k, v in config.items() if k in names and k not in defaulted}
    if kwargs.get("trained_betas") is not None:
      kwargs["trained_betas"] = tuple(float(b) for b in np.asarray(kwargs["trained_betas"]).ravel())
    for name, kind in (("num_train_timesteps", int), ("steps_offset", int),
                       ("beta_start", float), ("beta_end", float),
                       ("clip_sample_range", float), ("sample_max_value", float),
                       ("dynamic_thresholding_ratio", float)):
      if name in kwargs:
        kwargs[name] = kind(kwargs[name])
    return cls(**kwargs, source=source)

  @classmethod
  def from_folder(cls, path: str) -> "ScheduleConfig":
    """From a pipeline folder, its `scheduler/` folder, or a scheduler JSON file."""
    candidates = [path] if path.endswith(".json") else [
        os.path.join(path, "scheduler", "scheduler_config.json"),
        os.path.join(path, "scheduler_config.json")]
    for candidate in candidates:
      if os.path.isfile(candidate):
        return cls.from_diffusers(load_json(candidate, "scheduler config"), source=candidate)
    raise FileNotFoundError(
        f"no scheduler config found for {path!r}: looked for {', '.join(candidates)}; pass a "
        "diffusers pipeline folder (with scheduler/scheduler_config.json) or the JSON file itself")

  @classmethod
  def stable_diffusion(cls, prediction_type: str = "epsilon") -> "ScheduleConfig":
    """The schedule of SD 1.x / 2.x / SDXL (`v_prediction` for SD 2.x 768-v)."""
    return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               clip_sample=False, set_alpha_to_one=False, steps_offset=1,
               prediction_type=prediction_type)

  def with_sd_pipeline_fixes(self) -> "ScheduleConfig":
    """What `StableDiffusionPipeline.__init__` does to an outdated scheduler config:
    `steps_offset=1` and `clip_sample=False` (the SDXL pipeline does not)."""
    return dataclasses.replace(self, steps_offset=1, clip_sample=False)

  # ------------------------------------------------------------ noise levels
  @property
  def betas(self) -> np.ndarray:
    """float32 [num_train_timesteps], as `DDIMScheduler.betas`."""
    n = self.num_train_timesteps
    if self.trained_betas is not None:
      betas = np.asarray(self.trained_betas, np.float32)
    elif self.beta_schedule == "linear":
      betas = np.linspace(self.beta_start, self.beta_end, n).astype(np.float32)
    elif self.beta_schedule == "scaled_linear":
      betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n).astype(np.float32) ** 2
    else:  # squaredcos_cap_v2: the cosine alpha_bar of improved DDPM, betas capped at 0.999
      alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
      betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)
                        for i in range(n)], np.float32)
    if self.rescale_betas_zero_snr:
      betas = _rescale_zero_terminal_snr(betas)
    return betas

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """float32 [num_train_timesteps]: alpha_bar_t, the signal fraction at timestep t."""
    return np.cumprod(np.float32(1) - self.betas, dtype=np.float32)

  @property
  def final_alpha_cumprod(self) -> float:
    """alpha_bar used after the last step (`set_alpha_to_one`)."""
    return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

  @property
  def init_noise_sigma(self) -> float:
    """Scale of the initial noise (1 for DDIM)."""
    return 1.0

  # --------------------------------------------------------------- timesteps
  def timesteps(self, num_steps: int) -> np.ndarray:
    """int64 inference timesteps, descending, as `DDIMScheduler.set_timesteps(num_steps)`."""
    n_train = self.num_train_timesteps
    if not 1 <= num_steps <= n_train:
      raise ValueError(f"num_steps={num_steps} must be between 1 and num_train_timesteps="
                       f"{n_train}")
    if self.timestep_spacing == "linspace":
      return np.linspace(0, n_train - 1, num_steps).round()[::-1].copy().astype(np.int64)
    if self.timestep_spacing == "leading":
      ratio = n_train // num_steps
      return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + self.steps_offset
    ratio = n_train / num_steps  # trailing
    return np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1

  def prev_timesteps(self, num_steps: int) -> np.ndarray:
    """The timestep each DDIM step moves to; negative means "after the last step".

    As diffusers, `t - num_train_timesteps // num_steps` for every spacing (for
    `linspace` this is not always the next entry of `timesteps`).
    """
    return self.timesteps(num_steps) - self.num_train_timesteps // num_steps

  def alpha_bar_prev(self, num_steps: int) -> np.ndarray:
    """float32 alpha_bar of each step's target timestep (`final_alpha_cumprod` if < 0)."""
    prev = self.prev_timesteps(num_steps)
    ac = self.alphas_cumprod
    return np.where(prev >= 0, ac[np.clip(prev, 0, None)],
                    np.float32(self.final_alpha_cumprod)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Shift and scale sqrt(alpha_bar) so the last timestep has zero SNR (arXiv 2305.08891)."""
  sqrt_ab = np.sqrt(np.cumprod(np.float32(1) - betas, dtype=np.float32))
  first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  ab = sqrt_ab**2
  alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
  return (np.float32(1) - alphas).astype(np.float32)
