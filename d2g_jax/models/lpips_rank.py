"""LPIPS's judgment network (Zhang et al., CVPR 2018): from the distances of two distorted
patches to their reference, the probability that people judge the second one closer.

Legend: B batch, M hidden width.

Input features [d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)]; three 1x1 layers (the
paper's "small network", here Dense on per-example scalars) with leaky ReLU (0.2) between;
the output is a logit (the sigmoid and binary cross-entropy are fused in the loss).
Initialised as PyTorch's default for 1x1 convolutions: weights and biases U(+-1/sqrt(fan_in)).
Used only to calibrate the LPIPS heads (`d2g_jax.latent_lpips.calibrate`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def _torch_uniform(fan_in: int):
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


class RankNet(nn.Module):
  """(d0_B, d1_B) -> logit_B that p1 (distance d1) is judged closer to the reference."""
  hidden: int = 32
  eps: float = 0.1

  @nn.compact
  def __call__(self, d0_B: jax.Array, d1_B: jax.Array) -> jax.Array:
    d0, d1 = d0_B.astype(jnp.float32), d1_B.astype(jnp.float32)
    h = jnp.stack([d0, d1, d0 - d1, d0 / (d1 + self.eps), d1 / (d0 + self.eps)], axis=-1)
    for i, (fan_in, width) in enumerate(((5, self.hidden), (self.hidden, self.hidden),
                                         (self.hidden, 1))):  # Bx5 -> BxM -> BxM -> Bx1
      h = nn.Dense(width, kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in),
                   name=f"layer{i}")(h)
      if i < 2:
        h = nn.leaky_relu(h, 0.2)
    return h[:, 0]
