"""The one-step generator G(z, c): the teacher's UNet, evaluated once, read as a clean latent.

Legend: B batch, H/W/C latent height/width/channels, S text tokens, E text width,
P pooled width.

    gen = Generator(unet, schedule, timestep=999, parameterization="auto")
    x0_BxHxWxC = gen.apply(params, z_BxHxWxC, cond)      # cond: the UNet's conditioning kwargs

`z` is exactly the DDIM initial noise of a pair (a diffusers pipeline's `latents=`, with
`init_noise_sigma = 1`), fed to the UNet as the noisy sample x_t at `timestep`. The
UNet output is turned into x0 with the teacher's schedule:

  parameterization  the UNet output is        x0
  "auto"            the teacher's prediction  epsilon -> (z - sqrt(1-a) eps) / sqrt(a);
                                              v -> sqrt(a) z - sqrt(1-a) v
  "epsilon"         epsilon                   as above
  "v_prediction"    v                         as above
  "sample"          x0 directly               the output itself

with a = alpha_bar[timestep]. With the teacher's weights and "auto", `G(z, c)` is the
teacher's one-step DDIM result from z at that timestep: what
`convert.pipeline.export_pipeline(..., timestep, prediction_type)` makes diffusers
compute with `num_inference_steps=1, guidance_scale=1`. At t = 999, SD 1.5 has
a = 0.00466: eps -> x0 multiplies the UNet's error by 1/sqrt(a) ~ 15, which is why the
direct "sample" parameterisation is offered (it starts further from the teacher, since
the teacher's weights predict eps, and must be learned).

`condition(batch, ...)` turns a pair record batch (`data.source`) into `cond`: the stored
text embeddings, or the frozen text encoders run on the stored token ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.sampling.ddim import alpha_bar, to_x0_eps
from d2g_jax.sampling.schedule import PREDICTION_TYPES, ScheduleConfig

PARAMETERIZATIONS = ("auto",) + PREDICTION_TYPES


@dataclasses.dataclass(frozen=True)
class Generator:
  """G(z, c) = x0 of one UNet evaluation at `timestep` (hashable: a static jit argument)."""
  unet: Any  # models.unet.UNet
  schedule: ScheduleConfig
  timestep: int = 999
  parameterization: str = "auto"

  def __post_init__(self):
    n = self.schedule.num_train_timesteps
    if not 0 <= self.timestep < n:
      raise ValueError(f"generator.timestep={self.timestep} must be in [0, {n - 1}] "
                       f"(the teacher's num_train_timesteps is {n})")
    if self.parameterization not in PARAMETERIZATIONS:
      raise ValueError(f"generator.parameterization={self.parameterization!r}; expected one of "
                       f"{PARAMETERIZATIONS}")

  @property
  def prediction_type(self) -> str:
    """What the UNet's output means (for export: the one-step scheduler's prediction_type)."""
    if self.parameterization == "auto":
      return self.schedule.prediction_type
    return self.parameterization

  def unet_output(self, params, z_BxHxWxC: jax.Array, cond: Mapping[str, Any]) -> jax.Array:
    t_B = jnp.full((z_BxHxWxC.shape[0],), self.timestep, jnp.int32)
    return self.unet.apply({"params": params}, z_BxHxWxC, t_B, cond["encoder_hidden_states"],
                           added_cond_kwargs=cond.get("added_cond_kwargs"))

  def apply(self, params, z_BxHxWxC: jax.Array, cond: Mapping[str, Any]) -> jax.Array:
    """x0, fp32 BxHxWxC."""
    pred = self.unet_output(params, z_BxHxWxC, cond)
    a = alpha_bar(self.schedule, self.timestep)
    x0, _ = to_x0_eps(pred, z_BxHxWxC, a, self.prediction_type)
    return x0


# ----------------------------------------------------------- conditioning
EncodeTokens = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, jax.Array | None]]


def condition(batch: Mapping[str, Any], *, sdxl: bool, time_ids_1x6: np.ndarray | None = None,
              text_params: Any = None, encode_tokens: EncodeTokens | None = None) -> dict:
  """The UNet conditioning of a batch of pair records, fp32.

  Uses the stored `prompt_embeds` (+ SDXL `pooled_prompt_embeds`) when the batch has
  them; otherwise `encode_tokens(text_params, batch)` recomputes them from the stored
  token ids (see `Teacher.encode_tokens_fn`). SDXL's `time_ids` are the pairs' resolution
  (`time_ids_1x6`, broadcast over the batch), as the teacher used them.
  """
  if "prompt_embeds" in batch:
    embeds = jnp.asarray(batch["prompt_embeds"], jnp.float32)
    pooled = batch.get("pooled_prompt_embeds")
    pooled = None if pooled is None else jnp.asarray(pooled, jnp.float32)
  else:
    if encode_tokens is None:
      raise ValueError("the pair records hold no prompt_embeds (pairs.store_embeddings was "
                       "False): pass encode_tokens/text_params to recompute them from the "
                       "stored token ids with the teacher's text encoders")
    embeds, pooled = encode_tokens(text_params, batch)
  cond = {"encoder_hidden_states": embeds}
  if sdxl:
    if pooled is None or time_ids_1x6 is None:
      raise ValueError("an SDXL teacher needs pooled text embeddings and time_ids; the batch "
                       f"has keys {sorted(batch)}")
    b = embeds.shape[0]
    cond["added_cond_kwargs"] = {
        "text_embeds": pooled,
        "time_ids": jnp.broadcast_to(jnp.asarray(time_ids_1x6, jnp.float32).reshape(1, 6),
                                     (b, 6))}
  return cond
