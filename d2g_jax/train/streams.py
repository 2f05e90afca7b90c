"""The named random streams of training: every random draw gets its own key.

    key = stream(parent, "r1")     # jax.random.fold_in(parent, STREAMS["r1"])

Each key of the tree below is its parent folded with a constant of its own (`STREAMS`), a
step index or a microbatch index, so no two purposes ever share a key (tests/test_objective.py
collects every key one train step derives and checks they are all distinct):

    run key (config.seed)
      init_d                       D's new layers (zero convs, readouts)
      train                        state.rng
        fold_in(step i)            step i's key (`step_key`)
          noise                    z of a batch without one (real data, GDD): G and D share it
          d                        the D update
            r1                     the diffusion noise of R1's rows
            microbatches           -> fold_in(j): microbatch j (j = 0 without accumulation)
              mix                  mix-and-match rows and donors
              diffuse              D's input noise and timesteps
          g                        the G update
            microbatches           -> fold_in(j)
              regression           the regression loss (E-LatentLPIPS augmentation)
              diffuse
"""

from __future__ import annotations

import jax

STREAMS = {"init_d": 1, "train": 2, "noise": 3, "d": 4, "g": 5, "r1": 6, "microbatches": 7,
           "mix": 8, "diffuse": 9, "regression": 10}
assert len(set(STREAMS.values())) == len(STREAMS)


def stream(key: jax.Array, name: str) -> jax.Array:
  """The key of the stream `name` under `key`."""
  if name not in STREAMS:
    raise KeyError(f"unknown random stream {name!r}; known: {sorted(STREAMS)}")
  return jax.random.fold_in(key, STREAMS[name])


def step_key(rng: jax.Array, step) -> jax.Array:
  """Step `step`'s key under the state's `rng`: `fold_in(rng, step)`."""
  return jax.random.fold_in(rng, step)


def microbatch_key(key: jax.Array, j) -> jax.Array:
  """Microbatch j's key under an update's "microbatches" stream."""
  return jax.random.fold_in(key, j)
