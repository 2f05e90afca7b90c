"""The train state: one explicit pytree holding everything that changes during training.

    state = TrainState(step, rng, g_params, g_ema, d_params, g_opt, d_opt)

`step` counts finished train steps (int32 scalar); `rng` is the run's base key, never
split in place: step i uses `jax.random.fold_in(rng, i)`. Constants of the step (the
regression loss's network, frozen text encoders) are not state: they are a separate,
non-donated argument of the step functions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array     # int32 scalar: train steps done
  rng: jax.Array      # the run's base PRNG key
  g_params: Any       # generator (student UNet)
  g_ema: Any          # its exponential moving average (what is exported)
  d_params: Any       # discriminator
  g_opt: Any          # generator optimiser state
  d_opt: Any          # discriminator optimiser state


def create(g_params: Any, d_params: Any, g_tx, d_tx, rng: jax.Array) -> TrainState:
  """A fresh state at step 0; the EMA starts as a copy of the generator."""
  return TrainState(step=jnp.zeros((), jnp.int32), rng=rng, g_params=g_params,
                    g_ema=jax.tree.map(jnp.copy, g_params), d_params=d_params,
                    g_opt=g_tx.init(g_params), d_opt=d_tx.init(d_params))
