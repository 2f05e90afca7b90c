"""Dtype names as configs write them, turned into dtypes and checked in one place.

    dtype = dtypes.get(config.train.dtype, "train.dtype")            # float32 | bfloat16
    dtype = dtypes.get(config.export.dtype, "export.dtype", dtypes.STORAGE)
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

COMPUTE = ("float32", "bfloat16")             # what networks compute in
STORAGE = ("float32", "bfloat16", "float16")  # what latents and exported weights are stored as


def get(name: str, key: str, allowed: Sequence[str] = COMPUTE) -> np.dtype:
  """The dtype called `name` (numpy's, bfloat16 from ml_dtypes); a ValueError naming the
  config key and the accepted names when `name` is not among `allowed`."""
  if name not in allowed:
    raise ValueError(f"{key}={name!r}; expected one of {', '.join(allowed)}")
  return jnp.dtype(name)
