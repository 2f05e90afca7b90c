"""Diffusion2GAN's adversarial objective, as pure jit-able functions.

Legend: B batch, H/W/C latent height/width/channels, R number of readouts, h/w a
readout's size. `logits` is D's output: a list of R logit maps Bxhxw.

- Non-saturating GAN loss (Goodfellow et al. 2014), averaged over the readouts, each
  readout's map averaged over its positions:
    D: mean_r [ softplus(-D_r(real)) + softplus(D_r(fake)) ],   G: mean_r softplus(-D_r(fake)).
- R1 (Mescheder et al. 2018) on a single sample of the batch (Diffusion2GAN's memory
  saving), lazily every `interval` steps with the interval folded into its weight
  (StyleGAN2's lazy regularisation): `interval * gamma / 2 * ||grad_x score(x)||^2`,
  where score(x) = mean_r mean_hw D_r(x), the same aggregation as the GAN loss.
- Mix-and-match: a fraction of the fake half of D's batch gets latents of other rows
  (real ones and generated ones) with its own z and c kept; those rows are fake.
- Optional input diffusion (off by default): real and fake latents noised to the same
  random timestep per row before D sees them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from d2g_jax.sampling.ddim import add_noise, alpha_bar
from d2g_jax.sampling.schedule import ScheduleConfig

Logits = Sequence[jax.Array]  # R maps, each Bxhxw


def per_sample_score(logits: Logits) -> jax.Array:
  """D's scalar per sample: the mean over readouts of each map's mean, shape (B,)."""
  return jnp.mean(jnp.stack([l.reshape(l.shape[0], -1).mean(axis=1) for l in logits]), axis=0)


def d_loss(real_logits: Logits, fake_logits: Logits) -> tuple[jax.Array, jax.Array]:
  """(real term, fake term) of the non-saturating D loss, each a scalar batch mean."""
  real = jnp.mean(jnp.stack([jnp.mean(jax.nn.softplus(-l)) for l in real_logits]))
  fake = jnp.mean(jnp.stack([jnp.mean(jax.nn.softplus(l)) for l in fake_logits]))
  return real, fake


def g_loss(fake_logits: Logits) -> jax.Array:
  """The generator's non-saturating loss: mean_r mean softplus(-D_r(G(z, c)))."""
  return jnp.mean(jnp.stack([jnp.mean(jax.nn.softplus(-l)) for l in fake_logits]))


def r1_penalty(score_fn: Callable[[jax.Array], jax.Array], x_NxHxWxC: jax.Array) -> jax.Array:
  """mean over the N samples of ||d score_fn(x)_n / d x_n||^2.

  `score_fn(x) -> (N,)` must treat samples independently (it is summed before the
  gradient, so the gradient of each sample is its own). Pass one sample for the
  paper's single-sample R1.
  """
  grad = jax.grad(lambda x: jnp.sum(score_fn(x)))(x_NxHxWxC.astype(jnp.float32))
  return jnp.mean(jnp.sum(jnp.square(grad), axis=tuple(range(1, grad.ndim))))


def r1_weight(gamma: float, interval: int) -> float:
  """The lazy R1 weight: gamma / 2, times the interval it is applied at."""
  return 0.5 * gamma * interval


def num_mixed(batch: int, fraction: float) -> int:
  """Rows of the fake half replaced by mix-and-match: round(fraction * B), 0 if B < 2."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"mix-and-match fraction {fraction} must be in [0, 1]")
  return 0 if batch < 2 else int(round(fraction * batch))


def mix_and_match(key: jax.Array, x_real_BxHxWxC: jax.Array, x_fake_BxHxWxC: jax.Array,
                  fraction: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The fake half of D's batch with mismatched latents in `num_mixed(B, fraction)` rows.

  Which rows: a random subset of that size. Each gets the latent of another row
  (`source`, never itself: row i takes row (i + s) mod B with s uniform in [1, B-1]),
  taken from the real latents for the first half of the subset (rounded down) and from
  the generated ones for the rest. `z` and `c` of the row stay: the pair is mismatched,
  so it is labelled fake. Returns (latents BxHxWxC, info) with info = {"mixed": bool B,
  "from_real": bool B, "source": int B}.
  """
  b = x_real_BxHxWxC.shape[0]
  m = num_mixed(b, fraction)
  rows = jnp.arange(b)
  if m == 0:
    false = jnp.zeros((b,), bool)
    return x_fake_BxHxWxC, {"mixed": false, "from_real": false, "source": rows}
  k_rows, k_shift = jax.random.split(key)
  order = jax.random.permutation(k_rows, b)           # order[:m] are the mixed rows
  rank = jnp.zeros((b,), jnp.int32).at[order].set(rows.astype(jnp.int32))
  mixed = rank < m
  from_real = rank < m // 2
  shift = jax.random.randint(k_shift, (b,), 1, b)
  source = jnp.where(mixed, (rows + shift) % b, rows)
  donor = jnp.where(from_real[:, None, None, None], x_real_BxHxWxC[source],
                    x_fake_BxHxWxC[source])
  out = jnp.where(mixed[:, None, None, None], donor.astype(x_fake_BxHxWxC.dtype), x_fake_BxHxWxC)
  return out, {"mixed": mixed, "from_real": from_real, "source": source}


def diffuse(key: jax.Array, schedule: ScheduleConfig, t_min: int, t_max: int,
            *xs_BxHxWxC: jax.Array) -> tuple[list[jax.Array], jax.Array]:
  """Noise every x to one random timestep per row, t ~ U{t_min..t_max}, with the same
  noise for all xs (so real and fake rows differ only in their clean latents).
  Returns ([x_t, ...], t_B)."""
  b = xs_BxHxWxC[0].shape[0]
  k_t, k_eps = jax.random.split(key)
  t_B = jax.random.randint(k_t, (b,), t_min, t_max + 1)
  eps = jax.random.normal(k_eps, xs_BxHxWxC[0].shape, jnp.float32)
  a = alpha_bar(schedule, t_B)
  return [add_noise(x, eps, a) for x in xs_BxHxWxC], t_B
