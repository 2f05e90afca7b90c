"""The train stage's sample grids: the first examples' targets beside the EMA generator's
outputs for the same noise and prompts, decoded with the teacher's VAE, every
`train.sample_every` steps, to <workdir>/samples/ and TensorBoard.

Legend: N samples, H/W/C latent, h/w pixels.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from d2g_jax import grid, parallel
from d2g_jax.log import get_logger
from d2g_jax.models.vae import decode_latents

_log = get_logger(__name__)


class TrainSamples:
  """Every `sample_every` steps: the first `num_samples` examples' latents (the teacher's
  targets, or real latents for GDD) beside the EMA generator's outputs for their prompts
  (for GDD from fixed noise, seeded by `config.seed`), decoded with the teacher's VAE, to
  <workdir>/samples/."""

  def __init__(self, config, teacher, obj, data, mesh, state_sh, consts_sh):
    self.enabled = bool(config.train.sample_every) and teacher.vae is not None
    if not self.enabled:
      return
    self.folder = os.path.join(config.workdir, "samples")
    repl = parallel.replicated(mesh)
    batch = data.examples(teacher, config.train.num_samples)
    if "z" not in batch:
      batch["z"] = np.asarray(jax.random.normal(jax.random.key(config.seed), batch["x"].shape,
                                                np.float32))
    self.batch = jax.device_put(batch, repl)
    self.vae_params = jax.device_put(teacher.vae_params, repl)
    decode = functools.partial(decode_latents, teacher.vae)

    def fn(ema, vae_params, consts, batch):
      cond = obj.cond(consts, batch)
      x_hat = obj.generator.apply(ema, batch["z"], cond)
      return decode(vae_params, batch["x"]), decode(vae_params, x_hat)
    self.fn = jax.jit(parallel.under_mesh(fn, mesh), in_shardings=(state_sh.g_ema, repl, consts_sh, repl),
                      out_shardings=repl)

  def __call__(self, state, consts, step: int):
    if not self.enabled:
      return None
    teacher_px, student_px = self.fn(state.g_ema, self.vae_params, consts, self.batch)
    path = os.path.join(self.folder, f"step_{step:08d}.png")
    if jax.process_index() == 0:
      image = grid.save_png(grid.columns_image(jax.device_get([teacher_px, student_px])), path)
      _log.info("samples (target | student EMA) -> %s", path)
      return image
    return None
