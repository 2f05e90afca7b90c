"""A self-check of UNet conversion on a real folder: diffusers -> Flax -> Orbax -> diffusers.

Used by the `roundtrip` stage (python -m d2g_jax.main --config configs/demo.py): every
tensor must come back bit-identical, diffusers must load the export with no missing or
unexpected keys, and our forward pass must match diffusers' on random inputs.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from d2g_jax.convert import core, orbax_io
from d2g_jax.convert.unet import WEIGHTS_STEM, load_unet, save_unet
from d2g_jax.log import get_logger
from d2g_jax.models.unet import UNet
from d2g_jax.models.unet_config import UNetConfig

_log = get_logger(__name__)


def _random_inputs(config: UNetConfig, size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((1, size, size, config.in_channels), np.float32)
  ctx = rng.standard_normal((1, 7, config.cross_dims[0]), np.float32)
  added = None
  if config.addition_embed_type == "text_time":
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": rng.standard_normal((1, text_dim), np.float32),
             "time_ids": np.array([[size * 8, size * 8, 0, 0, size * 8, size * 8]], np.float32)}
  return x, np.array([999.0], np.float32), ctx, added


def forward_parity(unet_dir: str, module: UNet, params, size: int = 16) -> float:
  """max |ours - diffusers| / max |diffusers| on random inputs (fp32)."""
  import torch
  from diffusers import UNet2DConditionModel
  ref = UNet2DConditionModel.from_pretrained(unet_dir, low_cpu_mem_usage=False).eval()
  x, t, ctx, added = _random_inputs(module.config, size)
  ours = np.asarray(jax.jit(module.apply)({"params": params}, x, t, ctx, added))
  kw = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}} if added else {}
  with torch.no_grad():
    theirs = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                 torch.from_numpy(ctx), **kw).sample.numpy().transpose(0, 2, 3, 1)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def check_unet(unet_dir: str, workdir: str, size: int = 16) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  ck, out = os.path.join(workdir, "orbax"), os.path.join(workdir, "diffusers")
  module, params = load_unet(unet_dir)
  orbax_io.save(ck, jax.tree_util.tree_map(jax.device_put, params), "unet",
                module.config.to_diffusers())
  restored, _, config = orbax_io.load(ck)
  save_unet(UNet(UNetConfig.from_diffusers(config)), restored, out)
  a = core.open_weights(unet_dir, WEIGHTS_STEM)
  b = core.open_weights(out, WEIGHTS_STEM)
  if sorted(a.keys()) != sorted(b.keys()):
    raise AssertionError(f"round trip changed the key set of {unet_dir}")
  changed = [k for k in a.keys() if not np.array_equal(a.get(k), b.get(k))]
  if changed:
    raise AssertionError(f"round trip changed tensors: {changed[:10]}")
  rel = forward_parity(out, module, params, size)
  _log.info("%s tensors bit-identical through Orbax (%s) and back (%s); forward vs diffusers: max "
            "abs error %.2e x output scale",
            len(a), ck, out, rel)
  if rel > 1e-4:
    raise AssertionError(f"forward parity {rel:.2e} exceeds 1e-4 of the output scale")
  return {"tensors": len(a), "forward_rel_error": rel}
